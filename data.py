"""Training samples for Pose-VLA: pseudo multi-view grounding, robot chunks, collation.

method.md §7 (training data), §3 (target text), §10 (formats, read in formats.py, lerobot.py and robotwin.py).
  - GroundingDataset (pre-training stage 1): one item = one (image, class). The image becomes a
    near-full "head" crop and two "wrist" crops, each letterboxed with its own K; the target lists
    every instance of the class per view, or is a negative (10 %) for an absent class.
  - RobotDataset (stage 2 and post-training): views at frame t, state, the next H actions at a
    frame stride with is_pad, the instruction, and optionally the trajectory target (future
    end-effector waypoints in each camera's frame, waypoints.py), z-scored by stats.py's Stats.
  - Collator (batch dict for model.py), fit_bins, and the CLI: `show`, `fit-bins`, `bench`.
    Mixing datasets (n^0.43) and the DataLoader are in loading.py.
Randomness is a pure function of (seed, epoch, index), so a resumed run sees the same samples.
"""
import argparse
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from errors import BAD_INPUT, at_least, cli
from formats import GROUNDING_FORMATS, ROBOT_FORMATS, detect_format, load_scenes
from draw import draw_views
from fusion import box_corners, depth_prior, image_to_tensor, letterbox, project, ray_map
from loading import MixtureSampler, make_loader
from robot_formats import RobotSource, open_source
from stats import source_stats
from tokenizer import ObjectPose, PoseBins, PoseTokenizer, Waypoint
from waypoints import view_waypoints

# ----------------------------------------------------------------------------- views
@dataclass
class ViewConfig:
    head_scale: tuple = (0.9, 1.0)  # method.md §7.3: near-full head crop (side length fraction)
    wrist_scale: tuple = (0.25, 0.65)  # method.md §7.3: smaller wrist crops
    # method.md §7.3's 2D box filter, read so that what the model can see is labelled: the box's longer side
    # >= min_box_px and its shorter side >= min_side_px, both in the letterboxed view the model sees
    # (1440 px ARKit -> 224: 10 source px ~ 1.5 px) and in source pixels (no passing by upsampling).
    # A plain "both sides >= 10 px" drops a thin or half-cropped object the model still sees.
    min_box_px: float = 10.0
    min_side_px: float = 3.0
    wrist_focus: float = 0.5  # [ours] wrist crops centre on a random instance with this probability,
    # so close-ups usually show the queried object instead of empty table


@dataclass
class View:
    """One letterboxed view plus what drawing/tests need: K (letterboxed), source crop box."""
    lb: object  # fusion.Letterboxed
    crop: tuple  # (x0, y0, x1, y1) in source pixels
    objects: list  # list[ObjectPose] or list[Waypoint] in this view
    has_K: bool = True  # False: intrinsics unknown, so no ray map


def _crop(rng, W, H, scale, focus=None):
    s = rng.uniform(*scale)
    cw, ch = max(1, int(round(s * W))), max(1, int(round(s * H)))
    if focus is None:
        x0, y0 = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
    else:  # centre near the focus point, jittered by up to half the crop size
        x0 = focus[0] - cw / 2 + rng.uniform(-0.5, 0.5) * cw
        y0 = focus[1] - ch / 2 + rng.uniform(-0.5, 0.5) * ch
    x0, y0 = int(round(np.clip(x0, 0, W - cw))), int(round(np.clip(y0, 0, H - ch)))
    return x0, y0, x0 + cw, y0 + ch


def _letterbox_crop(image, K, depth, crop, size):
    x0, y0, x1, y1 = crop
    Kc = np.array(K, dtype=np.float64)
    Kc[:2, 2] -= (x0, y0)  # the principal point moves with the crop's corner
    return letterbox(image[y0:y1, x0:x1], Kc, size, depth=None if depth is None else depth[y0:y1, x0:x1])


def source_box(obj, K, W, H):
    """The annotated 2D box, or the projected 3D box clipped to the image."""
    if obj.box2d is not None:
        return np.asarray(obj.box2d, float)
    corners = box_corners(obj.t, obj.R, obj.size)
    if np.any(corners[:, 2] <= 0):
        return None
    uv = project(K, corners)
    return np.clip(np.r_[uv.min(0), uv.max(0)], 0, [W, H, W, H])


