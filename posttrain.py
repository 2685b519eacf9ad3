"""Post-training (method.md §7.5; paper Sec. III-D): fit the flow-matching action expert to one robot.

Flow matching only, on the target robot's demonstrations. State and actions are z-scored with
statistics of the training data (stats.Stats), saved as stats.json in every checkpoint next to
recipe.json (cameras, chunk, stride, layout) and priors.json (whether the data supplied intrinsics for
ray maps and metric depth), so evaluation sees the robot exactly as training did.

    python posttrain.py --robot tabletop --init runs/pretrain_motion --out runs/post_tabletop
    python posttrain.py --robot tabletop --out runs/post_no_pose      # "without pose pre-training"
    python posttrain.py --robot robotwin --data /data/robotwin/place_shoe --init CKPT --config paligemma-3b

Without --init the policy starts from the plain VLM: --vlm DIR (PaliGemma), or for the tiny config
on the built-in demos the tiny VLM (vlm.py, built on first use): the paper's baseline without pose
pre-training. With --init, the checkpoint's weights, tokenizer
and pose bins are used. The story: recipe -> data and statistics -> model -> the loop (train,
below).
"""
import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from batches import Batches, autocast, to_device
import vlm
from checkpoint import (Run, check_out, check_start_checkpoints, parse_args, recipe_json, refuse_non_finite, restore,
                        save, start_log, start_model)
from data import Collator, RobotDataset, fit_bins, open_source, split_paths
from errors import at_least, cli, read_json
from formats import detect_format
from sim_export import builtin_demos
from stats import Stats
from tokenizer import PoseBins
from sensitivity import probe_images
from trainer import (Log, StopFlag, add_train_args, default_rates, evaluate, make_optimizer, make_scheduler,
                     seed_everything, set_trainable, setup_distributed, train_config, wrap)


@dataclass
class Recipe:
    """How the policy sees one embodiment."""
    robot: str
    cameras: tuple | None  # view order; dataset names or robot_formats.CAMERA_ALIASES keys; None = the dataset's
    state_dim: int | None  # expected widths (None = whatever the dataset has)
    action_dim: int | None
    chunk: int = 16        # actions predicted per inference (model.cfg.action_horizon)
    stride: int = 1        # dataset frames between chunk steps
    batch_size: int = 32
    steps: int = 30_000
    keys: str | None = None  # a LeRobot dataset's own feature names (lerobot.KEY_MAPS layout)


RECIPES = {
    # The built-in world at 10 Hz: 16 steps = 1.6 s; sized for a CPU run.
    "tabletop": Recipe("tabletop", ("head", "left_wrist", "right_wrist"), 16, 16, 16, 1, 8, 1500),
    # method.md §7.5: 16-dim ee actions [l_xyz, l_quat, l_grip, r_xyz, r_quat, r_grip], chunk 16, every 3rd
    # frame, 3 cameras, batch 32, 80k steps.
    "robotwin": Recipe("robotwin", ("head", "left_wrist", "right_wrist"), 16, 16, 16, 3, 32, 80_000),
    # LIBERO (method.md §8.5): 8-dim state (eef pos, axis-angle, 2 fingers), 7-dim delta actions; the
    # agentview and wrist cameras ('image', 'wrist_image' in the LeRobot conversions), read under the
    # public conversion's names (state, actions, image, wrist_image) or LeRobot's own.
    "libero": Recipe("libero", ("head", "right_wrist"), 8, 7, 16, 1, 32, 30_000, keys="libero"),
    # Any LeRobot dataset: its own cameras and widths.
    "lerobot": Recipe("lerobot", None, None, None, 16, 1, 32, 30_000),
}


