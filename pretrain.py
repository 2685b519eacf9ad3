"""Pose pre-training (method.md §7; paper Sec. III-C): the VLM learns to write 3D pose tuples.

Stage 0, `--stage vlm` (tiny configuration only, vlm.py): the small pre-trained VLM that plays
PaliGemma's role on a laptop: the vision tower learns a dense objective of its own, then the
decoder learns to write names and 2D boxes with the tower frozen, reading ideal image tokens for a
share of each batch that falls to 0 over --teacher-steps (vlm.Teacher). `python pretrain.py` builds it
into --cache on first use and starts stage 1 from it.
Stage 1, `--stage grounding`: next-token prediction of object pose tuples on 3D datasets (Omni3D
JSON or BOP; each image becomes three pseudo-views, data.GroundingDataset), mixed with weights
n^0.43. Stage 2, `--stage motion`: from a stage-1 checkpoint, trajectory pose tuples (future
end-effector waypoints in each camera's frame, NTP) plus flow matching on the same robot batches,
the action loss weighted x10.

    python pretrain.py                      # tiny model: the tiny VLM (if missing), then stage 1 on the built-in scenes
    python pretrain.py --stage vlm          # only the tiny VLM (vision objective, then boxes with a frozen tower)
    python pretrain.py --stage motion --init runs/pretrain_grounding
    torchrun --nproc_per_node=8 pretrain.py --config paligemma-3b --vlm DIR --data A,B,C --fsdp ...

The story: flags -> data (built-in scenes generated on first use) -> bins -> model (-> the vision
tower's own objective, stage vlm) -> the loop (train, below) -> for stage 1, decoded pose tuples next to
the truth and an overlay PNG. Stage 1's held-out monitor: recall and pose errors of the greedily
decoded tuples, 2D recall and centre error, and the error of the most likely <loc> under teacher
forcing (greedy decoding hides a location the model half knows behind <no_object>), next to always
answering the image centre.
"""
import argparse
import itertools
import os
import time

import numpy as np
import torch

from batches import Batches, autocast, to_device
import vlm
from checkpoint import (Run, check_out, check_start_checkpoints, parse_args, recipe_json, refuse_non_finite, restore,
                        save, start_log, start_model)
from data import Collator, fit_bins, open_datasets, split_paths
from errors import at_least, cli
from draw import overlay, stack
from formats import detect_format
from metrics import centre_errors, centre_summary, nearest_pairs, rotation_error_deg
from sim_export import builtin_demos, builtin_grounding
from tokenizer import N_LOC, PoseTokenizer, loc_tokens, quat_to_matrix
from sensitivity import probe_images
from trainer import (Log, StopFlag, add_train_args, default_rates, evaluate, make_optimizer, make_scheduler,
                     seed_everything, set_trainable, setup_distributed, train_config, wrap)

MAX_NEW_TOKENS = 200  # a few tuples of ~16 tokens in each of 3 views
# Default --steps per stage. The tiny VLM's decoder needs the longest: its most likely <loc> is
# still near the image centre's error after 1500 steps and starts to localise between 2000 and 3000.
STEPS = {"vlm": 3000, "grounding": 1500, "motion": 1500}


def build_parser():
    p = argparse.ArgumentParser(description="Pose-VLA pose pre-training: stage 1 grounding, stage 2 motion.")
    p.add_argument("--stage", default="grounding", choices=["vlm", "grounding", "motion"],
                   help="vlm: the tiny pre-trained VLM (vision objective, then 2D boxes with the tower frozen); "
                        "grounding: object pose tuples; motion: waypoint tuples + flow matching (x10)")
    p.add_argument("--data", default=None,
                   help="comma-separated dataset paths (grounding: Omni3D/BOP; motion: LeRobot/RoboTwin); "
                        "default: the built-in tabletop data, generated into --cache on first use")
    p.add_argument("--eval-data", default=None, help="comma-separated held-out datasets (default: built-in val split)")
    p.add_argument("--init", default=None,
                   help="checkpoint to start from (required for --stage motion; stage grounding on the built-in "
                        "data with the tiny config defaults to the tiny VLM in --cache, built on first use)")
    p.add_argument("--vision-steps", type=at_least(1), default=vlm.VisionConfig.steps,
                   help="stage vlm: steps of the vision tower's own dense objective before the decoder joins")
    p.add_argument("--teacher-steps", type=at_least(0), default=1000,
                   help="stage vlm: decoder steps over which the share of samples that read ideal image tokens "
                        "instead of the tower's falls from 1 to 0 (vlm.Teacher; 0: the tower's from the start)")
    p.add_argument("--cache", default="data_cache", help="folder for the generated built-in data")
    p.add_argument("--n-bins", type=at_least(1), default=256,
                   help="pose bins per quantity, fitted on the training data (paper: 2048)")
    p.add_argument("--targets", default="poses", choices=["poses", "boxes"],
                   help="poses: the method; boxes: the semantic baseline (ablation.py) on the same data and "
                        "compute: stage 1 writes names + 2D boxes only, stage 2 trains flow matching only")
    p.add_argument("--anchor", default="center", choices=["center", "box"],
                   help="grounding, poses: an object tuple's 2D anchor: its box centre as 2 <loc> tokens (the "
                        "paper) or its box corners as 4 (the released code; the tiny VLM's own 2D box format)")
    p.add_argument("--stride", type=at_least(1), default=1, help="motion: frames between chunk steps (RoboTwin: 3)")
    p.add_argument("--show", type=at_least(0), default=3,
                   help="grounding: held-out samples printed and drawn at the end")
    add_train_args(p, steps=None, batch_size=8, lr=None, warmup=50, eval_every=250, save_every=250)
    return p


