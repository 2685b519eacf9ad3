"""What pretrain.py and posttrain.py share around their training loops (method.md §7.1).

Each stage script shows its own loop (batch -> loss -> backward -> clip -> step -> log -> eval ->
save); checkpoint.py holds run directories, save and resume;
batches.py feeds the step (resumable batches, device, autocast). Reading order here:
  1. TrainConfig and its command-line flags; the learning rates per model size;
  2. processes and devices: torchrun env vars (gloo on CPU, NCCL on GPU), DDP or FSDP wrapping,
     activation checkpointing, RNG state;
  3. optimiser (AdamW 0.9/0.95, eps 1e-8, wd 1e-10), linear warmup + cosine schedule;
  4. around the step: Log (train_log.jsonl, tqdm, data-wait timing), StopFlag (Ctrl-C/SIGTERM:
     finish the step, save, exit 130), held-out evaluation with the image-sensitivity probe under a
     forked RNG (it never shifts the training randomness, so resumed runs stay exact);
  5. generate_once: a cache folder written once and renamed into place (sim_export's built-in data).

Bad input never trains silently. A sample that cannot be read or holds NaN/inf stops the run with
an error naming its file, episode, frame and key (data.py); with --skip-bad it is replaced by the
next good sample and counted (`skipped` in train_log.jsonl). A non-finite loss or gradient norm is
always fatal (checkpoint.refuse_non_finite): the step is not applied, nothing is saved for it, the
last good checkpoint stays, and the error says which. Skipping such a batch would hide a diverging
run (too high a --lr), and bad data is already refused sample by sample before it reaches a batch.
No checkpoint with NaN/inf weights is ever written (checkpoint.save).
"""
import json
import math
import os
import random
import shutil
import signal
import sys
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from batches import autocast, to_device
from config import CONFIGS
from errors import at_least
from sensitivity import probe_images


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


def default_rates(args, cfg):
    """Fill in --lr and --vision-lr-scale from the model size (PEAK_LR, VISION_LR_SCALE) where the
    command line left them out (a given --vision-lr-scale 0 is kept)."""
    name = config_name(cfg)
    args.lr = args.lr or PEAK_LR.get(name, PEAK_LR["paligemma-3b"])
    if args.vision_lr_scale is None:
        args.vision_lr_scale = VISION_LR_SCALE.get(name, 1.0)


def config_name(cfg):
    """Which of config.CONFIGS a PoseVLAConfig was built from: its `preset`, or for a checkpoint
    written before that field existed, the preset whose networks have the same shape (None: none)."""
    if cfg.preset is not None:
        return cfg.preset
    shape = lambda v: [v[p][k] for p in ("text_config", "vision_config")  # noqa: E731
                       for k in ("hidden_size", "num_hidden_layers")]
    return next((name for name, make in CONFIGS.items() if shape(make().vlm) == shape(cfg.vlm)), None)


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


def everywhere(ok, d):
    """True when `ok` holds on every process (each process passes its own)."""
    flag = torch.tensor([float(ok)], device=d.device)
    if d.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather(obj, d):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def mean(values, d):
    """The mean of each number over the processes."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return (t / d.world).tolist()


def full_norm(norm):
    """clip_grad_norm_'s total norm as a plain tensor (under FSDP it is a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


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
        model.vlm.model.vision_tower.activation_checkpointing_enable({"use_reentrant": False})
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
# Around the step: the log, Ctrl-C, held-out evaluation

class Log:
    """train_log.jsonl (rank 0; NaN values, i.e. absent losses, left out) and the tqdm bar. Between
    two log lines it sums step time, the part spent waiting for data, and the skipped samples."""

    def __init__(self, run_dir, step, cfg, d):
        self.path, self.cfg, self.d = os.path.join(run_dir, "train_log.jsonl"), cfg, d
        self.bar = tqdm(initial=step, total=cfg.steps, disable=not d.main, dynamic_ncols=True)
        self.time = self.wait = 0.0
        self.steps = self.skipped = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def timed(self, wait, total, skipped):
        """One step done: `total` seconds, `wait` of them for its batch, `skipped` bad samples in it."""
        self.wait, self.time, self.steps, self.skipped = self.wait + wait, self.time + total, self.steps + 1, \
            self.skipped + skipped
        self.bar.update(1)

    def train(self, step, out, norm, lr):
        """The training line (collective: every process calls it): losses and skipped samples over
        the processes, learning rate, gradient norm, samples/s and the data-wait fraction."""
        loss, ntp, flow, skipped = mean(losses(out) + [self.skipped], self.d)
        skipped = round(skipped * self.d.world)  # summed over processes
        rate, wait = self.steps * self.cfg.batch_size * self.d.world / self.time, self.wait / self.time
        self.write({"step": step, "loss": loss, "ntp_loss": ntp, "flow_loss": flow, "lr": lr,
                    "grad_norm": float(full_norm(norm)), "samples_per_s": rate, "data_wait": wait,
                    "skipped": skipped}, echo=False)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}", wait=f"{wait:.0%}",
                             **({"skipped": skipped} if skipped else {}))
        self.time = self.wait = 0.0
        self.steps = self.skipped = 0

    def write(self, record, echo=True):
        """One line (rank 0); `echo`: also above the bar."""
        if not self.d.main:
            return
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def losses(out):
    return [out[k].detach().item() if k in out else float("nan") for k in ("loss", "ntp_loss", "flow_loss")]


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM: finish the step, write a checkpoint, exit. A second Ctrl-C kills.
    A context manager: the previous handlers come back however the loop ends."""

    def __enter__(self):
        self.raised = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.raised = True
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self, d):
        """True on every process when any process was signalled (collective)."""
        if d.world == 1:
            return self.raised
        flag = torch.tensor([float(self.raised)], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, step, last, run_dir, d):
        """After the checkpoint of the stopping step: say how to continue, exit with status 130."""
        if d.main:
            print(f"interrupted at step {step}: wrote {last}; continue with --resume {run_dir}", flush=True)
        sys.exit(130)


@torch.no_grad()
def evaluate(run, net, dataset, collate, cfg, d):
    """Mean held-out losses over the first eval_batches x batch x processes samples, under a
    fixed, forked RNG (the training RNG stream is untouched, so resumed runs stay exact), and the
    image-sensitivity probe (sensitivity.probe_images)."""
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
    loss, ntp, flow = mean((sums / cfg.eval_batches).tolist(), d)
    return {"eval_loss": loss, "eval_ntp_loss": ntp, "eval_flow_loss": flow,
            **probe_images(run, dataset, collate, cfg, d)}


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
