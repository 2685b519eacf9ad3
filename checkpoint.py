"""Run directories and checkpoints: where a training run starts from and what it leaves behind.

Reading order:
  1. parse_args: the flags, and with --resume the run's saved flags (train_args.json), of which
     only RESUME_OVERRIDES may change; start_model: the model from --resume, --init or fresh;
  2. finding and checking checkpoints before any work (resolve_checkpoint, check_checkpoint,
     check_start_checkpoints, check_out) and recipe.json;
  3. save and restore: a checkpoint is model.save_checkpoint's folder (weights, config, tokenizer,
     bins, the JSON files of Run.extra) plus train_state.pt (optimiser, scheduler, every process's
     RNG, the data position, the number of processes) and the log so far, all staged in one place
     (model.save_checkpoint: written under step_XXXXXX.tmp, then renamed); the last K are kept;
  4. refuse_non_finite: a step whose loss or gradient norm is NaN/inf is never applied or saved.
No checkpoint with NaN/inf weights is ever written, and a resumed run continues exactly.
"""
import argparse
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import CONFIGS
from convert import convert, is_released
from errors import read_file, read_json
from model import build_model, load_checkpoint, non_finite, save_checkpoint
from trainer import everywhere, full_norm, gather, rng_state, seed_everything, set_rng_state


# ----------------------------------------------------------------------------------------------
# Where a run starts

# Flags that may differ from the saved ones on --resume; everything else must match (exactness).
# --skip-bad may be turned on to get past a bad sample that stopped the run (until it, nothing differs).
RESUME_OVERRIDES = {"resume", "out", "steps", "workers", "eval_every", "save_every", "keep", "log_every",
                    "skip_bad"}
# Flags added after runs were written with this code, and the value that continues those runs as they were.
LATER_FLAGS = {"skip_bad": False, "anchor": "center"}


def parse_args(build_parser, argv=None, need=()):
    """Parse flags; with --resume, start from the checkpoint's train_args.json and allow only
    RESUME_OVERRIDES to change (anything else would not continue the same run). `need`: files the
    script's checkpoints must have (post-training: stats.json)."""
    args = build_parser().parse_args(argv)
    if not args.resume:
        return args
    ckpt = resolve_checkpoint(args.resume)
    check_checkpoint(ckpt, None, need=("train_state.pt", "train_args.json") + tuple(need))
    saved = read_json(os.path.join(ckpt, "train_args.json"), "the run's flags (a JSON object)")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt}/train_args.json: expected a JSON object of the run's flags")
    names = vars(build_parser().parse_args([]))
    saved = {**{k: v for k, v in LATER_FLAGS.items() if k in names}, **saved}
    if set(names) - set(saved):
        raise ValueError(f"{ckpt}/train_args.json lacks {sorted(set(names) - set(saved))}: the run was "
                         "written by the other training script")
    given = _given(build_parser, argv, names)
    for k, v in given.items():
        if k not in RESUME_OVERRIDES and v != saved[k]:
            raise ValueError(f"--resume {ckpt}: --{k.replace('_', '-')} {v!r} differs from the run's "
                             f"{saved[k]!r} (train_args.json); only {sorted(RESUME_OVERRIDES)} may change")
    merged = argparse.Namespace(**{**saved, **given})
    merged.resume = ckpt
    merged.out = given.get("out") or os.path.dirname(ckpt.rstrip("/"))
    return merged


def _given(build_parser, argv, names):
    """The flags the command line itself sets: argparse fills in a default only for a name the
    namespace does not hold yet, so a namespace of placeholders keeps every flag not given."""
    unset = object()
    blank = argparse.Namespace(**{k: unset for k in names})
    return {k: v for k, v in vars(build_parser().parse_args(argv, namespace=blank)).items() if v is not unset}


def start_model(args, fit_bins_fn):
    """(model, text tokenizer, bins) from --resume, --init or fresh. Fresh: bins from fit_bins_fn(),
    weights from --vlm or random, without priors under --no-priors. --init is one of our checkpoints
    or released pi0 / Pose-VLA weights, converted on the way in (convert.py: bins from fit_bins_fn(),
    the text tokenizer from --vlm, or the tiny config's own). From --init, --no-priors drops
    the checkpoint's ray and depth embedders (it was trained with prior dropout, so it works on RGB
    alone); --resume continues the run as it was."""
    if args.resume:
        return load_checkpoint(args.resume)
    if args.init and not is_released(args.init):
        model, tok, bins = load_checkpoint(resolve_checkpoint(args.init))
    else:  # fresh, or released pi0 / Pose-VLA weights: bins (and the tokenizer) as for a fresh run
        seed_everything(args.seed)
        bins = fit_bins_fn()
        if not args.init:
            priors = {"use_rays": False, "use_depth": False} if args.no_priors else {}
            model, tok = build_model(args.config or "tiny", bins, vlm_path=args.vlm, **priors)
            return model, tok, bins
        model, tok, _ = convert(args.init, args.config or "paligemma-3b", bins, tokenizer_dir=args.vlm)
    if args.no_priors:
        model.cfg.use_rays = model.cfg.use_depth = False
        model.fusion.rays = model.fusion.depth = None
    return model, tok, bins


