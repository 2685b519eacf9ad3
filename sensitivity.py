"""Image sensitivity: does the model use its images at all?

image_sensitivity() measures how much the outputs change when samples swap their views: the
teacher-forced next-token distributions at the label positions (total variation, overall and at the
<loc> targets) and the sampled action chunk (L2), with the change when the prompts are swapped
instead as the scale of a change the model does react to. probe_images() runs it on a fixed batch of a held-out set at every
evaluation (trainer.evaluate); a model that ignores its images shows ~0 here however low its loss.
"""
import numpy as np
import torch

from batches import autocast, to_device
from tokenizer import loc_tokens


VISUAL_KEYS = ("images", "view_mask", "rays", "has_rays", "depth", "has_depth")
SENSITIVITY_KEYS = ("img_tv", "img_tv_loc", "img_action_delta", "img_action_delta_first",
                    "prompt_action_delta", "prompt_action_delta_first", "action_err", "img_swap_action_err",
                    "mean_action_err")


def roll_samples(batch, keys):
    """The batch with `keys` rolled by one along dim 0 (sample i gets sample i-1's), the rest kept."""
    return {k: v.roll(1, dims=0) if k in keys else v for k, v in batch.items()}


@torch.no_grad()
def image_sensitivity(model, batch, loc_ids=None, seed=0):
    """How much the outputs change when every sample sees another sample's views (images, masks,
    ray and depth priors rolled by one over the batch; prompt, labels and state kept). Floats, NaN
    where the batch has no such part:
      img_tv: mean total-variation distance between the teacher-forced next-token distributions at
        the label positions with the true vs swapped views; img_tv_loc: the same over the positions
        whose target is a <loc> token (loc_ids: their token ids), the location stage 1 must learn;
      img_action_delta: mean L2 change of the sampled chunk (normalised units) for a fixed noise,
        over the chunk (_first: its first step); prompt_action_delta: the same when the prompts are
        swapped instead, the scale of a change the model does react to;
      action_err: mean L2 error of the sampled chunk against the true one over its real steps,
        img_swap_action_err the same with the views swapped, mean_action_err that of always answering
        the mean action (0 in normalised units): moving with the images is not enough, the images
        must make the chunk better (action_err < img_swap_action_err), and the chunk must beat the
        trivial answer.
    Runs in eval mode (the previous mode is restored) and draws nothing from the global RNG, so a
    resumed training run stays exact."""
    B = batch["images"].shape[0]
    if B < 2:
        raise ValueError(f"image_sensitivity swaps views between samples: needs a batch of >= 2, got {B}")
    out = dict.fromkeys(SENSITIVITY_KEYS, float("nan"))
    swapped = roll_samples(batch, VISUAL_KEYS)
    was_training = model.training
    model.eval()
    try:
        if batch.get("label_ids") is not None:
            out.update(_label_tv(model, batch, swapped, loc_ids))
        if "actions" in batch:
            out.update(_action_deltas(model, batch, swapped, seed))
    finally:
        model.train(was_training)
    return out


def _label_tv(model, batch, swapped, loc_ids):
    mask = batch["label_mask"]                                                  # (B, Tl)
    probs = []
    for b in (batch, swapped):
        vlm_h, _, p_valid = model.joint_forward(b)
        probs.append(model.label_logits(vlm_h, p_valid)[mask].float().softmax(-1))  # (N, V)
    tv = 0.5 * (probs[0] - probs[1]).abs().sum(-1)                              # (N,)
    out = {"img_tv": tv.mean().item()}
    if loc_ids is not None:
        is_loc = torch.isin(batch["label_ids"][mask], torch.as_tensor(loc_ids, device=tv.device))
        if is_loc.any():
            out["img_tv_loc"] = tv[is_loc].mean().item()
    return out


def _action_deltas(model, batch, swapped, seed):
    actions = batch["actions"]                                                  # (B, H, D)
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(seed)).to(actions)
    # Only the dims the data fills: zero-padding up to max_dim (and constant dims) is 0 in every sample.
    dims = actions.flatten(0, 1).abs().amax(0) > 0                              # (D,)
    true = actions[..., dims].float()                                            # (B, H, d)
    real = ~batch["is_pad"] if "is_pad" in batch else torch.ones_like(true[..., 0], dtype=torch.bool)  # (B, H)
    error = lambda chunk: (chunk - true).norm(dim=-1)[real].mean().item()  # noqa: E731
    base = model.sample_actions(batch, noise=noise)[..., dims].float()          # (B, H, d)
    chunks = {name: model.sample_actions(other, noise=noise)[..., dims].float()  # (B, H, d) each
              for name, other in (("img", swapped), ("prompt", roll_samples(batch, ("prompt_ids", "prompt_mask"))))}
    out = {"action_err": error(base), "img_swap_action_err": error(chunks["img"]),
           "mean_action_err": error(torch.zeros_like(true))}
    for name, chunk in chunks.items():
        step = (chunk - base).norm(dim=-1)                                      # (B, H)
        out[f"{name}_action_delta"] = step.mean().item()
        out[f"{name}_action_delta_first"] = step[:, 0].mean().item()
    return out


def probe_images(run, dataset, collate, cfg, d):
    """image_sensitivity on one batch (at least 2 samples) spread over the held-out set with
    neighbours half the set apart, so each swap pairs two episodes (a robot set's first batch is one
    episode's consecutive frames); keys prefixed `eval_`, {} for a one-sample set. Every process probes
    the same samples, so the figures agree without a reduction and FSDP's collectives line up."""
    n = min(len(dataset), max(2, cfg.batch_size))
    if n < 2:
        return {}
    spread = np.linspace(0, len(dataset) - 1, n).round().astype(int)          # n distinct indices
    order = spread[np.argsort(np.arange(n) % ((n + 1) // 2), kind="stable")]  # 0, n/2, 1, n/2 + 1, ...
    dataset.set_epoch(0)
    batch = to_device(collate([dataset[int(i)] for i in order]), d.device)
    with autocast(d.device):
        figures = image_sensitivity(run.model, batch, loc_ids=run.tok.convert_tokens_to_ids(loc_tokens()))
    return {f"eval_{k}": v for k, v in figures.items()}