def check_start(args):
    """Everything that can be wrong with the flags or files, before any data or training time (the
    numbers' ranges are argparse's, trainer.FLAG_MINIMUM)."""
    if args.stage == "motion" and not (args.init or args.resume):
        raise ValueError("--stage motion continues from a stage-1 checkpoint: pass --init CKPT")
    if args.stage == "vlm" and (args.init or args.vlm or args.config not in (None, "tiny")):
        raise ValueError("--stage vlm builds the tiny configuration's VLM from random weights; it takes no "
                         "--init/--vlm (the full configuration starts from PaliGemma itself)")
    check_out(args)
    for path in split_paths(args.data) + split_paths(args.eval_data):
        detect_format(path)  # raises FileNotFoundError / ValueError naming the path
    check_start_checkpoints(args)


def data_paths(args, d):
    """(train paths, held-out paths); the built-in tabletop data when --data is not given."""
    if args.data:
        return split_paths(args.data), split_paths(args.eval_data)
    make = builtin_grounding if args.stage != "motion" else builtin_demos
    as_list = lambda x: x if isinstance(x, list) else [x]  # noqa: E731
    return as_list(make(args.cache, "train", d)), split_paths(args.eval_data) or as_list(make(args.cache, "val", d))


def datasets(args, paths, eval_paths, pose_tok, cfg):
    kw = dict(pose_tokenizer=pose_tok, image_size=cfg.image_size, seed=args.seed, skip_bad=args.skip_bad)
    if args.stage != "motion":
        kw.update(n_views=cfg.n_views, targets=args.targets)
    else:
        kw.update(chunk=cfg.action_horizon, stride=args.stride, trajectory=args.targets == "poses", stats="auto")
    kind = "grounding" if args.stage != "motion" else "robot"
    train_ds = open_datasets(paths, kind, **kw)
    eval_ds = open_datasets(eval_paths, kind, **kw) if eval_paths else None
    return train_ds, eval_ds


def recipe(args, train_ds, cfg):
    """recipe.json: how this checkpoint sees the world (the views it was trained on)."""
    if args.stage != "motion":
        return recipe_json(args.stage, ["head", "left_wrist", "right_wrist"][:cfg.n_views], cfg.image_size)
    src = train_ds.sources[0]
    robot = "tabletop" if not args.data else detect_format(src.path)
    return recipe_json("motion", train_ds.cameras[0], cfg.image_size, robot, cfg.action_horizon, args.stride, src)


# ----------------------------------------------------------------------------------------------
# Decoded tuples: evaluation metrics and the final report

def decode_samples(model, tok, pose_tok, ds, indices, device):
    """Greedy pose text for held-out samples: list of (views with truth, prompt, target, text, Decoded)."""
    ds.set_epoch(0)
    batch = Collator(tok)([ds[i] for i in indices])
    batch = to_device(batch, device)
    model.eval()
    ids = model.generate(batch, max_new_tokens=MAX_NEW_TOKENS)
    model.train()
    out = []
    for i, text in zip(indices, tok.batch_decode(ids, skip_special_tokens=True)):
        views, prompt, target = ds.build(i)
        out.append((views, prompt, target, text, pose_tok.decode(text, n_views=len(views))))
    return out