def build_parser():
    p = argparse.ArgumentParser(description="Pose-VLA post-training: flow matching on one robot's demonstrations. "
                                            "--steps/--batch-size default to the robot's recipe.")
    p.add_argument("--robot", default=None, choices=sorted(RECIPES), help="embodiment recipe (required)")
    p.add_argument("--data", default=None,
                   help="comma-separated LeRobot/RoboTwin datasets "
                        "(tabletop default: built-in demos, generated on first use)")
    p.add_argument("--eval-data", default=None,
                   help="comma-separated held-out datasets (tabletop default: built-in val)")
    p.add_argument("--init", default=None, help="pre-trained checkpoint (omit: start from the plain VLM)")
    p.add_argument("--cache", default="data_cache", help="folder for the generated built-in data")
    p.add_argument("--episodes", type=at_least(1), default=None,
                   help="use only the first N episodes of each training dataset (few-demonstration runs)")
    add_train_args(p, steps=None, batch_size=None, lr=None, warmup=50, eval_every=250, save_every=250)
    return p


def check_start(args):
    """Flags and files, checked before any data generation or training (the numbers' ranges are
    argparse's, trainer.FLAG_MINIMUM)."""
    if args.robot is None:
        raise ValueError(f"--robot is required: one of {sorted(RECIPES)}")
    check_out(args)
    if args.robot != "tabletop" and not args.data:
        raise ValueError(f"--robot {args.robot} needs --data PATH (only tabletop has built-in demonstrations)")
    for path in split_paths(args.data) + split_paths(args.eval_data):
        if detect_format(path) not in ("lerobot", "robotwin"):
            raise ValueError(f"{path}: is {detect_format(path)} data; post-training needs LeRobot or RoboTwin episodes")
    check_start_checkpoints(args, resume_needs=("stats.json",))  # a post-training run carries its statistics


def open_recipe_source(path, recipe, episodes=None, skip_bad=False):
    """One dataset under the recipe's feature names; a LeRobot dataset that already uses LeRobot's
    own names (observation.state, action) is read as it is."""
    if recipe.keys is not None and detect_format(path) == "lerobot":
        feats = read_json(os.path.join(path, "meta", "info.json"), "LeRobot meta/info.json").get("features", {})
        if "observation.state" not in feats:
            return open_source(path, episodes, skip_bad, keys=recipe.keys)
    return open_source(path, episodes, skip_bad)


def sources(paths, recipe, episodes=None, skip_bad=False):
    """Open the datasets (their first `episodes` episodes) and check their widths against the recipe."""
    srcs = [open_recipe_source(p, recipe, episodes, skip_bad) for p in paths]
    for s in srcs:
        for key, want in (("state", recipe.state_dim), ("action", recipe.action_dim)):
            have = s.episodes[0].state.shape[1] if key == "state" else s.episodes[0].action.shape[1]
            if want is not None and have != want:
                raise ValueError(f"{s.path}: {key} has {have} dims; the {recipe.robot} recipe expects {want}")
    return srcs


def fit_stats(srcs):
    """z-scoring statistics over every training episode of every dataset."""
    return Stats.compute(np.concatenate([e.state for s in srcs for e in s.episodes]),
                         np.concatenate([e.action for s in srcs for e in s.episodes]), ", ".join(s.path for s in srcs))


def trained_priors(ds):
    """priors.json: which geometric priors the training data supplied (any dataset: intrinsics K for
    ray maps, metric depth), read at frame 0 of each dataset's first episode for its recipe cameras.
    Evaluation (policy.Policy) feeds only these unless told otherwise: a LIBERO checkpoint, trained
    without K or depth, is not shown rays or depth it never saw."""
    first = [s.frame(0, 0, cam) for s, cams in zip(ds.sources, ds.cameras) for cam in cams]  # K and depth: one read
    return {"rays": any(f.K is not None for f in first), "depth": any(f.depth is not None for f in first),
            "source": "post-training data (frame 0 of each dataset)"}


def generic_bins(srcs):
    """Flow-only training emits no pose tokens, but the vocabulary needs bins: fitted from end-effector
    poses when the data (the opened training sources) has them, else a generic tabletop range."""
    try:
        return fit_bins(srcs, n_bins=256)
    except ValueError:
        return PoseBins(np.linspace(-1.0, 1.0, 257), np.linspace(0.0, 2.0, 257), np.linspace(0.0, 1.0, 257))


