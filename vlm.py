"""The tiny configuration's own pre-trained VLM: what PaliGemma is to the paper, made on a laptop.

The paper starts every arm from PaliGemma, whose SigLIP tower already knows what objects look like
and where they are. The tiny configuration has no such checkpoint, and a tiny VLM trained from
random weights by next-token prediction alone collapses its vision tower (the image features become
the same for every image within ~30 steps at lr 1e-3, after which nothing is learned from images).
So it is made the way PaliGemma was made, a tower first and the decoder on top of it
(`python pretrain.py --stage vlm`), with two aids that make the second phase work at this size:

  1. **Vision first** (pretrain_vision): the SigLIP tower and the projector learn a dense objective
     of their own from the grounding data's 2D boxes. Each 14 px patch should become the decoder
     token `ideal_tokens` defines: on an object, its name's word embeddings plus a code of its box's
     x1, y1, x2, y2 in four slots, the code the <loc> rows also carry (init_loc_embeddings); on
     background, the <no_object> row. Image tokens and prompt words then meet in one space, and a
     box is a slot to copy.
  2. **Then the decoder** (pretrain.py's loop, `--targets boxes`: the "detect" task PaliGemma also
     knows) with the tower frozen, which protects it from the decoder's first, noisy gradients, and
     - the rows the tower aims at held fixed (hold_rows), so its frozen tokens keep meaning what
       they were trained to mean;
     - ideal tokens in place of the tower's for a share of each batch that falls from 1 to 0 over
       the first steps (Teacher, teacher_share). On the tower's imperfect tokens alone the decoder
       never starts to find the object its prompt names (three squares on noise: the median guess
       after 1800 steps); on ideal tokens it learns that lookup in a few hundred, and then carries it
       over to the tower's tokens as their share grows (RESULTS.md §2.1).

The result is a normal checkpoint that knows 2D detection but no 3D poses: stage 1, post-training
without pose pre-training and every ablation arm start from it, as they start from PaliGemma in the
paper. With `--vlm DIR` the real PaliGemma replaces it.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data import tensors
from fusion import image_to_tensor
from tokenizer import NO_OBJECT


@dataclass
class VisionConfig:
    steps: int = 3000         # ~8 CPU-minutes
    batch_size: int = 16      # grounding samples per step (x views images)
    lr: float = 1e-3
    warmup: int = 50
    background_weight: float = 0.3  # most patches are table: weigh them down so objects dominate
    slot_sharpness: float = 20.0    # cosine -> logit scale of the slot read-out: ~10 nats across 10 px
    log_every: int = 100
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# The token a patch should be: what covers it and where that object's box is

LOC_SLOTS = 4  # x1, y1, x2, y2: the <loc> rows and the patch tokens share this layout


def loc_code(x, width, bandwidth=3.0):
    """Values x (...,) in [0, 1] -> (..., width // LOC_SLOTS) unit-norm code [w_k cos(pi k x),
    w_k sin(pi k x)], k = 1..width/8, w_k = exp(-(k / bandwidth)^2 / 2): code(a) . code(b) depends on
    a - b alone and peaks at a = b, a bump some 3 % of the image wide."""
    k = torch.arange(1, width // (2 * LOC_SLOTS) + 1, dtype=torch.float32, device=x.device)
    angle = torch.pi * x[..., None].float() * k
    w = torch.exp(-0.5 * (k / bandwidth) ** 2)
    code = torch.cat([angle.cos() * w, angle.sin() * w], -1)
    return code / code.norm(dim=-1, keepdim=True)


def init_loc_embeddings(model, text_tokenizer):
    """Give <loc0000>..<loc1023> rows the code of the value x = i / 1023 they stand for, repeated in
    each of the LOC_SLOTS quarter-width slots: row i = mean row + s [c(x), c(x), c(x), c(x)]. Through
    the tied LM head, a hidden state that carries c(x*) in any one slot scores the bins by
    c(x_i) . c(x*), a bump at x*: writing a coordinate a patch token holds (patch_tokens) is then a
    linear copy of one slot. The tiny VLM's decoder starts from mean rows otherwise, where 1024
    unrelated classes would each have to be learnt from their own examples."""
    from tokenizer import N_LOC, loc_tokens
    emb = model.vlm.get_input_embeddings().weight                               # (V, W), tied to the LM head
    ids = torch.tensor(text_tokenizer.convert_tokens_to_ids(loc_tokens()))
    code = loc_code(torch.arange(N_LOC) / (N_LOC - 1), emb.shape[1]).repeat(1, LOC_SLOTS)  # (N_LOC, W), norm 2
    with torch.no_grad():
        emb[ids] = emb[ids].mean(0) + (code * emb.norm(dim=1).median() / 2).to(emb.dtype)


def patch_targets(objects, size, patch):
    """Dense targets of one view from its labelled objects (ObjectPose, view pixels).

    Returns cls (P,) int64 (0 = background, k = objects[k-1] covers the patch centre; the nearer
    object wins where boxes overlap) and box (P, 4) float32 (that object's x1, y1, x2, y2 / size,
    0 on background). P = (size/patch)^2, row-major like the tower's patch tokens."""
    n = size // patch
    centre = (np.arange(n) + 0.5) * patch - 0.5                                 # patch centres, pixel coords
    u, v = np.meshgrid(centre, centre)                                          # (n, n) each, row-major
    cls = np.zeros((n, n), np.int64)
    box = np.zeros((n, n, 4), np.float32)
    for k in sorted(range(len(objects)), key=lambda k: -objects[k].t[2]):      # far first, near overwrites
        x1, y1, x2, y2 = objects[k].box2d
        inside = (u >= x1) & (u <= x2) & (v >= y1) & (v <= y2)
        cls[inside] = k + 1
        box[inside] = np.clip(np.array([x1, y1, x2, y2]) / size, 0, 1)
    return cls.ravel(), box.reshape(-1, 4)