# ----------------------------------------------------------------------------------------------
# Finding and checking checkpoints

def resolve_checkpoint(path):
    """A checkpoint directory, or a run directory's latest step_XXXXXX checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    steps = checkpoints(path)
    if not steps:
        raise FileNotFoundError(f"{path}: neither a checkpoint (config.json) nor a run directory with step_* "
                                "checkpoints")
    return steps[-1]


def checkpoints(run_dir):
    """A run directory's step_XXXXXX checkpoints, oldest first (a staged .tmp is none)."""
    names = sorted(n for n in os.listdir(run_dir) if re.fullmatch(r"step_\d{6,}", n))
    return [os.path.join(run_dir, n) for n in names]


def last_checkpoint(run_dir):
    """The newest checkpoint of a run, for error messages."""
    found = checkpoints(run_dir) if os.path.isdir(run_dir) else []
    return found[-1] if found else "none (no checkpoint written yet)"


def check_checkpoint(ckpt, config, need=()):
    """Fail fast on a checkpoint with missing files (model.save_checkpoint's and `need`) or one
    trained with a different model configuration than --config asks for."""
    ckpt = resolve_checkpoint(ckpt)
    for name in ("config.json", "model.safetensors", "bins.json", "tokenizer") + tuple(need):
        if not os.path.exists(os.path.join(ckpt, name)):
            raise FileNotFoundError(f"{ckpt}: missing {name}; not a complete Pose-VLA checkpoint directory")
    path = os.path.join(ckpt, "config.json")
    have = read_json(path, "a PoseVLAConfig (model.save_checkpoint)")
    if not isinstance(have, dict) or not isinstance(have.get("vlm"), dict):
        raise ValueError(f"{path}: no 'vlm' section; expected a PoseVLAConfig written by model.save_checkpoint")
    if config is None:
        return
    have, want = have["vlm"], CONFIGS[config]().vlm
    for part, key in (("text_config", "hidden_size"), ("text_config", "num_hidden_layers"),
                      ("vision_config", "hidden_size"), ("vision_config", "image_size")):
        if have[part][key] != want[part][key]:
            raise ValueError(f"{path}: {part}.{key} = {have[part][key]} but --config {config} has "
                             f"{want[part][key]}; the checkpoint was trained with another configuration")


def check_start_checkpoints(args, resume_needs=()):
    """The start checks both stages share, after their own: --init and --resume are complete
    checkpoints of the --config asked for (a --resume also holds `resume_needs`), and the full
    configuration has PaliGemma's weights to start from."""
    if args.init and not is_released(args.init):  # released weights: convert.py checks them
        check_checkpoint(args.init, args.config)
    if args.resume:
        check_checkpoint(args.resume, args.config, need=resume_needs)
    if args.config == "paligemma-3b" and not (args.vlm or args.init or args.resume):
        raise ValueError("--config paligemma-3b needs --vlm DIR (a local google/paligemma-3b-pt-224)")


def check_out(args):
    """A fresh run must not write into another run's folder: save() keeps an existing step_XXXXXX
    instead of this run's and the log would be overwritten. --resume it, or choose another --out."""
    if args.resume or not os.path.exists(args.out):
        return
    if not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: is a file; expected a run directory")
    if checkpoints(args.out):
        raise ValueError(f"--out {args.out} already holds a run ({os.path.basename(checkpoints(args.out)[-1])}); "
                         f"continue it with --resume {args.out} or choose another --out")


def recipe_json(stage, cameras, image_size, robot=None, chunk=None, stride=None, source=None):
    """recipe.json: how a checkpoint sees the world, read back by policy.py: the views in order, the
    image size and, for an action stage, the robot, chunk, stride and the state/action widths of
    `source`'s episodes (None where the stage has no actions)."""
    width = lambda key: int(getattr(source.episodes[0], key).shape[1]) if source is not None else None  # noqa: E731
    return {"robot": robot, "cameras": list(cameras), "chunk": chunk, "stride": stride,
            "state_dim": width("state"), "action_dim": width("action"), "image_size": image_size, "stage": stage}


# ----------------------------------------------------------------------------------------------
# Save and restore