def train(run, net, train_ds, eval_ds, collate, cfg, d, resume=None):
    """Optimise `net` (run.model, maybe wrapped) for cfg.steps steps (method.md §7.1: AdamW, warm-up
    + cosine, grad-norm clip, bf16 autocast on CUDA); returns the last checkpoint. A --resume run
    continues exactly (checkpoint.restore); a fresh one logs the image probe at step 0 first."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(run.model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    batches = Batches(train_ds, collate, cfg, d)
    seed_everything(cfg.seed + 1000 * d.rank)  # own flow noise per process, the same data order
    step = restore(resume, run, optimizer, scheduler, batches, cfg, d) if resume else start_log(run, d)
    last, evaluating = None, eval_ds is not None and cfg.eval_every
    with Log(run.out, step, cfg, d) as log, StopFlag() as stop:
        if evaluating and not resume:  # at init: what training changes
            log.write({"step": 0, **probe_images(run, eval_ds, collate, cfg, d)}, echo=False)
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            skipped = batch.pop("skipped", 0)
            batch = to_device(batch, d.device)
            t1 = time.perf_counter()
            with autocast(d.device):
                out = net(batch, action_weight=cfg.action_weight)
            out["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            refuse_non_finite(step + 1, out, norm, run.out, d)  # a NaN/inf step is never applied
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.timed(t1 - t0, time.perf_counter() - t0, skipped)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.train(step, out, norm, scheduler.get_last_lr()[0])
            if evaluating and (step % cfg.eval_every == 0 or step == cfg.steps):
                log.write({"step": step, **evaluate(run, net, eval_ds, collate, cfg, d)})
            stopping = stop.agreed(d)  # Ctrl-C or SIGTERM on any process
            if stopping or step % cfg.save_every == 0 or step == cfg.steps:
                last = save(run, step, optimizer, scheduler, batches, cfg, d)
            if stopping:
                stop.exit(step, last, run.out, d)
    return last


def main(argv=None):
    args = parse_args(build_parser, argv, need=("stats.json",))
    args.out = args.out or os.path.join("runs", f"posttrain_{args.robot}")
    check_start(args)
    recipe = RECIPES[args.robot]
    args.steps, args.batch_size = args.steps or recipe.steps, args.batch_size or recipe.batch_size
    d = setup_distributed()
    paths = split_paths(args.data) or builtin_demos(args.cache, "train", d)
    eval_paths = split_paths(args.eval_data) or ([] if args.data else builtin_demos(args.cache, "val", d))
    srcs = sources(paths, recipe, args.episodes, args.skip_bad)
    stats = Stats.load(os.path.join(args.resume, "stats.json")) if args.resume else fit_stats(srcs)
    args.init = args.init or vlm.default_init(args, d)  # without --init: the plain VLM (the tiny one here)
    model, tok, bins = start_model(args, lambda: generic_bins(srcs))
    default_rates(args, model.cfg)
    model.cfg.action_horizon = recipe.chunk
    cameras = recipe.cameras or srcs[0].cameras[:model.cfg.n_views]
    if len(cameras) > model.cfg.n_views:
        raise ValueError(f"the {recipe.robot} recipe uses {len(cameras)} cameras; "
                         f"the model has {model.cfg.n_views} views")
    kw = dict(image_size=model.cfg.image_size, chunk=recipe.chunk, stride=recipe.stride, cameras=cameras,
              stats=stats, seed=args.seed, skip_bad=args.skip_bad)
    train_ds = RobotDataset(srcs, **kw)  # the sources opened above (with --episodes)
    eval_ds = RobotDataset(sources(eval_paths, recipe, skip_bad=args.skip_bad), **kw) if eval_paths else None
    cfg = train_config(args)
    set_trainable(model, cfg)
    net = wrap(model, cfg, d)
    info = recipe_json("posttrain", train_ds.cameras[0], model.cfg.image_size, recipe.robot, recipe.chunk,
                       recipe.stride, srcs[0])
    run = Run(model, tok, bins, args.out, vars(args),
              {"recipe.json": info, "stats.json": {"state": stats.state, "action": stats.action},
               "priors.json": trained_priors(train_ds)})
    last = train(run, net, train_ds, eval_ds, Collator(tok, max_dim=model.cfg.max_dim), cfg, d, resume=args.resume)
    if d.main:
        print(f"done: {last}")
    return run


if __name__ == "__main__":
    cli(main)