def tensors(views, size):
    """Per-view arrays of the sample format (images, rays, depth priors and their flags)."""
    out = {"images": np.stack([image_to_tensor(v.lb.image) for v in views]),  # (V, 3, S, S)
           "view_mask": np.ones(len(views), bool),
           "rays": np.zeros((len(views), 3, size, size), np.float32), "has_rays": np.zeros(len(views), bool),
           "depth": np.zeros((len(views), 2, size, size), np.float32), "has_depth": np.zeros(len(views), bool)}
    for i, v in enumerate(views):
        if v.has_K:
            out["rays"][i], out["has_rays"][i] = ray_map(v.lb.K, v.lb.valid), True
        if v.lb.depth is not None:
            out["depth"][i] = depth_prior(v.lb.depth, v.lb.valid)
            out["has_depth"][i] = bool(out["depth"][i, 1].any())
    return out


class _Resilient(torch.utils.data.Dataset):
    """Shared epoch handling, and what happens to a bad sample: one that cannot be read (BAD_INPUT)
    or holds NaN/inf in any array raises an error naming its file, episode, frame and key; with
    `skip_bad` it is replaced by the next good sample instead, with a warning. Each item's "skipped"
    counts the samples skipped to reach it (the Collator sums them per batch, so the count reaches
    the training log from DataLoader workers too)."""
    seed, epoch, skip_bad = 0, 0, False

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def rng(self, index):
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index):
        """index: an int (the epoch set by set_epoch), or (epoch, index) as batches.EpochSampler
        yields them to DataLoader workers, which set_epoch in the main process cannot reach."""
        return self.fetch(index, self.item)

    def fetch(self, index, make):
        """make(i), a sample's item dict, for `index` as __getitem__ takes it, with the epoch handling
        and the bad-sample rules above (vlm.Teacher makes its own items through it)."""
        if isinstance(index, tuple):
            epoch, index = index
            self.set_epoch(epoch)
        for k in range(len(self) if self.skip_bad else 1):
            i = (index + k) % len(self)
            try:
                return {**self._finite(make(i), i), "skipped": k}
            except BAD_INPUT as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"--skip-bad: skipping sample {i}: {e}")
        raise ValueError(f"every one of the {len(self)} samples failed to load")

    def _finite(self, item, index):
        for key, value in item.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"{self.describe(index)}: sample {index} has NaN/inf in '{key}'; expected finite "
                                 "values (check the source's camera intrinsics/extrinsics, state and action)")
        return item


