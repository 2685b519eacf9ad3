"""The one policy wrapper every evaluator uses: a checkpoint directory in, robot actions out
(method.md §8).

Reading order:
  1. load the checkpoint (model.load_checkpoint) and the JSON files written next to it by
     post-training: `recipe.json` (robot, camera names in view order, chunk H, frame stride s,
     state/action widths, image size), `stats.json` (stats.Stats: state/action z-scoring) and
     `priors.json` (whether the training data supplied K for ray maps and depth: only those are fed
     unless the caller says otherwise; a checkpoint without it gets both, as before the record);
  2. preprocess(): the training data path exactly: fusion.letterbox (K updated), data.tensors
     (image in [-1, 1], ray map from the letterboxed K, metric depth prior), z-scored state, then
     data.Collator (prompt = <bos> + instruction + "\\n", state zero-padded to max_dim);
  3. plan(): model.sample_actions (10 Euler steps, prefix cached; with compile=True the same through
     fast.FastSampler: bf16 weights on CUDA, the loop compiled), de-normalise the first Da dims,
     and expand the chunk to control rate: the training chunk holds every s-th frame, so absolute
     end-effector chunks (tabletop, RoboTwin) are interpolated linearly between those frames
     (quaternions by nlerp), which is how the demonstrations moved between them;
  4. act(): an action queue; `exec_steps` control steps are executed from each plan before the
     policy re-plans from a fresh observation;
  5. latency: milliseconds per chunk (preprocess + sampling) and the policy-limited control rate
     (compiled: the first chunk, which compiles, apart).
  6. predicted_waypoints(): the pose-text head's end-effector waypoints for the last observation
     (stage 2 teaches the VLM to write them), mapped back to the input image's pixels, for drawing.
"""
import os
import time
from collections import deque

import numpy as np
import torch

from data import Collator, View, tensors
from errors import read_json
from fast import FastSampler
from fusion import letterbox
from model import load_checkpoint
from stats import Stats
import ee16
from tokenizer import PoseTokenizer, nlerp

RECIPE_KEYS = ("robot", "cameras", "chunk", "stride", "state_dim", "action_dim", "image_size")
# Both robots act in the ee16 layout (ee16.py); a robot not listed has no known quaternions or grippers.
QUAT_SLICES = {robot: ee16.QUATERNIONS for robot in ("tabletop", "robotwin")}
POSITION_SLICES = {robot: ee16.POSITIONS for robot in ("tabletop", "robotwin")}  # metres
GRIPPERS = {robot: ee16.GRIPPERS for robot in ("tabletop", "robotwin")}  # opening in [0, 1], 1 = open


def valid_actions(chunk, robot):
    """Predicted (N, Da) actions made executable: unit quaternions, grippers clipped to [0, 1]
    (the regression output is close to, but not exactly on, those sets)."""
    chunk = np.array(chunk, np.float64)
    for q in QUAT_SLICES.get(robot, ()):
        chunk[:, q] /= np.linalg.norm(chunk[:, q], axis=-1, keepdims=True).clip(min=1e-8)
    if robot in GRIPPERS:
        chunk[:, GRIPPERS[robot]] = chunk[:, GRIPPERS[robot]].clip(0.0, 1.0)
    return chunk


def read_recipe(ckpt):
    path = os.path.join(ckpt, "recipe.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt}: no recipe.json; a policy checkpoint is written by post-training "
                                f"(posttrain.py) with recipe.json and stats.json next to the weights")
    recipe = read_json(path, "a post-training recipe (robot, cameras, chunk, stride, widths, image size)")
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {list(RECIPE_KEYS)}")
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; expected {list(RECIPE_KEYS)}")
    return recipe


def read_priors(ckpt):
    """priors.json (posttrain.trained_priors): {"rays": bool, "depth": bool}, or None when absent."""
    path = os.path.join(ckpt, "priors.json")
    if not os.path.isfile(path):
        return None
    priors = read_json(path, "the priors a policy was trained with (rays, depth)")
    if not isinstance(priors, dict) or any(not isinstance(priors.get(k), bool) for k in ("rays", "depth")):
        raise ValueError(f"{path}: expected a JSON object with booleans 'rays' and 'depth'")
    return priors


def expand_chunk(chunk, stride, quat_slices=()):
    """(H, Da) actions every `stride` control steps -> ((H-1)*stride + 1, Da) at control rate:
    linear interpolation between consecutive chunk actions, nlerp on the quaternion slices."""
    chunk = np.asarray(chunk, np.float64)
    if stride == 1:
        return chunk
    f = (np.arange(stride) / stride)[:, None]                                      # (s, 1)
    a, b = chunk[:-1, None], chunk[1:, None]                                       # (H-1, 1, Da)
    out = (1 - f) * a + f * b                                                      # (H-1, s, Da)
    for q in quat_slices:
        out[..., q] = nlerp(a[..., q], b[..., q], f)
    return np.concatenate([out.reshape(-1, chunk.shape[1]), chunk[-1:]])