@dataclass
class Run:
    """What a checkpoint holds besides the optimiser state."""
    model: torch.nn.Module  # the unwrapped PoseVLA
    tok: object             # text tokenizer (pose tokens included)
    bins: object            # PoseBins
    out: str                # run directory
    args: dict              # the flags, saved as train_args.json (for --resume)
    extra: dict             # more JSON files per checkpoint: recipe.json, stats.json


def start_log(run, d):
    """A fresh run: its directory and an empty train_log.jsonl (rank 0). Returns step 0."""
    if d.main:
        os.makedirs(run.out, exist_ok=True)
        open(os.path.join(run.out, "train_log.jsonl"), "w").close()
    return 0


class _FullWeights:
    """What save_checkpoint needs (cfg, state_dict) when FSDP holds the weights in shards."""

    def __init__(self, cfg, state):
        self.cfg, self.state = cfg, state

    def state_dict(self):
        return self.state


def _full_states(run, optimizer, cfg):
    """Weights and optimiser state as full (unsharded) dicts; collective under FSDP."""
    if not cfg.fsdp:
        return run.model, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = _FullWeights(run.model.cfg, get_model_state_dict(run.model, options=opts))
    return weights, get_optimizer_state_dict(run.model, optimizer, options=opts)


def save(run, step, optimizer, scheduler, batches, cfg, d):
    """Write <out>/step_XXXXXX (model.save_checkpoint stages it and renames) and keep the last K.
    Refused, on every process, when any weight holds NaN/inf."""
    final = os.path.join(run.out, f"step_{step:06d}")
    rngs = gather(rng_state(), d)
    weights, optim = _full_states(run, optimizer, cfg)
    bad = non_finite(weights.state_dict())
    if not everywhere(not bad, d):
        raise ValueError(f"step {step}: weight tensors hold NaN/inf ({bad[:3] or 'on another process'}); not "
                         f"writing {final}; the last good checkpoint is {last_checkpoint(run.out)}")
    if d.main and not os.path.exists(final):
        state = {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs,
                 "data": batches.state_dict(), "world": d.world}
        files = {"train_args.json": run.args, **run.extra, "train_state.pt": lambda path: torch.save(state, path)}
        log = os.path.join(run.out, "train_log.jsonl")
        if os.path.exists(log):
            files["train_log.jsonl"] = lambda path: shutil.copy(log, path)
        save_checkpoint(final, weights, run.tok, run.bins, extra=files)
        for old in checkpoints(run.out)[:-cfg.keep]:
            shutil.rmtree(old)
    if d.world > 1:
        dist.barrier()
    return final


def restore(ckpt, run, optimizer, scheduler, batches, cfg, d):
    """Load train_state.pt (the weights came with load_checkpoint) and the log up to it; returns the step."""
    path = os.path.join(ckpt, "train_state.pt")
    state = read_file(path, "the training state (checkpoint.save: optimiser, scheduler, RNG, data position)",
                      lambda p: torch.load(p, map_location="cpu", weights_only=False))
    missing = {"step", "optimizer", "scheduler", "rng", "data", "world"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{path}: missing {sorted(missing)}; not a training state written by checkpoint.save")
    if state["world"] != d.world:
        raise ValueError(f"{ckpt}: written by {state['world']} processes, resumed with {d.world}; "
                         "use the same number to continue exactly")
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        # strict=False: parameters that never received a gradient have no AdamW state yet.
        set_optimizer_state_dict(run.model, optimizer, state["optimizer"], options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["data"])
    set_rng_state(state["rng"][d.rank])
    if d.main:
        os.makedirs(run.out, exist_ok=True)
        log = os.path.join(ckpt, "train_log.jsonl")
        if os.path.exists(log) and os.path.abspath(ckpt) != os.path.abspath(run.out):
            shutil.copy(log, os.path.join(run.out, "train_log.jsonl"))  # the log up to this step
    return int(state["step"])


# ----------------------------------------------------------------------------------------------
# Never a non-finite step

def refuse_non_finite(step, out, norm, run_dir, d):
    """Raise, on every process, when this step's loss or gradient norm is NaN/inf on any process:
    the samples were checked as they were read, so the run diverged; skipping the batch would
    hide that. Called before optimizer.step(), so nothing of the step is applied or saved."""
    if everywhere(bool(torch.isfinite(out["loss"].detach()) and torch.isfinite(full_norm(norm))), d):
        return
    parts = ", ".join(f"{k} {out[k].item():.4g}" for k in ("loss", "ntp_loss", "flow_loss") if k in out)
    norm = float(full_norm(norm))
    raise ValueError(f"step {step}: the loss or gradient is not finite ({parts}, grad norm {norm:.4g}); "
                     "training stopped without applying the step or saving it. The last good checkpoint is "
                     f"{last_checkpoint(run_dir)}. Every sample was checked for NaN/inf as it was read, so the run "
                     "diverged: lower --lr or raise --warmup")