# ----------------------------------------------------------------------------- grounding
class GroundingDataset(_Resilient):
    """Pseudo multi-view grounding samples (method.md §7.3, pre-training stage 1). targets: "poses" (pose
    tuples) or "boxes" (names and 2D boxes only: the semantic baseline of ablation.py)."""

    def __init__(self, paths, pose_tokenizer, image_size, n_views=3, neg_frac=0.1, seed=0,
                 split="train", names=None, views=None, skip_bad=False, targets="poses"):
        paths = [paths] if isinstance(paths, str) else list(paths)
        _check_tokenizer(pose_tokenizer, image_size)
        if targets not in ("poses", "boxes"):
            raise ValueError(f"targets must be 'poses' or 'boxes', got {targets!r}")
        self.targets = targets
        self.tok, self.size, self.n_views, self.neg_frac = pose_tokenizer, int(image_size), n_views, neg_frac
        self.seed, self.cfg, self.skip_bad = seed, views or ViewConfig(), skip_bad
        self.scenes, self.samples, self.sizes = [], [], []
        for p in paths:  # each reader refuses a dataset without a usable object
            start = len(self.samples)
            for im in load_scenes(p, split, names, skip_bad):
                for name in sorted({object_label(o.name) for o in im.objects}):
                    self.samples.append((len(self.scenes), name))
                self.scenes.append(im)
            self.sizes.append(len(self.samples) - start)
        self.classes = sorted({name for _, name in self.samples})

    def __len__(self):
        return len(self.samples)

    def describe(self, index):
        scene_idx, name = self.samples[index]
        return f"{self.scenes[scene_idx].image_path} ('{name}', from {self.scenes[scene_idx].source})"

    def build(self, index, every_object=False):
        """(views, prompt, target) for one sample; views carry K and the listed ObjectPoses.
        every_object: views list every labelled object they show, not only the queried class (the
        tiny VLM's dense vision targets, vlm.py), even in a negative; prompt and target are the same."""
        rng = self.rng(index)
        scene_idx, name = self.samples[index]
        im = self.scenes[scene_idx]
        image, depth = im.load()
        H, W = image.shape[:2]
        present = {object_label(o.name) for o in im.objects}
        negative = rng.random() < self.neg_frac and self._absent_class(rng, present)
        mine = [o for o in im.objects if object_label(o.name) == name]
        views = []
        for v in range(self.n_views):  # view 0: head crop; then wrist crops, maybe around an instance
            focus = None
            if v > 0 and rng.random() < self.cfg.wrist_focus:
                box = source_box(mine[rng.integers(len(mine))], im.K, W, H)
                focus = None if box is None else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            crop = _crop(rng, W, H, self.cfg.wrist_scale if v else self.cfg.head_scale, focus)
            lb = _letterbox_crop(image, im.K, depth, crop, self.size)
            listed = im.objects if every_object else [] if negative else mine
            views.append(View(lb, crop, self._objects(listed, im.K, W, H, crop, lb)))
        if negative:
            return views, f"detect the {negative}", self.tok.encode_negative(negative, self.n_views)
        encode = self.tok.encode_objects if self.targets == "poses" else self.tok.encode_boxes
        return views, f"detect the {name}", encode([[o for o in v.objects if o.name == name] for v in views])

    def _objects(self, objs, K, W, H, crop, lb):
        x0, y0, x1, y1 = crop
        out = []
        for o in objs:
            box = source_box(o, K, W, H)
            if box is None:
                continue
            b = np.clip(box - [x0, y0, x0, y0], 0, [x1 - x0, y1 - y0] * 2)
            sides = sorted((b[2] - b[0], b[3] - b[1]))
            shrink = min(1.0, lb.scale)
            if sides[1] * shrink < self.cfg.min_box_px or sides[0] * shrink < self.cfg.min_side_px:
                continue  # not visible in this crop, or too small to anchor (in source and view pixels)
            b = b * lb.scale + np.r_[lb.offset, lb.offset]
            out.append(ObjectPose(object_label(o.name), tuple(b), o.t, o.size, o.R))
        return out

    def _absent_class(self, rng, present):
        words = {w for p in present for w in p.split()}
        cands = [c for c in self.classes if not words & set(c.split())]
        return str(cands[rng.integers(len(cands))]) if cands else None

    def item(self, index):
        views, prompt, target = self.build(index)
        return {**tensors(views, self.size), "prompt": prompt, "target": target}


def _check_tokenizer(tok, image_size):
    if tok is None or tok.image_size != int(image_size):
        raise ValueError(f"pose tokenizer image_size {getattr(tok, 'image_size', None)} must equal the "
                         f"dataset image_size {image_size} (loc tokens are pixel / size)")


def object_label(name):
    return " ".join(str(name).replace("_", " ").split())