def tuple_errors(samples, size):
    """Recall of true tuples, median translation error (cm) and rotation error (deg) of matches; 2D
    recall and median centre error (px) as metrics.centre_summary counts them."""
    trans, rot, n_true, rejected, centres = [], [], 0, 0, []
    for views, _, _, _, dec in samples:
        rejected += dec.n_rejected
        centres += centre_errors(dec, views)
        for v, pred in zip(views, dec.views):
            n_true += len(v.objects)
            for o, p in nearest_pairs(v.objects, pred):
                trans.append(100 * np.linalg.norm(p.t - o.t))
                rot.append(rotation_error_deg(o.R, quat_to_matrix(p.quat)))
    nan, two_d = float("nan"), centre_summary(centres, size)
    return {"eval_recall": len(trans) / max(n_true, 1), "eval_trans_err_cm": float(np.median(trans)) if trans else nan,
            "eval_rot_err_deg": float(np.median(rot)) if rot else nan, "eval_rejected": rejected,
            "eval_recall_2d": two_d["recall_2d"], "eval_centre_px": two_d["centre_px"]}


def anchor_errors(logits, label_ids, label_mask, loc_ids, image_size):
    """Pixel errors of the teacher-forced most likely anchors. logits: (B, Tl, V), position k
    predicting label k (model.label_logits); loc_ids: the N_LOC token ids of <loc0000>...
    Each run of consecutive <loc> targets is one anchor, (u, v) or a 2D box (its centre counts);
    every position takes the argmax over the <loc> tokens alone, decoded as the tokenizer does
    (bin centre: (i + 0.5) / N_LOC * image_size). Returns (errors, image-centre errors) in pixels."""
    loc_ids = torch.as_tensor(loc_ids, device=logits.device)
    bin_of = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    bin_of[loc_ids] = torch.arange(len(loc_ids), device=logits.device)
    true = torch.where(label_mask, bin_of[label_ids], -1).tolist()             # (B, Tl) bin or -1
    pred = logits[..., loc_ids].argmax(-1).tolist()                             # (B, Tl) bin
    centre = lambda bins: ((np.asarray(bins) + 0.5) / N_LOC * image_size).reshape(-1, 2).mean(0)  # noqa: E731
    errors, baseline = [], []
    for t_row, p_row in zip(true, pred):
        for is_loc, run in itertools.groupby(range(len(t_row)), key=lambda k: t_row[k] >= 0):
            if is_loc:
                k = list(run)
                truth = centre([t_row[i] for i in k])
                errors.append(float(np.linalg.norm(centre([p_row[i] for i in k]) - truth)))
                baseline.append(float(np.linalg.norm(image_size / 2 - truth)))
    return errors, baseline


def loc_argmax_errors(model, tok, ds, indices, device, batch_size=8):
    """Median anchor error (px) of the teacher-forced most likely <loc> over held-out samples whose
    targets list objects (anchor_errors), beside the image centre's; NaN without any anchor."""
    ds.set_epoch(0)
    collate, loc_ids, errors, baseline = Collator(tok), tok.convert_tokens_to_ids(loc_tokens()), [], []
    model.eval()
    for start in range(0, len(indices), batch_size):
        batch = to_device(collate([ds[i] for i in indices[start:start + batch_size]]), device)
        if "label_ids" not in batch:
            continue
        with torch.no_grad():
            vlm_h, _, p_valid = model.joint_forward(batch)
            e, b = anchor_errors(model.label_logits(vlm_h, p_valid), batch["label_ids"], batch["label_mask"],
                                 loc_ids, model.cfg.image_size)
        errors, baseline = errors + e, baseline + b
    model.train()
    nan = float("nan")
    return {"eval_loc_argmax_err_px": float(np.median(errors)) if errors else nan,
            "eval_loc_centre_baseline_px": float(np.median(baseline)) if baseline else nan,
            "eval_loc_anchors": len(errors)}


def report(samples, size, path):
    """Print decoded tuples next to the truth; save truth (top) over prediction (bottom) per sample."""
    fmt = lambda a: "(" + ", ".join(f"{x:+.3f}" for x in np.asarray(a)) + ")"  # noqa: E731
    panels = []
    for views, prompt, target, text, dec in samples:
        print(f"\n== {prompt!r}  ({dec.n_rejected} fragments rejected)")
        for i, (v, pred) in enumerate(zip(views, dec.views)):
            for o in v.objects:
                print(f"  view {i} truth     {o.name:<16} t={fmt(o.t)} size={fmt(o.size)}")
            for p in pred:
                what = f"box={fmt(p.anchor)}" if p.t is None else f"t={fmt(p.t)} size={fmt(p.size)} rpy={fmt(p.euler)}"
                print(f"  view {i} predicted {p.name:<16} {what}")
        panels.append(overlay(views, dec, size, f"truth: {prompt} -> {target}", f"predicted: {text}"))
    stack(panels).save(path)
    print(f"\nwrote {path}: truth (top) and predicted (bottom) 3D boxes per held-out sample")