class VisionTargets(torch.utils.data.Dataset):
    """Per sample of a GroundingDataset: its views' images and, per patch, the bag of the text tokens
    of the covering object's name (" red cube" -> {▁red, ▁cube}: the pieces the prompt "detect the red
    cube" is made of) and that object's box, for *every* labelled object in the view (stage 1 lists
    only the queried class; here the tower must see them all). `words`: the token ids, in bag order."""

    def __init__(self, ground, patch, text_tokenizer, words=None):
        self.ground, self.patch = ground, patch
        self.text_tokenizer = text_tokenizer  # (a plain attribute: DataLoader workers pickle this)
        self.words = words or sorted({i for c in ground.classes for i in self.pieces(c)})
        self.word_index = {w: i for i, w in enumerate(self.words)}

    def pieces(self, name):
        return self.text_tokenizer(" " + name, add_special_tokens=False)["input_ids"]

    def __len__(self):
        return len(self.ground)

    def __getitem__(self, index):
        """(images (V, 3, S, S) in [-1, 1], word bags (V, P, nW), boxes (V, P, 4)) of one sample."""
        views, _, _ = self.ground.build(index, every_object=True)
        images = torch.from_numpy(np.stack([image_to_tensor(v.lb.image) for v in views]))
        return (images, *self.labels(views))

    def labels(self, views):
        """(word bags (V, P, nW), boxes (V, P, 4)) of views that list every object
        (GroundingDataset.build(..., every_object=True))."""
        return word_bags([v.objects for v in views], self.ground.size, self.patch, self.word_index, self.pieces)


def word_bags(object_lists, size, patch, word_index, pieces):
    """Per view (a list of ObjectPose) and patch (patch_targets), the bag of the covering object's name
    pieces (those in word_index, in its order) and that object's box: (V, P, nW) and (V, P, 4) tensors.
    pieces: name -> its text token ids."""
    words, boxes = [], []
    for objects in object_lists:
        cls, box = patch_targets(objects, size, patch)
        bags = np.zeros((len(objects) + 1, len(word_index)), np.float32)        # row 0: background
        for k, obj in enumerate(objects):
            bags[k + 1, [word_index[w] for w in pieces(obj.name) if w in word_index]] = 1.0
        words.append(bags[cls])
        boxes.append(box)
    return torch.from_numpy(np.stack(words)), torch.from_numpy(np.stack(boxes))


def ideal_tokens(word_rows, background_row, words, box):
    """The decoder-space token each patch should become: on an object, the sum of its name's
    embedding rows plus the loc_code of its box's x1, y1, x2, y2 in the LOC_SLOTS slots, both parts
    of norm ~sqrt(W) like a normalised token; on background, the <no_object> row at half that norm.
    word_rows (nW, W) the rows of the bag's words, words (N, P, nW) bags, box (N, P, 4) -> (N, P, W).
    With patches like these the decoder only has to learn to find the patch its prompt names and to
    copy one slot: on three squares on noise that takes it ~300 steps from these tokens, while from
    features trained otherwise it had not started after 1800 (RESULTS.md §2.1)."""
    W = word_rows.shape[1]
    name = F.normalize(words @ word_rows, dim=-1) * W ** 0.5                    # (N, P, W)
    code = loc_code(box, W).flatten(-2) * (W / LOC_SLOTS) ** 0.5                # (N, P, W), norm sqrt(W)
    background = F.normalize(background_row, dim=0) * W ** 0.5 / 2
    return torch.where(words.sum(-1, keepdim=True) > 0, name + code, background)