# ----------------------------------------------------------------------------- robot samples
class RobotDataset(_Resilient):
    """Robot samples: views at frame t, state, the next `chunk` actions every `stride` frames
    (is_pad past the episode end, padded with the last action), instruction prompt, and with
    `trajectory=True` the stage-2 waypoint target. `stats`: None (raw values), a Stats applied to
    every dataset, or "auto" (each dataset's own cached Stats). `episodes`: use only the first N
    episodes of each dataset (few-demonstration experiments). `paths` may hold sources already
    opened by robot_formats.open_source (then used as they are: not opened twice)."""

    def __init__(self, paths, image_size, chunk=16, stride=3, cameras=("head", "left_wrist", "right_wrist"),
                 pose_tokenizer=None, trajectory=False, stats=None, traj=None, seed=0,
                 skip_bad=False, cache_dir=None, episodes=None):
        paths = [paths] if isinstance(paths, str) else list(paths)
        if trajectory:
            _check_tokenizer(pose_tokenizer, image_size)
        self.size, self.chunk, self.stride, self.tok = int(image_size), chunk, stride, pose_tokenizer
        self.trajectory, self.traj, self.seed, self.skip_bad = trajectory, traj, seed, skip_bad
        self.sources = [open_source(p, episodes, skip_bad) if isinstance(p, str) else p for p in paths]
        self.cameras = [[s.resolve_camera(c) for c in cameras] for s in self.sources]
        self.stats = [source_stats(s, cache_dir) if stats == "auto" else stats for s in self.sources]
        self.index, self.sizes = [], []
        for si, s in enumerate(self.sources):
            self.index += [(si, ei, t) for ei, e in enumerate(s.episodes) for t in range(len(e.state))]
            self.sizes.append(sum(len(e.state) for e in s.episodes))
            if trajectory and s.ee16:
                self._check_cameras(si)

    def _check_cameras(self, si):
        """Trajectory targets need both intrinsics and extrinsics of every view."""
        s = self.sources[si]
        for cam in self.cameras[si]:
            for name, value in zip(("intrinsics", "extrinsics"), s.camera(0, 0, cam)):
                if value is None:
                    raise ValueError(f"{s.path}: camera '{cam}' has no {name} (e.g. "
                                     f"'observation.{name}.{cam}'); trajectory targets need them")

    def __len__(self):
        return len(self.index)

    def describe(self, index):
        si, ei, t = self.index[index]
        return f"{self.sources[si].path}: episode {ei} frame {t}"

    def build(self, index):
        """(views, prompt, target, state, actions, is_pad) for one sample."""
        si, ei, t = self.index[index]
        s, ep = self.sources[si], self.sources[si].episodes[ei]
        frames = [s.frame(ei, t, cam) for cam in self.cameras[si]]
        views = [View(letterbox(f.image, np.eye(3) if f.K is None else f.K, self.size, depth=f.depth),
                      (0, 0, f.image.shape[1], f.image.shape[0]), [], f.K is not None) for f in frames]
        steps = t + self.stride * np.arange(self.chunk)
        is_pad = steps >= len(ep.action)
        actions = ep.action[np.minimum(steps, len(ep.action) - 1)]  # (H, Da)
        tasks = ep.tasks or [""]
        prompt = tasks[self.rng(index).integers(len(tasks))]
        target = ""
        if self.trajectory and s.ee16:
            for f, v, cam in zip(frames, views, self.cameras[si]):
                v.objects += [Waypoint(name, uv * v.lb.scale + np.asarray(v.lb.offset), pc, Rc) for name, uv, pc, Rc
                              in view_waypoints(ep.action, t, f.K, f.cam2world, f.image.shape[:2], cam, self.traj)]
            target = self.tok.encode_trajectory([v.objects for v in views])
        return views, prompt, target, ep.state[t], actions, is_pad

    def item(self, index):
        views, prompt, target, state, actions, is_pad = self.build(index)
        stats = self.stats[self.index[index][0]]
        if stats is not None:
            where = self.sources[self.index[index][0]].path
            state, actions = stats.normalize(state, "state", where), stats.normalize(actions, "action", where)
        return {**tensors(views, self.size), "prompt": prompt, "target": target,
                "state": np.asarray(state, np.float32), "actions": np.asarray(actions, np.float32),
                "is_pad": is_pad}


