"""The training loop shared by pretrain.py and posttrain.py (method.md §7.1).

Reading order:
  1. TrainConfig and its command-line flags; `parse_args` (with `--resume`, the saved flags);
  2. distributed setup (torchrun env vars; gloo on CPU, NCCL on GPU), DDP or FSDP wrapping;
  3. optimiser (AdamW 0.9/0.95, eps 1e-8, wd 1e-10), linear warmup + cosine schedule;
  4. Batches: endless per-process batches from a MixtureSampler with a resumable data position;
  5. checkpoints: model.save_checkpoint + train_state.pt, written atomically, the last K kept;
  6. train(): the loop (bf16 autocast on CUDA, fp32 on CPU, grad-norm clip 1.0, tqdm, held-out
     evaluation with the image-sensitivity probe, also logged at step 0 before any update, Ctrl-C
     writes a checkpoint and exits);
  7. generate_once: a cache folder written once and renamed into place (sim_export's built-in data).
A resumed run continues exactly: optimiser, scheduler, every process's RNG and the data position
are restored, and evaluation runs under a forked RNG so it never shifts the training randomness.

Bad input never trains silently. A sample that cannot be read or holds NaN/inf stops the run with
an error naming its file, episode, frame and key (data.py); with --skip-bad it is replaced by the
next good sample and counted (`skipped` in train_log.jsonl). A non-finite loss or gradient norm is
always fatal: the step is not applied, nothing is saved for it, the last good checkpoint stays, and
the error says which. Skipping such a batch would hide a diverging run (too high a --lr), and bad
data is already refused sample by sample before it reaches a batch. No checkpoint with NaN/inf
weights is ever written.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import MixtureSampler
from errors import at_least, read_file, read_json
from model import CONFIGS, build_model, image_sensitivity, load_checkpoint, non_finite, save_checkpoint
from tokenizer import loc_tokens


# ----------------------------------------------------------------------------------------------
# Config and flags

@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8          # per process; the global batch is batch_size x processes
    lr: float = 1e-3             # peak (see PEAK_LR)
    min_lr_ratio: float = 0.1    # cosine ends at lr/10 (method.md §7.1: 2.5e-5 -> 2.5e-6)
    warmup: int = 50             # linear warm-up steps
    weight_decay: float = 1e-10  # method.md §7.1 (practically none: the VLM's weights are the prior)
    grad_clip: float = 1.0       # method.md §7.1
    action_weight: float = 1.0   # stage 2 weighs the flow loss x10 (method.md §7.4)
    eval_every: int = 200        # steps between held-out evaluations (0 = never)
    eval_batches: int = 4        # batches per evaluation, per process
    save_every: int = 500        # steps between checkpoints (the last step is always saved)
    keep: int = 2                # checkpoints kept (older ones are deleted)
    log_every: int = 10          # steps between train_log.jsonl lines
    workers: int = 1             # DataLoader worker processes per training process
    seed: int = 0
    vision_lr_scale: float = 1.0  # the vision tower's lr relative to the rest (see VISION_LR_SCALE)
    freeze_vision: bool = False
    train_expert_only: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False


# Peak learning rate per model size: the tiny model learns from scratch; method.md §7.1 for the full model.
PEAK_LR = {"tiny": 1e-3, "paligemma-3b": 2.5e-5}
# The vision tower's share of it: the tiny VLM's tower is slowed x10 after its own phase, as
# PaliGemma protects its encoder (at 1e-3 the tiny tower collapses); the full model trains all alike.
VISION_LR_SCALE = {"tiny": 0.1, "paligemma-3b": 1.0}
# Flags that may differ from the saved ones on --resume; everything else must match (exactness).
# --skip-bad may be turned on to get past a bad sample that stopped the run (until it, nothing differs).
RESUME_OVERRIDES = {"resume", "out", "steps", "workers", "eval_every", "save_every", "keep", "log_every",
                    "skip_bad"}
# The smallest value of each numeric flag, refused by argparse below it (--lr: at or below it).
FLAG_MINIMUM = {"steps": 1, "batch_size": 1, "warmup": 0, "eval_every": 0, "save_every": 1, "keep": 1,
                "log_every": 1, "workers": 0, "lr": 0.0, "vision_lr_scale": 0.0}


def add_train_args(p, **defaults):
    """The loop's flags (defaults: TrainConfig's, overridden per script via `defaults`)."""
    d = {f.name: f.default for f in fields(TrainConfig)} | {"vision_lr_scale": None} | defaults
    types = {f.name: f.type for f in fields(TrainConfig)}
    p.add_argument("--config", default=None, choices=sorted(CONFIGS),
                   help="model size (default tiny; with --init/--resume the checkpoint's, which must match)")
    p.add_argument("--vlm", default=None, help="local PaliGemma directory (save_pretrained layout) to start from")
    p.add_argument("--no-priors", action="store_true",
                   help="RGB only: a fresh model without the depth and ray priors, or --init's with them removed "
                        "(ignored with --resume: the run's)")
    p.add_argument("--scratch", action="store_true",
                   help="tiny config on the built-in data: start from random weights instead of the tiny VLM "
                        "(the vision tower then collapses; kept to show why the tiny VLM exists)")
    p.add_argument("--out", default=None, help="run directory: checkpoints step_XXXXXX/, train_log.jsonl")
    p.add_argument("--resume", default=None,
                   help="checkpoint (or run directory: its latest) to continue exactly; saved flags are reused")
    for name, text in (("steps", "optimiser steps"), ("batch_size", "samples per step and process"),
                       ("lr", "peak learning rate (default: 1e-3 tiny, 2.5e-5 paligemma-3b)"),
                       ("warmup", "linear warm-up steps"),
                       ("vision_lr_scale", "the vision tower's learning rate as a fraction of --lr "
                                           "(default 0.1 tiny, 1.0 paligemma-3b)"),
                       ("eval_every", "steps between held-out evaluations (0 = never)"),
                       ("save_every", "steps between checkpoints"), ("keep", "checkpoints to keep"),
                       ("log_every", "steps between log lines"), ("workers", "DataLoader workers per process"),
                       ("seed", "random seed (model init, data order, noise)")):
        kind = types[name] if name not in FLAG_MINIMUM else at_least(FLAG_MINIMUM[name], types[name], name == "lr")
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name], help=text)
    for name, text in (("freeze_vision", "keep the SigLIP vision tower fixed"),
                       ("train_expert_only", "train only the action expert and its heads"),
                       ("grad_checkpointing", "recompute layer activations in backward (less memory)"),
                       ("compile", "torch.compile the model"),
                       ("fsdp", "shard parameters, gradients and optimiser state with FSDP (full model)"),
                       ("skip_bad", "leave out unreadable or non-finite images, episodes and samples (warned, "
                                    "counted as `skipped` in train_log.jsonl) instead of stopping")):
        p.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
    return p


def train_config(args):
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


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
    saved.setdefault("skip_bad", False)  # runs from before the flag existed
    names = vars(build_parser().parse_args([]))
    if set(names) - set(saved):
        raise ValueError(f"{ckpt}/train_args.json lacks {sorted(set(names) - set(saved))}: the run was "
                         "written by the other training script")
    unset = object()  # argparse fills in defaults only for names the namespace does not hold yet
    blank = argparse.Namespace(**{k: unset for k in names})
    given = {k: v for k, v in vars(build_parser().parse_args(argv, namespace=blank)).items() if v is not unset}
    for k, v in given.items():
        if k not in RESUME_OVERRIDES and v != saved.get(k):
            raise ValueError(f"--resume {ckpt}: --{k.replace('_', '-')} {v!r} differs from the run's "
                             f"{saved.get(k)!r} (train_args.json); only {sorted(RESUME_OVERRIDES)} may change")
    merged = argparse.Namespace(**{**saved, **given})
    merged.resume = ckpt
    merged.out = given.get("out") or os.path.dirname(ckpt.rstrip("/"))
    return merged


def start_model(args, fit_bins_fn):
    """(model, text tokenizer, bins) from --resume, --init or fresh. Fresh: bins from fit_bins_fn(),
    weights from --vlm or random, without priors under --no-priors. From --init, --no-priors drops
    the checkpoint's ray and depth embedders (it was trained with prior dropout, so it works on RGB
    alone); --resume continues the run as it was."""
    if args.resume:
        return load_checkpoint(args.resume)
    if args.init:
        model, tok, bins = load_checkpoint(resolve_checkpoint(args.init))
        if args.no_priors:
            model.cfg.use_rays = model.cfg.use_depth = False
            model.fusion.rays = model.fusion.depth = None
        return model, tok, bins
    seed_everything(args.seed)
    bins = fit_bins_fn()
    priors = {"use_rays": False, "use_depth": False} if args.no_priors else {}
    model, tok = build_model(args.config or "tiny", bins, vlm_path=args.vlm, **priors)
    return model, tok, bins


def default_rates(args, cfg):
    """Fill in --lr and --vision-lr-scale from the model size (PEAK_LR, VISION_LR_SCALE) where the
    command line left them out (a given --vision-lr-scale 0 is kept)."""
    name = config_name(cfg)
    args.lr = args.lr or PEAK_LR.get(name, PEAK_LR["paligemma-3b"])
    if args.vision_lr_scale is None:
        args.vision_lr_scale = VISION_LR_SCALE.get(name, 1.0)


def config_name(cfg):
    """Which of model.CONFIGS a PoseVLAConfig was built from: its `preset`, or for a checkpoint
    written before that field existed, the preset whose networks have the same shape (None: none)."""
    if cfg.preset is not None:
        return cfg.preset
    shape = lambda v: [v[p][k] for p in ("text_config", "vision_config")  # noqa: E731
                       for k in ("hidden_size", "num_hidden_layers")]
    return next((name for name, make in CONFIGS.items() if shape(make().vlm) == shape(cfg.vlm)), None)


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
    for ckpt, need in ((args.init, ()), (args.resume, resume_needs)):
        if ckpt:
            check_checkpoint(ckpt, args.config, need=need)
    if args.config == "paligemma-3b" and not (args.vlm or args.init or args.resume):
        raise ValueError("--config paligemma-3b needs --vlm DIR (a local google/paligemma-3b-pt-224)")


def recipe_json(stage, cameras, image_size, robot=None, chunk=None, stride=None, source=None):
    """recipe.json: how a checkpoint sees the world, read back by policy.py: the views in order, the
    image size and, for an action stage, the robot, chunk, stride and the state/action widths of
    `source`'s episodes (None where the stage has no actions)."""
    width = lambda key: int(getattr(source.episodes[0], key).shape[1]) if source is not None else None  # noqa: E731
    return {"robot": robot, "cameras": list(cameras), "chunk": chunk, "stride": stride,
            "state_dim": width("state"), "action_dim": width("action"), "image_size": image_size, "stage": stage}


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
    names = sorted(n for n in os.listdir(run_dir) if re.fullmatch(r"step_\d{6,}", n))
    return [os.path.join(run_dir, n) for n in names]