def patch_tokens(model, word_ids, words, box, background_id):
    """ideal_tokens from the model's current rows, detached: the decoder's embeddings are the fixed
    point the tower moves to."""
    emb = model.vlm.get_input_embeddings().weight.detach()                      # (V, W)
    return ideal_tokens(emb[word_ids], emb[background_id], words, box)


def token_loss(pred, target, words, box, cfg):
    """Per patch, 1 - cosine to its target plus the squared log ratio of the norms (object patches
    weight 1, background cfg.background_weight); on object patches, plus the cross-entropy of each
    slot's box coordinate read the way the decoder will read it (slot . loc_code of every bin, cosine
    x cfg.slot_sharpness). Without the slot term the name part, the easier half of the target, takes
    the gradient and the position code is not learnt; without the norm term object tokens come out
    smaller than background ones and are washed out by the decoder's first layer."""
    from tokenizer import N_LOC
    obj = words.sum(-1) > 0                                                     # (N, P)
    weight = torch.where(obj, 1.0, cfg.background_weight)
    err = 1 - F.cosine_similarity(pred, target, dim=-1)                         # (N, P)
    err = err + torch.log(pred.norm(dim=-1) / target.norm(dim=-1)) ** 2          # and its norm
    loss = (err * weight).sum() / weight.sum()
    if obj.any():
        grid = loc_code(torch.arange(N_LOC, device=pred.device) / (N_LOC - 1), pred.shape[-1])  # (N_LOC, W/4)
        slots = F.normalize(pred[obj].view(int(obj.sum()), LOC_SLOTS, -1), dim=-1)  # (n, 4, W/4)
        bins = (box[obj] * (N_LOC - 1)).round().long()                          # (n, 4)
        loss = loss + F.cross_entropy((slots @ grid.T * cfg.slot_sharpness).flatten(0, 1), bins.flatten())
    return loss


@torch.no_grad()
def token_metrics(model, pred, words, box, word_ids):
    """What the decoder will read off the predicted tokens, on object patches: the share whose name
    part is nearest (cosine) to their own object's name among the names in the batch, and the median
    error (in image widths) of the box centre decoded from the slots by the <loc> code's argmax."""
    from tokenizer import N_LOC
    obj = words.sum(-1) > 0
    if not obj.any():
        return float("nan"), float("nan")
    emb = model.vlm.get_input_embeddings().weight
    W, p, w, b = emb.shape[1], pred[obj], words[obj], box[obj]                  # (n, W), (n, nW), (n, 4)
    names, own = torch.unique(w, dim=0, return_inverse=True)                    # the distinct names
    sim = F.normalize(p, dim=-1) @ F.normalize(names @ emb[word_ids], dim=-1).T  # (n, n_names)
    grid = loc_code(torch.arange(N_LOC, device=p.device) / (N_LOC - 1), W)      # (N_LOC, W/4)
    slots = p.view(len(p), LOC_SLOTS, -1) @ grid.T                              # (n, 4, N_LOC)
    decoded = slots.argmax(-1) / (N_LOC - 1)                                    # (n, 4)
    centre_err = ((decoded[:, :2] + decoded[:, 2:]) / 2 - (b[:, :2] + b[:, 2:]) / 2).norm(dim=-1)
    return float((sim.argmax(-1) == own).float().mean()), float(centre_err.median())


def pretrain_vision(model, ground, text_tokenizer, cfg: VisionConfig, eval_ground=None, device="cpu", log=print):
    """Phase 1: train model's SigLIP tower and projector to turn each patch into its patch_tokens
    target, in place. Returns the held-out name accuracy and centre error (token_metrics)."""
    tower, projector = model.vlm.model.vision_tower, model.vlm.model.multi_modal_projector
    data = VisionTargets(ground, model.cfg.vision["patch_size"], text_tokenizer)
    word_ids = torch.tensor(data.words, device=device)
    background_id = text_tokenizer.convert_tokens_to_ids(NO_OBJECT)
    params = list(tower.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
    rng = np.random.default_rng(cfg.seed)
    tokens = lambda images: projector(tower(images).last_hidden_state)          # noqa: E731  (N, P, W)

    tower.train()
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ground.set_epoch(step)  # fresh crops every step
        items = [data[int(i)] for i in rng.integers(len(data), size=cfg.batch_size)]
        images, words, box = (torch.cat([it[k] for it in items]).to(device) for k in range(3))  # views flattened
        pred = tokens(images)
        loss = token_loss(pred, patch_tokens(model, word_ids, words, box, background_id), words, box, cfg)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):  # as the training loops: never apply a NaN step
            raise ValueError(f"vision step {step}: loss {loss.item():.4g}, grad norm {norm.item():.4g} is not finite; "
                             "stopped before applying it (lower the learning rate)")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.steps:
            name_acc, centre_err = token_metrics(model, pred, words, box, word_ids)
            log(f"vision step {step}/{cfg.steps}: loss {loss.item():.3f}, name accuracy {name_acc:.2f}, "
                f"centre error {centre_err * ground.size:.1f} px, "
                f"{step * cfg.batch_size / (time.perf_counter() - start):.1f} samples/s")
    result = {}
    if eval_ground is not None:
        result = evaluate_vision(model, tokens, VisionTargets(eval_ground, data.patch, text_tokenizer, data.words),
                                 word_ids, device)
        log(f"vision held-out: name accuracy {result['vision_name_accuracy']:.2f}, "
            f"centre error {result['vision_centre_px']:.1f} px")
    tower.eval()
    return result