def open_datasets(paths, kind=None, **kwargs):
    """One dataset over all `paths` (formats detected); kind 'grounding' or 'robot' (default: from
    the formats). `dataset.sizes` gives per-path sizes for the MixtureSampler."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    fmts = [detect_format(p) for p in paths]
    kinds = {"grounding" if f in GROUNDING_FORMATS else "robot" for f in fmts}
    kind = kind or (kinds.pop() if len(kinds) == 1 else None)
    if kind not in ("grounding", "robot") or any(
            (f in GROUNDING_FORMATS) != (kind == "grounding") for f in fmts):
        raise ValueError(f"cannot mix formats {dict(zip(paths, fmts))} as kind={kind!r}; grounding "
                         f"uses {GROUNDING_FORMATS}, robot uses {ROBOT_FORMATS}")
    return (GroundingDataset if kind == "grounding" else RobotDataset)(paths, **kwargs)


# ----------------------------------------------------------------------------- collation
class Collator:
    """List of items -> batch dict for model.py. Prompt = <bos> + prompt + "\\n" (PaliGemma's
    prefix format); label = target + <eos>. Whether a batch has labels is decided here, once: a
    batch where no item has a target (flow-only stage 2, inference) gets no label keys at all, so
    the model runs no NTP; in a mixed batch the empty targets get an all-False label_mask. `state`
    comes with every item that has one (inference has a state but no actions); `actions`/`is_pad`
    with items that have actions. "skipped": the samples --skip-bad left out to fill this batch
    (an int)."""

    def __init__(self, text_tokenizer, max_dim=32):
        self.tok, self.max_dim = text_tokenizer, max_dim
        self.bos = [text_tokenizer.bos_token_id] if text_tokenizer.bos_token_id is not None else []
        self.eos, self.pad = text_tokenizer.eos_token_id, text_tokenizer.pad_token_id or 0

    def _ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _pad(self, seqs):
        ids = torch.full((len(seqs), max(1, max(map(len, seqs)))), self.pad, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), True
        return ids, mask

    def _dim(self, x, key):
        if x.shape[-1] > self.max_dim:
            raise ValueError(f"Collator: {key} has width {x.shape[-1]} > max_dim {self.max_dim}")
        return np.concatenate([x, np.zeros(x.shape[:-1] + (self.max_dim - x.shape[-1],), np.float32)], -1)

    def __call__(self, items):
        V = max(len(it["images"]) for it in items)
        batch = {}
        for key in ("images", "view_mask", "rays", "has_rays", "depth", "has_depth"):
            arrs = [it[key] for it in items]
            pad = [np.zeros((V - len(a),) + a.shape[1:], a.dtype) for a in arrs]
            batch[key] = torch.from_numpy(np.stack([np.concatenate([a, p]) for a, p in zip(arrs, pad)]))
        batch["prompt_ids"], batch["prompt_mask"] = self._pad([self.bos + self._ids(it["prompt"] + "\n")
                                                               for it in items])
        if any(it["target"] for it in items):
            labels = [self._ids(it["target"]) + [self.eos] if it["target"] else [] for it in items]
            batch["label_ids"], batch["label_mask"] = self._pad(labels)
        batch["skipped"] = sum(it.get("skipped", 0) for it in items)
        if all("teacher_tokens" in it for it in items):  # vlm.Teacher's ideal image tokens
            batch["teacher_tokens"] = torch.from_numpy(np.stack([it["teacher_tokens"] for it in items]))
        if all("state" in it for it in items):
            batch["state"] = torch.from_numpy(np.stack([self._dim(it["state"], "state") for it in items]))
        if all("actions" in it for it in items):
            batch["actions"] = torch.from_numpy(np.stack([self._dim(it["actions"], "actions") for it in items]))
            batch["is_pad"] = torch.from_numpy(np.stack([it["is_pad"] for it in items]))
        return batch


def split_paths(text):
    """A comma-separated --data/--eval-data flag -> list of paths (None or "" -> [])."""
    return [p for p in (text or "").split(",") if p]


# ----------------------------------------------------------------------------- bins, drawing, CLI
def fit_bins(paths, n_bins=2048, split="train", names=None, traj=None, frame_step=1, skip_bad=False):
    """PoseBins from the training annotations (method.md §3.3): grounding objects (translations and sizes) and
    the robot trajectory waypoints as the targets list them (view_waypoints with each frame's own
    camera pose), at every `frame_step`-th frame of each episode (1: all frames). `paths` may hold
    robot sources already opened (RobotSource), read as they are. skip_bad: as the training datasets
    read them (unreadable images and episodes left out)."""
    trans, sizes, items = [], [], [paths] if isinstance(paths, (str, RobotSource)) else list(paths)
    for p in items:
        if isinstance(p, str) and detect_format(p) in GROUNDING_FORMATS:
            objs = [o for im in load_scenes(p, split, names, skip_bad) for o in im.objects]
            trans += [o.t for o in objs]
            sizes += [o.size for o in objs]
            continue
        src = p if isinstance(p, RobotSource) else open_source(p, skip_bad=skip_bad)
        for ei, ep in enumerate(src.episodes):
            for cam in src.cameras if src.ee16 else []:
                hw = src.frame(ei, 0, cam, want_depth=False).image.shape[:2]
                for t in range(0, len(ep.action), frame_step):
                    K, T = src.camera(ei, t, cam)
                    if K is not None and T is not None:
                        trans += [w[2] for w in view_waypoints(ep.action, t, K, T, hw, cam, traj)]
    if not trans:
        where = ", ".join(getattr(p, "path", p) for p in items)
        raise ValueError(f"{where}: no object or end-effector poses to fit bins on")
    return PoseBins.fit(np.array(trans), np.array(sizes) if sizes else None, n_bins=n_bins)


def dataset_for(args):
    """(dataset, view names) for `show` and `bench`. Grounding data: pseudo-views with pose-tuple
    targets (bins from --bins or fitted on the data). Robot data: the --cameras views (default: the
    first dataset's own cameras), with the waypoint target only where every dataset has end-effector
    poses and those cameras' poses to write it: bins are needed, and fitted, only then."""
    kw = dict(image_size=args.image_size, skip_bad=args.skip_bad)

    def bins():
        return PoseBins.load(args.bins) if args.bins else fit_bins(args.data, args.n_bins, skip_bad=args.skip_bad)
    if detect_format(args.data[0]) in GROUNDING_FORMATS:
        if args.cameras:
            raise ValueError("--cameras selects robot cameras; grounding samples are pseudo-views of one image")
        ds = open_datasets(args.data, "grounding", pose_tokenizer=PoseTokenizer(bins(), args.image_size), **kw)
        return ds, ["head crop", "wrist crop", "wrist crop"][:ds.n_views]
    srcs = [open_source(p, skip_bad=args.skip_bad) for p in args.data]
    pairs = [c.split("=", 1) if "=" in c else (c, c) for c in args.cameras.split(",")] if args.cameras else \
        [(c, c) for c in srcs[0].cameras]
    cams = [cam for _, cam in pairs]
    posed = all(s.ee16 and all(v is not None for c in cams for v in s.camera(0, 0, s.resolve_camera(c))) for s in srcs)
    ds = open_datasets(args.data, "robot", cameras=cams, trajectory=posed,
                       pose_tokenizer=PoseTokenizer(bins(), args.image_size) if posed else None,
                       stats="auto" if args.cmd == "bench" else None, **kw)
    return ds, [view for view, _ in pairs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, text in (("show", "draw one sample's views and target text to a PNG"),
                       ("fit-bins", "fit PoseBins (translation/size bin edges) and save them as JSON"),
                       ("bench", "measure loading speed in samples/s with DataLoader workers")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--data", nargs="+", required=True, help="dataset path(s); format detected")
        p.add_argument("--image-size", type=at_least(1), default=112, help="model image size (tiny: 112)")
        p.add_argument("--n-bins", type=at_least(1), default=256, help="bins per pose quantity (full model: 2048)")
        p.add_argument("--bins", default=None, help="bins JSON to use instead of fitting (show/bench; only "
                                                    "data with poses to write needs bins)")
        p.add_argument("--cameras", default=None,
                       help="show/bench, robot data: comma-separated cameras in view order, each a dataset "
                            "camera, an alias (head, left_wrist, right_wrist) or VIEW=CAMERA to show CAMERA "
                            "labelled VIEW (default: the dataset's cameras)")
        p.add_argument("--skip-bad", action="store_true",
                       help="leave out unreadable or non-finite images, episodes and samples (warned, counted)")
        p.add_argument("--out", default=None, help="output file (show: PNG, fit-bins: JSON)")
        p.add_argument("--index", type=at_least(0), default=0, help="show: sample index")
        p.add_argument("--workers", type=at_least(0), default=2, help="bench: DataLoader workers")
        p.add_argument("--batches", type=at_least(1), default=20, help="bench: timed batches (after one warm-up)")
        p.add_argument("--batch-size", type=at_least(1), default=8, help="bench: batch size")
    args = ap.parse_args(argv)
    if args.cmd == "fit-bins":
        bins = fit_bins(args.data, n_bins=args.n_bins, skip_bad=args.skip_bad)
        bins.save(args.out or "bins.json")
        print(f"wrote {args.out or 'bins.json'} ({bins.n_bins} bins)")
        return
    ds, names = dataset_for(args)
    if args.cmd == "show":
        if args.index >= len(ds):
            raise ValueError(f"--index {args.index}: {' '.join(args.data)} has {len(ds)} samples (0..{len(ds) - 1})")
        views, prompt, target = ds.build(args.index)[:3]
        out = args.out or "sample.png"
        draw_views(views, f"{prompt} -> {target}", args.image_size, names=names).save(out)
        print(f"wrote {out}: prompt {prompt!r}, {len(views)} views ({', '.join(names)})")
        return
    from tokenizer import build_tiny_tokenizer
    loader = make_loader(ds, args.batch_size, Collator(build_tiny_tokenizer()), workers=args.workers,
                         sampler=MixtureSampler(ds.sizes, (args.batches + 1) * args.batch_size))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    rate = args.batches * args.batch_size / (time.perf_counter() - start)
    print(f"{type(ds).__name__}: {rate:.1f} samples/s ({args.workers} workers, batch {args.batch_size}, "
          f"{len(names)} views, {args.image_size} px)")


if __name__ == "__main__":
    cli(main)