# ----------------------------------------------------------------------------------------------
# Processes and devices

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(int(os.environ.get("RANK", 0)), world, device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def set_trainable(model, cfg):
    """--train-expert-only keeps the VLM (and geometry fusion) fixed; --freeze-vision the SigLIP tower."""
    if cfg.train_expert_only:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(("vlm.", "fusion.")))
    if cfg.freeze_vision:
        model.vlm.model.vision_tower.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters left (check --freeze-vision/--train-expert-only)")


def wrap(model, cfg, d):
    """Move to the device, then DDP (several processes) or FSDP. Returns the module to call."""
    model.grad_checkpointing = cfg.grad_checkpointing  # the joint Gemma/expert layers (model.py)
    if cfg.grad_checkpointing:  # and the SigLIP tower, through transformers' own switch
        model.vlm.model.vision_tower.gradient_checkpointing_enable({"use_reentrant": False})
    model.to(d.device)
    if cfg.fsdp:
        if d.world < 2:
            raise ValueError("--fsdp needs several processes: torchrun --nproc_per_node=N ...")
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        # Units must be modules whose forward() runs: joint_layer calls each layer's projections and
        # MLP directly, so the MLPs (most of the weights) and the vision layers are the shards, and
        # the root gathers the rest (embeddings, attention projections) around each forward.
        for layer in list(model.lm.layers) + list(model.expert_layers):
            fully_shard(layer.mlp)
        for layer in model.vlm.model.vision_tower.encoder.layers:
            fully_shard(layer)
        fully_shard(model)
        # The image-sensitivity probe calls these directly, not through forward(): FSDP must gather
        # the root's weights (embeddings, attention projections) around them too.
        for method in ("joint_forward", "label_logits", "sample_actions"):
            register_fsdp_forward_method(model, method)
        net = model
    elif d.world > 1:
        # Stage-dependent parts (expert in stage 1, dropped priors) get no gradient in some steps.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None, find_unused_parameters=True)
    else:
        net = model
    return torch.compile(net) if cfg.compile else net


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule

def make_optimizer(model, cfg):
    """AdamW; the vision tower's learning rate is cfg.vision_lr_scale x the rest (PaliGemma guards its
    encoder from a fresh decoder's gradients this way)."""
    tower = {id(p) for p in model.vlm.model.vision_tower.parameters()}
    groups = [[p for p in model.parameters() if p.requires_grad and (id(p) in tower) == is_tower]
              for is_tower in (False, True)]
    return torch.optim.AdamW([{"params": groups[0]}, {"params": groups[1], "lr": cfg.lr * cfg.vision_lr_scale}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg):
    """Linear warm-up to the peak, then cosine down to min_lr_ratio x peak at the last step."""
    def factor(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Data

class RankShard(torch.utils.data.Sampler):
    """Every world-th index of a sampler, starting at rank; all ranks get the same count."""

    def __init__(self, sampler, rank, world):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self):
        idx = list(self.sampler)
        return iter(idx[self.rank:len(idx) // self.world * self.world:self.world])

    def __len__(self):
        return len(self.sampler) // self.world


class Batches:
    """Endless batches for this process. Position = (epoch, global samples consumed this epoch), so
    a resumed run draws exactly the batches the uninterrupted run would have drawn next."""

    def __init__(self, dataset, collate, cfg, d):
        if len(dataset) < cfg.batch_size * d.world:
            raise ValueError(f"{type(dataset).__name__} has {len(dataset)} samples; one step needs "
                             f"batch_size x processes = {cfg.batch_size * d.world}")
        self.ds, self.collate, self.cfg, self.d = dataset, collate, cfg, d
        self.sampler = MixtureSampler(dataset.sizes, seed=cfg.seed)
        self.epoch, self.consumed, self.it = 0, 0, None

    def _start(self):
        self.ds.set_epoch(self.epoch)
        self.sampler.load_state_dict({"epoch": self.epoch, "start": self.consumed})
        # Own generator: creating an iterator must not draw from the global RNG (exact resume).
        # Spawned workers: a forked child can inherit locks held by threads of pyarrow, PyAV, HDF5
        # or an EGL context (built-in data generation) and deadlock (see data.make_loader).
        loader = torch.utils.data.DataLoader(
            self.ds, batch_size=self.cfg.batch_size, sampler=RankShard(self.sampler, self.d.rank, self.d.world),
            num_workers=self.cfg.workers, collate_fn=self.collate, drop_last=True, worker_init_fn=_worker_init,
            generator=torch.Generator().manual_seed(self.cfg.seed), persistent_workers=False,
            multiprocessing_context="spawn" if self.cfg.workers > 0 else None)
        self.it = iter(loader)

    def __next__(self):
        while True:
            if self.it is None:
                self._start()
            try:
                batch = next(self.it)
                self.consumed += self.cfg.batch_size * self.d.world
                return batch
            except StopIteration:
                self.it, self.epoch, self.consumed = None, self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, s):
        self.epoch, self.consumed, self.it = int(s["epoch"]), int(s["consumed"]), None


def to_device(batch, device):
    """Tensors to the device; the Collator's count of skipped samples stays behind (the loop reads
    it before)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            if k != "skipped"}


def autocast(device):
    """bf16 autocast on CUDA (method.md §7.1); full fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Checkpoints

@dataclass
class Run:
    """What a checkpoint holds besides the optimiser state."""
    model: torch.nn.Module  # the unwrapped PoseVLA
    tok: object             # text tokenizer (pose tokens included)
    bins: object            # PoseBins
    out: str                # run directory
    args: dict              # the flags, saved as train_args.json (for --resume)
    extra: dict             # more JSON files per checkpoint: recipe.json, stats.json


class _FullWeights:
    """What save_checkpoint needs (cfg, state_dict) when FSDP holds the weights in shards."""

    def __init__(self, cfg, state):
        self.cfg, self.state = cfg, state

    def state_dict(self):
        return self.state


def _gather(obj, d):
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


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
    """Write <out>/step_XXXXXX atomically (staged under .partial, then renamed) and keep the last K."""
    final = os.path.join(run.out, f"step_{step:06d}")
    rngs = _gather(rng_state(), d)
    weights, optim = _full_states(run, optimizer, cfg)
    bad = non_finite(weights.state_dict())
    if not _everywhere(not bad, d):
        raise ValueError(f"step {step}: weight tensors hold NaN/inf ({bad[:3] or 'on another process'}); not "
                         f"writing {final}; the last good checkpoint is {_last_checkpoint(run.out)}")
    if d.main and not os.path.exists(final):
        stage = final + ".partial"
        shutil.rmtree(stage, ignore_errors=True)
        save_checkpoint(stage, weights, run.tok, run.bins, extra={"train_args.json": run.args, **run.extra})
        torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs,
                    "data": batches.state_dict(), "world": d.world}, os.path.join(stage, "train_state.pt"))
        log = os.path.join(run.out, "train_log.jsonl")
        if os.path.exists(log):
            shutil.copy(log, os.path.join(stage, "train_log.jsonl"))
        os.rename(stage, final)
        for old in checkpoints(run.out)[:-cfg.keep]:
            shutil.rmtree(old)
    if d.world > 1:
        dist.barrier()
    return final