@torch.no_grad()
def evaluate_vision(model, tokens, data, word_ids, device, n=64):
    """token_metrics over the first n held-out samples' object patches."""
    data.ground.set_epoch(0)
    model.eval()
    items = [data[i] for i in range(min(n, len(data)))]
    images, words, box = (torch.cat([it[k] for it in items]).to(device) for k in range(3))
    pred = torch.cat([tokens(images[i:i + 32]) for i in range(0, len(images), 32)])
    name_acc, centre_err = token_metrics(model, pred, words, box, word_ids)
    model.train()
    return {"vision_name_accuracy": name_acc, "vision_centre_px": centre_err * data.ground.size}


# ----------------------------------------------------------------------------------------------
# Phase 2: the decoder learns to read the tower

def held_rows(text_tokenizer, words):
    """The embedding rows the tower's tokens are aimed at (patch_tokens): the objects' name words,
    the <loc> rows and <no_object>. The decoder phase keeps them fixed (hold_rows)."""
    from tokenizer import loc_tokens
    return sorted(set(words) | set(text_tokenizer.convert_tokens_to_ids(loc_tokens() + [NO_OBJECT])))


def hold_rows(model, rows):
    """Zero the gradient of these embedding (= tied LM head) rows from now on. Were they to move,
    the tower's frozen tokens would point at where the rows were, and the decoder would have to
    track a moving code; with them fixed, the lookup the decoder learns on ideal tokens (Teacher)
    carries over to the tower's."""
    weight = model.vlm.get_input_embeddings().weight
    keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[rows] = 0
    weight.register_hook(lambda grad: grad * keep)


class Teacher(torch.utils.data.Dataset):
    """A GroundingDataset whose items also carry `teacher_tokens` (V, P, W): the patch_tokens of
    their views, the ideal image tokens the tower was trained to produce. pretrain.py's decoder
    phase feeds them instead of the tower's tokens to a share of each batch that falls from 1 to 0
    (teacher_share): reading ideal tokens, the decoder learns to find the patch its prompt names in
    a few hundred steps; from the tower's imperfect tokens alone it does not start (RESULTS.md §2.1).
    The rows are snapshotted: hold_rows keeps them fixed while this dataset is used."""

    def __init__(self, ground, model, text_tokenizer):
        self.ground, self.targets = ground, VisionTargets(ground, model.cfg.vision["patch_size"], text_tokenizer)
        self.sizes, self.classes = ground.sizes, ground.classes
        emb = model.vlm.get_input_embeddings().weight.detach().float().cpu()
        self.word_rows, self.background_row = (emb[self.targets.words],
                                               emb[text_tokenizer.convert_tokens_to_ids(NO_OBJECT)])

    def __len__(self):
        return len(self.ground)

    def set_epoch(self, epoch):
        self.ground.set_epoch(epoch)

    def describe(self, index):
        return self.ground.describe(index)

    def __getitem__(self, index):
        return self.ground.fetch(index, self.item)  # the epoch, --skip-bad and NaN rules of the ground's own items

    def item(self, index):
        """The ground's item for sample `index` plus its teacher tokens, both from one build (one image
        load, one set of crops): the views list every object, the prompt and target are the sample's."""
        views, prompt, target = self.ground.build(index, every_object=True)
        words, box = self.targets.labels(views)
        return {**tensors(views, self.ground.size), "prompt": prompt, "target": target,
                "teacher_tokens": ideal_tokens(self.word_rows, self.background_row, words, box).numpy()}


def teacher_share(step, steps):
    """Share of a batch that reads ideal tokens at `step`: 1 -> 0 linearly over `steps`."""
    return max(0.0, 1.0 - step / steps) if steps else 0.0


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