# ----------------------------------------------------------------------------------------------
# The loop

def train(run, net, train_ds, eval_ds, collate, cfg, d, extra_eval, resume=None, teacher_steps=0):
    """Optimise `net` (run.model, maybe wrapped) for cfg.steps steps (method.md §7.1: AdamW, warm-up
    + cosine, grad-norm clip, bf16 autocast on CUDA); returns the last checkpoint. A --resume run
    continues exactly (checkpoint.restore); a fresh one logs the image probe at step 0 first.
    teacher_steps (stage vlm): ideal image tokens for a share of each batch, 1 -> 0 over these steps."""
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
            if teacher_steps:  # vlm.Teacher: the tiny VLM's decoder reads ideal tokens first
                share = vlm.teacher_share(step, teacher_steps)
                batch["use_teacher"] = torch.rand(len(batch["images"]), device=d.device) < share
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
                log.write({"step": step, **evaluate(run, net, eval_ds, collate, cfg, d), **extra_eval()})
            stopping = stop.agreed(d)  # Ctrl-C or SIGTERM on any process
            if stopping or step % cfg.save_every == 0 or step == cfg.steps:
                last = save(run, step, optimizer, scheduler, batches, cfg, d)
            if stopping:
                stop.exit(step, last, run.out, d)
    return last


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(build_parser, argv)
    args.steps = STEPS[args.stage] if args.steps is None else args.steps
    args.out = args.out or os.path.join("runs", f"pretrain_{args.stage}")
    check_start(args)
    d = setup_distributed()
    train_paths, eval_paths = data_paths(args, d)
    if args.stage == "vlm":  # PaliGemma's recipe: 2D detection text, decoder only, on a trained tower
        args.targets, args.freeze_vision = "boxes", True
    elif args.stage == "grounding":
        args.init = args.init or vlm.default_init(args, d)  # the tiny VLM plays PaliGemma's role
    model, tok, bins = start_model(args, lambda: fit_bins(train_paths, n_bins=args.n_bins, skip_bad=args.skip_bad))
    default_rates(args, model.cfg)
    cfg = train_config(args)
    cfg.action_weight = 10.0 if args.stage == "motion" else 1.0  # method.md §7.4: action loss x10 in stage 2
    pose_tok = PoseTokenizer(bins, model.cfg.image_size, anchor=args.anchor)
    train_ds, eval_ds = datasets(args, train_paths, eval_paths, pose_tok, model.cfg)
    if args.stage == "vlm" and not args.resume:
        vlm.init_loc_embeddings(model, tok)
        model.to(d.device)
        vlm.pretrain_vision(model, train_ds, tok, vlm.VisionConfig(steps=args.vision_steps, seed=args.seed), eval_ds,
                           d.device)
    if args.stage == "vlm":  # the decoder learns to read the tower: rows held, ideal tokens first
        train_ds = vlm.Teacher(train_ds, model, tok)
        vlm.hold_rows(model, vlm.held_rows(tok, train_ds.targets.words))
    set_trainable(model, cfg)
    net = wrap(model, cfg, d)
    run = Run(model, tok, bins, args.out, vars(args), {"recipe.json": recipe(args, train_ds, model.cfg)})
    show = []  # held-out samples to decode, spread over the evaluation set
    if eval_ds is not None and args.stage != "motion" and args.show > 0:
        show = sorted({int(i) for i in np.linspace(0, len(eval_ds) - 1, args.show)})

    def extra_eval():  # decoded-tuple errors (rank 0; FSDP shards cannot generate alone)
        if not show or not d.main or cfg.fsdp:
            return {}
        probe = list(range(min(len(eval_ds), cfg.eval_batches * cfg.batch_size)))  # evaluate()'s samples
        return {**tuple_errors(decode_samples(model, tok, pose_tok, eval_ds, show, d.device), model.cfg.image_size),
                **loc_argmax_errors(model, tok, eval_ds, probe, d.device, cfg.batch_size)}

    last = train(run, net, train_ds, eval_ds, Collator(tok), cfg, d, extra_eval, resume=args.resume,
                 teacher_steps=args.teacher_steps if args.stage == "vlm" else 0)
    if d.main:
        print(f"done: {last}")
        if show and not cfg.fsdp:
            report(decode_samples(model, tok, pose_tok, eval_ds, show, d.device), model.cfg.image_size,
                   os.path.join(args.out, "overlay.png"))
    return run


if __name__ == "__main__":
    cli(main)