def _last_checkpoint(run_dir):
    found = checkpoints(run_dir) if os.path.isdir(run_dir) else []
    return found[-1] if found else "none (no checkpoint written yet)"


def restore(ckpt, run, optimizer, scheduler, batches, cfg, d):
    """Load train_state.pt (the weights came with load_checkpoint); returns the step."""
    path = os.path.join(ckpt, "train_state.pt")
    state = read_file(path, "the training state (trainer.save: optimiser, scheduler, RNG, data position)",
                      lambda p: torch.load(p, map_location="cpu", weights_only=False))
    missing = {"step", "optimizer", "scheduler", "rng", "data", "world"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{path}: missing {sorted(missing)}; not a training state written by trainer.save")
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
    log = os.path.join(ckpt, "train_log.jsonl")
    if d.main and os.path.exists(log) and os.path.abspath(ckpt) != os.path.abspath(run.out):
        shutil.copy(log, os.path.join(run.out, "train_log.jsonl"))  # the log up to this step
    return int(state["step"])


# ----------------------------------------------------------------------------------------------
# The loop

class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM: finish the step, write a checkpoint, exit. A second Ctrl-C kills."""

    def __init__(self):
        self.raised = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.raised = True
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self, d):
        """True on every process when any process was signalled."""
        if d.world == 1:
            return self.raised
        flag = torch.tensor([float(self.raised)], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _mean(values, d):
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return (t / d.world).tolist()


def losses(out):
    return [out[k].detach().item() if k in out else float("nan") for k in ("loss", "ntp_loss", "flow_loss")]


@torch.no_grad()
def evaluate(run, net, dataset, collate, cfg, d):
    """Mean held-out losses over the first eval_batches x batch x processes samples, under a
    fixed, forked RNG (the training RNG stream is untouched, so resumed runs stay exact), and the
    image-sensitivity probe (probe_images)."""
    n = cfg.eval_batches * cfg.batch_size * d.world
    idx = [i % len(dataset) for i in range(n)][d.rank::d.world]
    dataset.set_epoch(0)
    sums = np.zeros(3)
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 12345)
        net.eval()
        for b in range(0, len(idx), cfg.batch_size):
            batch = to_device(collate([dataset[i] for i in idx[b:b + cfg.batch_size]]), d.device)
            with autocast(d.device):
                sums += losses(net(batch, action_weight=cfg.action_weight))  # nan: that loss is absent
        net.train()
    loss, ntp, flow = _mean((sums / cfg.eval_batches).tolist(), d)
    return {"eval_loss": loss, "eval_ntp_loss": ntp, "eval_flow_loss": flow,
            **probe_images(run, dataset, collate, cfg, d)}


def probe_images(run, dataset, collate, cfg, d):
    """model.image_sensitivity on the held-out set's first batch (at least 2 samples), keys prefixed
    `eval_`; {} for a one-sample set. Every process probes the same samples, so the figures agree
    without a reduction and FSDP's collectives line up."""
    n = min(len(dataset), max(2, cfg.batch_size))
    if n < 2:
        return {}
    dataset.set_epoch(0)
    batch = to_device(collate([dataset[i] for i in range(n)]), d.device)
    with autocast(d.device):
        figures = image_sensitivity(run.model, batch, loc_ids=run.tok.convert_tokens_to_ids(loc_tokens()))
    return {f"eval_{k}": v for k, v in figures.items()}


def _log(run, d, record, bar=None):
    if not d.main:
        return
    record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
    with open(os.path.join(run.out, "train_log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if bar is not None:
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def _worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the main process reacts to Ctrl-C


def train(run, net, dataset, collate, cfg, d, eval_dataset=None, extra_eval=None, resume=None):
    """Optimise `net` (wrapping run.model) for cfg.steps steps; returns the last checkpoint path.
    extra_eval(run, d) -> dict adds task metrics (e.g. decoded-tuple errors) to each evaluation."""
    optimizer, params = make_optimizer(run.model, cfg), [p for p in run.model.parameters() if p.requires_grad]
    scheduler = make_scheduler(optimizer, cfg)
    batches = Batches(dataset, collate, cfg, d)
    seed_everything(cfg.seed + 1000 * d.rank)  # different flow noise per process, same data order
    if d.main:
        os.makedirs(run.out, exist_ok=True)
        if not resume:
            open(os.path.join(run.out, "train_log.jsonl"), "w").close()
    step = restore(resume, run, optimizer, scheduler, batches, cfg, d) if resume else 0
    if not resume and eval_dataset is not None and cfg.eval_every:  # at init: what training changes
        _log(run, d, {"step": 0, **probe_images(run, eval_dataset, collate, cfg, d)})
    stop, last = StopFlag(), None
    bar = tqdm(initial=step, total=cfg.steps, disable=not d.main, dynamic_ncols=True)
    window = {"time": 0.0, "wait": 0.0, "steps": 0, "skipped": 0}
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            window["skipped"] += batch.pop("skipped", 0)
            batch = to_device(batch, d.device)
            t1 = time.perf_counter()
            with autocast(d.device):
                out = net(batch, action_weight=cfg.action_weight)
            out["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not _finite_step(out["loss"], norm, d):
                raise ValueError(_non_finite_message(step + 1, out, norm, run.out))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window["wait"], window["time"] = window["wait"] + t1 - t0, window["time"] + time.perf_counter() - t0
            window["steps"] += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss, ntp, flow, skipped = _mean(losses(out) + [window["skipped"]], d)
                skipped = round(skipped * d.world)  # summed over processes
                norm = float(_full(norm))
                rate = window["steps"] * cfg.batch_size * d.world / window["time"]
                lr = scheduler.get_last_lr()[0]
                record = {"step": step, "loss": loss, "ntp_loss": ntp, "flow_loss": flow, "lr": lr, "grad_norm": norm,
                          "samples_per_s": rate, "data_wait": window["wait"] / window["time"],
                          "skipped": skipped}
                _log(run, d, record)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}",
                                wait=f"{record['data_wait']:.0%}", **({"skipped": skipped} if skipped else {}))
                window = {"time": 0.0, "wait": 0.0, "steps": 0, "skipped": 0}
            bar.update(1)
            if eval_dataset is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                record = {"step": step, **evaluate(run, net, eval_dataset, collate, cfg, d)}
                if extra_eval is not None:
                    record.update(extra_eval(run, d))
                _log(run, d, record, bar)
            stopping = stop.agreed(d)
            if stopping or step % cfg.save_every == 0 or step == cfg.steps:
                last = save(run, step, optimizer, scheduler, batches, cfg, d)
            if stopping:
                if d.main:
                    print(f"interrupted at step {step}: wrote {last}; continue with --resume {run.out}", flush=True)
                sys.exit(130)
    finally:  # an error (a bad sample, a non-finite step) restores the signal handlers too
        bar.close()
        stop.close()
    return last


def _full(norm):
    """clip_grad_norm_'s total norm as a plain tensor (under FSDP it is a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _finite_step(loss, norm, d):
    """True on every process when this step's loss and gradient norm are finite on every process."""
    return _everywhere(bool(torch.isfinite(loss.detach()) and torch.isfinite(_full(norm))), d)


def _everywhere(ok, d):
    """True when `ok` holds on every process (each process passes its own)."""
    flag = torch.tensor([float(ok)], device=d.device)
    if d.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _non_finite_message(step, out, norm, run_dir):
    parts = ", ".join(f"{k} {out[k].item():.4g}" for k in ("loss", "ntp_loss", "flow_loss") if k in out)
    norm = float(_full(norm))
    return (f"step {step}: the loss or gradient is not finite ({parts}, grad norm {norm:.4g}); training stopped "
            f"without applying the step or saving it. The last good checkpoint is {_last_checkpoint(run_dir)}. "
            "Every sample was checked for NaN/inf as it was read, so the run diverged: lower --lr or raise --warmup")


# ----------------------------------------------------------------------------------------------
# Generated data (the built-in tabletop sets, the tiny VLM's images), written once into a cache folder

def generate_once(path, write, d):
    """Run `write(tmp)` once (rank 0), then rename: an interrupted generation leaves no half cache."""
    if d.main and not os.path.exists(path):
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(tmp)
        os.rename(tmp, path)
    if d.world > 1:
        dist.barrier()
    return path