class Policy:
    """Checkpoint in, actions out. `robots`: the recipe robots this caller can drive."""

    def __init__(self, ckpt, robots=None, exec_steps=None, use_rays=None, use_depth=None, seed=0, device="cpu",
                 compile=False):
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"{ckpt}: checkpoint directory not found")
        self.recipe = read_recipe(ckpt)
        r = self.recipe
        if not os.path.isfile(os.path.join(ckpt, "stats.json")):
            raise FileNotFoundError(f"{ckpt}: no stats.json (state/action statistics); this looks like a "
                                    f"pre-training checkpoint (stage {r.get('stage')!r}): post-train it before "
                                    "closed-loop evaluation")
        if robots is not None and r["robot"] not in robots:
            raise ValueError(f"{ckpt}/recipe.json: robot {r['robot']!r} cannot be driven here; "
                             f"expected one of {list(robots)}")
        self.stats = Stats.load(os.path.join(ckpt, "stats.json"))
        self.model, self.text_tok, bins = load_checkpoint(ckpt, map_location=device)
        self.model.eval().to(device)
        cfg = self.model.cfg
        for key, have, limit in (("image_size", r["image_size"], cfg.image_size),
                                 ("chunk", r["chunk"], cfg.action_horizon)):
            if have != limit:
                raise ValueError(f"{ckpt}/recipe.json: {key} {have} does not match the model config's {limit}")
        if len(r["cameras"]) > cfg.n_views or max(r["state_dim"], r["action_dim"]) > cfg.max_dim:
            raise ValueError(f"{ckpt}/recipe.json: {len(r['cameras'])} cameras / state {r['state_dim']} / action "
                             f"{r['action_dim']} exceed the model's {cfg.n_views} views / max_dim {cfg.max_dim}")
        if r["stride"] > 1 and r["robot"] not in QUAT_SLICES:
            raise ValueError(f"{ckpt}/recipe.json: stride {r['stride']} needs absolute actions to interpolate; "
                             f"robot {r['robot']!r} uses delta actions (post-train it with stride 1)")
        self.priors = read_priors(ckpt)  # None: a checkpoint from before the record
        trained = self.priors or {"rays": True, "depth": True}
        self.use_rays = bool(trained["rays"] if use_rays is None else use_rays)  # None: as trained
        self.use_depth = bool(trained["depth"] if use_depth is None else use_depth)
        self.ckpt, self.device = ckpt, device
        self.cameras, self.size = list(r["cameras"]), int(r["image_size"])
        self.horizon = (r["chunk"] - 1) * r["stride"] + 1                          # control steps per plan
        self.exec_steps = int(exec_steps) if exec_steps is not None else max(1, r["chunk"] * r["stride"] // 2)
        if not 1 <= self.exec_steps <= self.horizon:
            raise ValueError(f"exec_steps must be in 1..{self.horizon} (chunk {r['chunk']} x stride {r['stride']}), "
                             f"got {self.exec_steps}")
        self.collate = Collator(self.text_tok, max_dim=cfg.max_dim)
        self.pose_tok = PoseTokenizer(bins, self.size)
        self.seed, self.generator = seed, torch.Generator(device="cpu").manual_seed(seed)
        self.queue, self.last_plan, self.last_batch, self.last_boxes = deque(), None, None, None
        self.chunk_seconds = []
        # compile=True: sample through fast.FastSampler (bf16 weights on CUDA, the Euler loop compiled);
        # the default is the eager reference, model.sample_actions.
        self.sampler = FastSampler(self.model) if compile else None
        self.compile_seconds = None

    # --- observation -> batch ------------------------------------------------------------------
    def preprocess(self, views, state, prompt):
        """views: per recipe camera, dict(rgb (H, W, 3) uint8, K (3, 3) or None, depth (H, W) metres
        or None), in recipe order. state: (state_dim,) raw. Returns the model batch."""
        if len(views) != len(self.cameras):
            raise ValueError(f"expected {len(self.cameras)} camera views {self.cameras}, got {len(views)}")
        state = np.asarray(state, np.float64)
        if state.shape != (self.recipe["state_dim"],):
            raise ValueError(f"state has shape {state.shape}; the checkpoint expects ({self.recipe['state_dim']},)")
        lbs, boxes = [], []
        for v in views:
            rgb = np.asarray(v["rgb"])
            K = v.get("K")
            depth = v.get("depth") if self.use_depth else None
            lb = letterbox(rgb, np.eye(3) if K is None else K, self.size, depth=depth)
            lbs.append(View(lb, (0, 0, rgb.shape[1], rgb.shape[0]), [], K is not None and self.use_rays))
            boxes.append((lb.scale, np.asarray(lb.offset)))
        item = {**tensors(lbs, self.size), "prompt": prompt, "target": "",
                "state": self.stats.normalize(state, "state", f"{self.ckpt}/stats.json")}
        batch = self.collate([item])                                            # no target: no label keys
        self.last_boxes = boxes
        return {k: v.to(self.device) for k, v in batch.items() if k != "skipped"}

    # --- planning ------------------------------------------------------------------------------
    def plan(self, views, state, prompt):
        """One chunk at control rate: ((H-1)*s + 1, action_dim) raw actions."""
        start = time.perf_counter()
        batch = self.preprocess(views, state, prompt)
        chunk = self.chunk(batch, self.noise(self.generator))
        robot = self.recipe["robot"]
        plan = expand_chunk(valid_actions(chunk, robot), self.recipe["stride"], QUAT_SLICES.get(robot, ()))
        if self.sampler is not None and self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start  # the first compiled chunk: mostly compiling
        else:
            self.chunk_seconds.append(time.perf_counter() - start)
        self.last_plan, self.last_batch = plan, batch
        return plan

    def noise(self, generator):
        """(1, H, max_dim) flow noise drawn from `generator`."""
        cfg = self.model.cfg
        return torch.randn(1, cfg.action_horizon, cfg.max_dim, generator=generator)

    def chunk(self, batch, noise):
        """The sampled chunk for a preprocessed batch and a given noise: (H, Da) raw actions, as the
        model wrote them (before valid_actions and the expansion to control rate)."""
        with torch.no_grad():
            if self.sampler is not None:
                norm = self.sampler(batch, noise)[0, :, :self.recipe["action_dim"]]
            else:
                norm = self.model.sample_actions(batch, noise=noise.to(self.device))[0, :, :self.recipe["action_dim"]]
        return self.stats.unnormalize(norm.float().cpu().numpy(), "action", f"{self.ckpt}/stats.json")

    def act(self, views, state, prompt):
        """Next action; re-plans when the executed part of the last plan is used up."""
        if not self.queue:
            self.queue.extend(self.next_actions(views, state, prompt))
        return self.queue.popleft()

    def next_actions(self, views, state, prompt):
        """A fresh plan's first `exec_steps` actions (for evaluators that run a chunk per call)."""
        return self.plan(views, state, prompt)[:self.exec_steps]

    def reset(self, episode=None):
        """Forget the queued plan. episode (an id, e.g. the env seed): restart the noise from a seed of
        (policy seed, episode), so an episode's actions do not depend on how long the ones before it ran."""
        self.queue.clear()
        self.last_plan = self.last_batch = None
        if episode is not None:
            self.generator.manual_seed(int(np.random.SeedSequence([self.seed, int(episode)]).generate_state(1)[0]))

    def latency(self):
        """ms per chunk (mean over plans) and the control rate the policy alone could sustain:
        `exec_steps` actions per chunk time (simulation and rendering excluded). Compiled, the first
        chunk is left out of the mean and reported as compile_s."""
        sec = float(np.mean(self.chunk_seconds)) if self.chunk_seconds else float("nan")
        out = {"chunks": len(self.chunk_seconds), "ms_per_chunk": 1000 * sec, "control_hz": self.exec_steps / sec,
               "exec_steps": self.exec_steps}
        return out if self.sampler is None else {**out, "compile_s": self.compile_seconds}

    # --- pose-text head ------------------------------------------------------------------------
    def predicted_waypoints(self, view=0, max_new_tokens=160):
        """Decoded end-effector waypoints ("left arm 0", ...) for the last planned observation in
        `view`, as (name, (u, v) input-image pixels, t camera frame); [] when nothing decodes."""
        if self.last_batch is None or max_new_tokens <= 0:
            return []
        batch = self.last_batch if self.sampler is None else self.sampler.prepare(self.last_batch)  # model dtype
        with torch.no_grad():
            ids = self.model.generate(batch, max_new_tokens=max_new_tokens)[0]
        text = self.text_tok.decode(ids.tolist(), skip_special_tokens=True)
        decoded = self.pose_tok.decode(text, n_views=len(self.cameras))
        scale, offset = self.last_boxes[view]
        return [(d.name, (d.anchor[:2] - offset) / scale, d.t) for d in decoded.views[view]
                if d.size is None and d.t is not None]
