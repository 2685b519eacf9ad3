"""The tiny configuration's own pre-trained VLM: what PaliGemma is to the paper, made on a laptop.

The paper starts every arm from PaliGemma, whose SigLIP tower already knows what objects look like
and where they are. The tiny configuration has no such checkpoint, and a tiny VLM trained from
random weights by next-token prediction alone collapses its vision tower (the image features become
the same for every image within ~30 steps at lr 1e-3, after which nothing is learned from images).
So it is made the way PaliGemma was made, in two phases (`python pretrain.py --stage vlm`):

  1. **Vision first** (this file): the SigLIP tower learns a dense objective of its own on the
     grounding data, per 14 px patch: the words of the object covering it (none on background),
     scored SigLIP-style against the decoder's own embedding rows of those words through the VLM's
     projector, so image features and prompt words meet in one space; where that object's 2D box
     centre is in the image (absolute, so the feature carries the position the decoder must later
     write as <loc> tokens); and the object's log depth. The head's own weights (a scale, a bias,
     a linear map for centre and depth) are thrown away afterwards. The targets come from the same
     pseudo-views (crops, letterboxing) and 2D boxes as stage 1, so any grounding dataset works.
  2. **Then the decoder** (pretrain.py's ordinary loop): the projector and Gemma decoder learn to
     write names and 2D boxes (`--targets boxes`, the "detect" task PaliGemma also knows) with the
     vision tower frozen, which protects it from the decoder's first, noisy gradients. The <loc>
     embedding rows start as a smooth code of their value (init_loc_embeddings).

The result is a normal checkpoint that knows 2D detection but no 3D poses: stage 1, post-training
without pose pre-training and every ablation arm start from it, as they start from PaliGemma in the
paper. With `--vlm DIR` the real PaliGemma replaces it.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VisionConfig:
    steps: int = 3000         # ~8 CPU-minutes; at 1500 it knows colours but not yet categories
    batch_size: int = 16      # grounding samples per step (x views images)
    lr: float = 1e-3
    warmup: int = 50
    background_weight: float = 0.3  # most patches are table: weigh them down so objects dominate
    centre_weight: float = 1.0      # box centres (image units, 0..1) next to log depth (~0.3)
    log_every: int = 100
    seed: int = 0


def patch_targets(objects, size, patch):
    """Dense targets of one view from its labelled objects (ObjectPose, view pixels).

    Returns cls (P,) int64 (0 = background, k = objects[k-1] covers the patch centre; the nearer
    object wins where boxes overlap), centre (P, 2) float32 (the object's box centre / size) and
    log_depth (P,) float32 (log of the object's camera z), both 0 on background. P = (size/patch)^2,
    row-major like the tower's patch tokens."""
    n = size // patch
    centre = (np.arange(n) + 0.5) * patch - 0.5                                 # patch centres, pixel coords
    u, v = np.meshgrid(centre, centre)                                          # (n, n) each, row-major
    cls = np.zeros((n, n), np.int64)
    centre_uv = np.zeros((n, n, 2), np.float32)
    log_depth = np.zeros((n, n), np.float32)
    for k in sorted(range(len(objects)), key=lambda k: -objects[k].t[2]):      # far first, near overwrites
        x1, y1, x2, y2 = objects[k].box2d
        inside = (u >= x1) & (u <= x2) & (v >= y1) & (v <= y2)
        cls[inside] = k + 1
        centre_uv[inside] = ((x1 + x2) / 2 / size, (y1 + y2) / 2 / size)
        log_depth[inside] = np.log(max(float(objects[k].t[2]), 1e-3))
    return cls.ravel(), centre_uv.reshape(-1, 2), log_depth.ravel()


class VisionTargets(torch.utils.data.Dataset):
    """Per sample of a GroundingDataset: its views' images and the dense targets of *every* labelled
    object in each view (stage 1 lists only the queried class; here the tower must see them all).
    A patch's class target is the bag of the text tokens of the covering object's name (" red cube"
    -> {▁red, ▁cube}, the pieces the prompt "detect the red cube" is made of), so colours and
    categories are learnt apart and combine to unseen names. `words`: the token ids, in head order."""

    def __init__(self, ground, patch, text_tokenizer, words=None):
        self.ground, self.patch = ground, patch
        self.pieces = lambda name: text_tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        self.words = words or sorted({i for c in ground.classes for i in self.pieces(c)})
        self.word_index = {w: i for i, w in enumerate(self.words)}

    def __len__(self):
        return len(self.ground)

    def __getitem__(self, index):
        g = self.ground
        views, _, _ = g.build(index, every_object=True)
        images, words, centres, depth = [], [], [], []
        for v in views:
            cls, o, d = patch_targets(v.objects, g.size, self.patch)
            bags = np.zeros((len(v.objects) + 1, len(self.words)), np.float32)  # row 0: background
            for k, obj in enumerate(v.objects):
                bags[k + 1, [self.word_index[w] for w in self.pieces(obj.name) if w in self.word_index]] = 1.0
            images.append(v.lb.image)
            words.append(bags[cls])
            centres.append(o)
            depth.append(d)
        imgs = np.stack(images).astype(np.float32) / 127.5 - 1.0                   # (V, S, S, 3) in [-1, 1]
        return (torch.from_numpy(imgs).permute(0, 3, 1, 2), torch.from_numpy(np.stack(words)),
                torch.from_numpy(np.stack(centres)), torch.from_numpy(np.stack(depth)))


def dense_loss(head, feats, words, centre, depth, cfg):
    """feats (N, P, Dv) -> (loss, word recall on object patches, share of background patches given
    some word)."""
    out = head(feats)                                                           # (N, P, nW+3)
    logits, pred_centre, pred_depth = out[..., :-3], out[..., -3:-1], out[..., -1]
    obj = words.sum(-1) > 0                                                     # (N, P)
    weight = torch.where(obj, 1.0, cfg.background_weight)[..., None]            # (N, P, 1)
    bce = F.binary_cross_entropy_with_logits(logits, words, reduction="none")  # (N, P, nW)
    bce = (bce * weight).sum() / weight.sum()                                   # per patch, summed over words
    n_obj = obj.sum().clamp(min=1)
    reg = (cfg.centre_weight * ((pred_centre - centre).abs().sum(-1) * obj).sum()
           + ((pred_depth - depth).abs() * obj).sum()) / n_obj
    pos = logits > 0
    recall = (pos & (words > 0.5))[obj].sum() / (words > 0.5)[obj].sum().clamp(min=1)  # words found on objects
    false_bg = pos[~obj].any(-1).float().mean() if (~obj).any() else logits.new_zeros(())  # bg patches given a word
    return bce + reg, recall, false_bg


def init_loc_embeddings(model, text_tokenizer, bandwidth=20.0):
    """Give the <loc0000>..<loc1023> rows a smooth code of the value x = i / 1023 they stand for:
    row i = mean row + [w_k cos(pi k x), w_k sin(pi k x)]_k with w_k = exp(-(k / bandwidth)^2 / 2),
    so row_i . row_j depends on x_i - x_j alone (no bin is special) and falls off over a few pixels:
    neighbouring bins get similar embeddings and, through the tied LM head, similar logits.
    PaliGemma's own <loc> rows are like that after its pre-training; the tiny VLM starts from mean
    rows, where 1024 unrelated classes would each have to be learnt from their own examples."""
    from tokenizer import N_LOC, loc_tokens
    emb = model.vlm.get_input_embeddings().weight                               # (V, W), tied to the LM head
    ids = torch.tensor(text_tokenizer.convert_tokens_to_ids(loc_tokens()))
    k = torch.arange(1, emb.shape[1] // 2 + 1, dtype=torch.float64)            # W/2 frequencies
    angle = torch.pi * (torch.arange(N_LOC, dtype=torch.float64) / (N_LOC - 1))[:, None] * k  # (N_LOC, W/2)
    w = torch.exp(-0.5 * (k / bandwidth) ** 2)
    code = torch.cat([angle.cos() * w, angle.sin() * w], 1)                      # (N_LOC, W), equal norms
    with torch.no_grad():
        code = code / code.norm(dim=1, keepdim=True) * emb.norm(dim=1).median()
        emb[ids] = emb[ids].mean(0) + code.to(emb.dtype)


class DenseHead(nn.Module):
    """Reads each patch feature (N, P, Dv) -> (N, P, nW + 3): word logits, then box centre (2) and
    log depth. The word logits are SigLIP-style similarities between the *projected* patch feature
    (the VLM's own multi_modal_projector, into the decoder's width) and the decoder's own embedding
    rows of those words, so after this phase a "red" patch already points where the prompt's "red"
    token does, and the decoder's attention only has to learn to match them."""

    def __init__(self, model, words):
        super().__init__()
        self.projector, self.embed = model.vlm.model.multi_modal_projector, model.vlm.get_input_embeddings()
        self.register_buffer("words", torch.tensor(words))
        self.scale, self.bias = nn.Parameter(torch.tensor(10.0).log()), nn.Parameter(torch.tensor(-5.0))
        self.geometry = nn.Linear(model.cfg.vision["hidden_size"], 3)

    def forward(self, feats):
        img = F.normalize(self.projector(feats), dim=-1)                           # (N, P, W)
        txt = F.normalize(self.embed(self.words), dim=-1)                          # (nW, W)
        return torch.cat([img @ txt.T * self.scale.exp() + self.bias, self.geometry(feats)], -1)


def pretrain_vision(model, ground, text_tokenizer, cfg: VisionConfig, eval_ground=None, device="cpu", log=print):
    """Phase 1: train model's SigLIP tower (with the projector and the name tokens' embedding rows)
    on the dense objective, in place. Returns the held-out word recall and false background rate."""
    tower = model.vlm.model.vision_tower
    data = VisionTargets(ground, model.cfg.vision["patch_size"], text_tokenizer)
    head = DenseHead(model, data.words).to(device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
    rng = np.random.default_rng(cfg.seed)

    def batch(ds, idx):
        items = [ds[int(i)] for i in idx]
        return [torch.cat([it[k] for it in items]).to(device) for k in range(4)]  # views flattened

    tower.train()
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ground.set_epoch(step)  # fresh crops every step
        images, words, centre, depth = batch(data, rng.integers(len(data), size=cfg.batch_size))
        loss, recall, false_bg = dense_loss(head, tower(images).last_hidden_state, words, centre, depth, cfg)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):  # as trainer.train: never apply a NaN step
            raise ValueError(f"vision step {step}: loss {loss.item():.4g}, grad norm {norm.item():.4g} is not finite; "
                             "stopped before applying it (lower the learning rate)")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"vision step {step}/{cfg.steps}: loss {loss.item():.3f}, word recall {recall.item():.2f}, "
                f"false background {false_bg.item():.2f}, {step * cfg.batch_size / (time.perf_counter() - start):.1f} samples/s")
    result = {}
    if eval_ground is not None:
        result = evaluate_vision(tower, head, VisionTargets(eval_ground, data.patch, text_tokenizer, data.words), cfg, device)
        log(f"vision held-out: word recall {result['vision_word_recall']:.2f}, "
            f"false background {result['vision_false_background']:.2f}")
    tower.eval()
    return result


@torch.no_grad()
def evaluate_vision(tower, head, data, cfg, device, n=64):
    """Held-out word recall and false background rate (dense_loss's), over the first n samples."""
    data.ground.set_epoch(0)
    tower.eval()
    sums = np.zeros(2)
    for i in range(min(n, len(data))):
        images, words, centre, depth = (x.to(device) for x in data[i])
        _, recall, false_bg = dense_loss(head, tower(images).last_hidden_state, words, centre, depth, cfg)
        sums += [float(recall), float(false_bg)]
    tower.train()
    return {"vision_word_recall": sums[0] / min(n, len(data)), "vision_false_background": sums[1] / min(n, len(data))}


def default_init(args, d):
    """The checkpoint a tiny run on the built-in data starts from when no --init, --vlm, --resume,
    --data or --scratch is given: the tiny VLM (None otherwise). Other data keeps its own start: the
    tiny VLM's bins and vocabulary are fitted on the built-in world."""
    if args.init or args.resume or args.vlm or args.data or args.scratch or args.config not in (None, "tiny"):
        return None
    return tiny_vlm(args.cache, d)


def tiny_vlm(cache, d):
    """The tiny VLM's run directory in `cache`, built on first use with `pretrain.py --stage vlm`
    and its default flags (about 35 minutes on a 2-core CPU); an interrupted build leaves nothing."""
    import pretrain
    from trainer import generate_once
    return generate_once(os.path.join(cache, "tiny_vlm"),
                         lambda out: pretrain.main(["--stage", "vlm", "--cache", cache, "--out", out]), d)
