"""Model benchmark: the figures users compare, for the tiny configuration (and with --full the
paligemma-3b one, on a GPU).

  - action-chunk latency (batch 1, p50/p90 over repeats): eager without and with the prefix KV
    cache (model.sample_actions, the reference; bf16 autocast on CUDA), and fast.FastSampler
    prepared (bf16 weights on CUDA, static prefix shape) without and with torch.compile;
  - training (forward + backward + AdamW, as trainer.py: bf16 autocast on CUDA, fp32 on CPU): step
    time, samples/s, tokens/s, model FLOPs per step (torch.utils.flop_counter) and MFU against
    --peak-tflops (default: the GPU's dense bf16 peak; n/a on CPU unless the flag is given);
  - peak memory: CUDA max_memory_allocated per measurement; on CPU the process's peak resident set
    so far (getrusage; it cannot be reset).

On CPU, CPU time (time.process_time) is printed next to wall time: on a shared machine it is the
steadier figure. Compare ratios within one run, not across machines.

    python bench.py --out bench.json                           # tiny 3-view config on this machine
    python bench.py --full --device cuda --out bench.json      # also paligemma-3b: latency, training, MFU
    python bench.py --full --device cuda --batch-sizes 4,8,16  # the largest paligemma-3b batch that fits
"""
import argparse
import datetime
import json
import resource
import sys
import time

import numpy as np
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from batches import autocast
from errors import at_least, cli
from fast import FastSampler
from config import paligemma_3b_config
from model import PoseVLA, attach_tokenizer, build_model, count_parameters
from tokenizer import PoseBins
from trainer import TrainConfig, make_optimizer, set_trainable

# Dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def synthetic_bins(n_bins):
    """Bins spanning a tabletop's range; the benchmark needs a vocabulary, not fitted statistics."""
    rng = np.random.default_rng(0)
    t = np.stack([rng.uniform(-1, 1, 4096), rng.uniform(-1, 1, 4096), rng.uniform(0.1, 3, 4096)], 1)
    return PoseBins.fit(t, rng.uniform(0.01, 1.0, (4096, 3)), n_bins=n_bins)


def random_batch(model, tok, B, label_len, device):
    """A batch shaped like real 3-view training data (random pixels, a typical prompt)."""
    cfg, S, V = model.cfg, model.cfg.image_size, model.cfg.n_views
    prompt = tok(tok.bos_token + "put the red cube on the blue plate\n", add_special_tokens=False).input_ids
    return {
        "images": torch.rand(B, V, 3, S, S, device=device) * 2 - 1,
        "view_mask": torch.ones(B, V, dtype=torch.bool, device=device),
        "prompt_ids": torch.tensor([prompt] * B, device=device),
        "prompt_mask": torch.ones(B, len(prompt), dtype=torch.bool, device=device),
        "label_ids": torch.randint(0, len(tok), (B, label_len), device=device),
        "label_mask": torch.ones(B, label_len, dtype=torch.bool, device=device),
        "state": torch.randn(B, cfg.max_dim, device=device),
        "actions": torch.randn(B, cfg.action_horizon, cfg.max_dim, device=device),
        "is_pad": torch.zeros(B, cfg.action_horizon, dtype=torch.bool, device=device),
    }


def timed(fn, repeats, device, warmup=3):
    """Wall and process-CPU milliseconds of `repeats` calls after `warmup` calls (compilation and
    CUDA-graph recording happen there): {"wall_ms": [p50, p90], "cpu_ms": [p50, p90]}."""
    wall, cpu = [], []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            wall.append(1000 * (time.perf_counter() - t0))
            cpu.append(1000 * (time.process_time() - c0))
    return {"wall_ms": np.percentile(wall, [50, 90]).tolist(), "cpu_ms": np.percentile(cpu, [50, 90]).tolist()}


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set (KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_tflops(args, device):
    """--peak-tflops, else the known dense bf16 peak of this GPU, else None (MFU n/a)."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def chunk_latency(name, model, tok, args, device):
    """Rows for one action chunk (batch 1) four ways. Casts `model` for inference (FastSampler), so
    run it after the training measurements."""
    batch = random_batch(model, tok, 1, args.label_len, device)
    noise = torch.randn(1, model.cfg.action_horizon, model.cfg.max_dim, device=device)
    model.eval()
    rows = []

    def row(what, fn, warmup=3):
        reset_peak_memory(device)
        rows.append({"model": name, "what": what, "batch": 1, **timed(fn, args.repeats, device, warmup),
                     "peak_memory_gib": peak_memory_gib(device)})
    with torch.no_grad(), autocast(device):
        reference = model.sample_actions(batch, noise=noise).float()            # (1, H, D)
        row("chunk, eager, no prefix cache", lambda: model.sample_actions(batch, noise=noise, use_cache=False))
        row("chunk, eager, prefix cache", lambda: model.sample_actions(batch, noise=noise))
    prepared = FastSampler(model, compile=False)
    row("chunk, FastSampler, not compiled", lambda: prepared(batch, noise))
    compiled = FastSampler(model, compile=True)
    start = time.perf_counter()
    diff = (compiled(batch, noise) - reference).abs().max().item()
    compile_s = time.perf_counter() - start
    row("chunk, FastSampler, compiled", lambda: compiled(batch, noise), warmup=2)
    rows[-1].update(compile_s=compile_s, max_abs_diff_vs_eager=diff)
    return rows


def train_throughput(name, model, tok, batch_size, args, device, train_cfg=None, what="train step"):
    """One row for training at `batch_size`: step time, samples/s, tokens/s, FLOPs, MFU, peak memory."""
    train_cfg = train_cfg or TrainConfig()
    model.train()
    set_trainable(model, train_cfg)
    opt = make_optimizer(model, train_cfg)
    batch = random_batch(model, tok, batch_size, args.label_len, device)

    def step():
        with autocast(device):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    reset_peak_memory(device)
    with FlopCounterMode(display=False) as flops:  # also the warm-up step: optimiser state allocated
        step()
    times = timed(step, args.repeats, device, warmup=1)
    sec, peak = times["wall_ms"][0] / 1000, peak_tflops(args, device)
    cfg = model.cfg
    tokens = cfg.n_views * (cfg.tokens_per_view + 2) + batch["prompt_ids"].shape[1] + args.label_len \
        + 1 + cfg.action_horizon
    row = {"model": name, "what": what, "batch": batch_size, **times, "samples_s": batch_size / sec,
           "tokens_s": batch_size * tokens / sec, "tflop_per_step": flops.get_total_flops() / 1e12,
           "mfu": flops.get_total_flops() / sec / (peak * 1e12) if peak else None,
           "peak_memory_gib": peak_memory_gib(device)}
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def batch_sweep(name, model, tok, args, device):
    """Training rows for each of --batch-sizes, up to the first that runs out of memory."""
    rows = []
    for b in args.batch_sizes:
        try:
            rows.append(train_throughput(name, model, tok, b, args, device, what="train step (sweep)"))
        except torch.OutOfMemoryError:
            rows.append({"model": name, "what": "train step (sweep)", "batch": b, "oom": True})
            break
    model.zero_grad(set_to_none=True)  # after the except block, which held the failed step's frames
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_tiny(args, device):
    model, tok = build_model("tiny", bins=synthetic_bins(256))
    model.to(device)
    vlm, cfg = count_parameters(model.vlm), model.cfg
    n_prefix = cfg.n_views * (cfg.tokens_per_view + 2) + random_batch(model, tok, 1, 1, device)["prompt_ids"].shape[1]
    print(f"tiny config: {count_parameters(model) / 1e6:.2f}M parameters (VLM {vlm / 1e6:.2f}M + expert and heads "
          f"{(count_parameters(model) - vlm) / 1e6:.2f}M); prefix {n_prefix} tokens (3 x ({cfg.tokens_per_view}+2) "
          f"+ prompt), {args.label_len} label tokens, suffix {1 + cfg.action_horizon} tokens")
    rows = [train_throughput("tiny", model, tok, args.batch_size, args, device)]
    if args.batch_sizes and not args.full:
        rows += batch_sweep("tiny", model, tok, args, device)
    return rows + chunk_latency("tiny", model, tok, args, device), tok


def bench_full(tok, args, device):
    """paligemma-3b on one GPU: training with full fine-tuning, with gradient checkpointing and
    expert-only at --full-batch (and the --batch-sizes sweep), then the chunk latency."""
    cfg = paligemma_3b_config()
    attach_tokenizer(cfg, tok, synthetic_bins(256))  # marker ids from the tiny tokenizer (< 257k vocab)
    with torch.device(device):
        full = PoseVLA(cfg)
    rows = []
    for what, train_cfg in (("train step, full fine-tuning", TrainConfig()),
                            ("train step, + grad checkpointing", TrainConfig(grad_checkpointing=True)),
                            ("train step, --train-expert-only", TrainConfig(train_expert_only=True))):
        full.requires_grad_(True)
        full.grad_checkpointing = train_cfg.grad_checkpointing
        tower = full.vlm.model.vision_tower
        tower.activation_checkpointing_enable({"use_reentrant": False}) if train_cfg.grad_checkpointing \
            else tower.activation_checkpointing_disable()
        rows.append(train_throughput("paligemma-3b", full, tok, args.full_batch, args, device, train_cfg, what))
    full.grad_checkpointing = False
    full.vlm.model.vision_tower.activation_checkpointing_disable()
    full.requires_grad_(True)
    if args.batch_sizes:
        rows += batch_sweep("paligemma-3b", full, tok, args, device)
    return rows + chunk_latency("paligemma-3b", full, tok, args, device)


def fmt(row, key, scale=1.0, spec=".1f"):
    v = row.get(key)
    return "n/a" if v is None else format(v * scale, spec)


def print_table(rows, device):
    cpu = device.type == "cpu"
    head = f"{'model':<13}{'measurement':<36}{'batch':>5}{'wall p50':>10}{'p90':>8}"
    head += f"{'CPU p50':>9}{'p90':>8}" if cpu else ""
    print(head + f"{'samples/s':>11}{'tokens/s':>10}{'TFLOP/step':>11}{'MFU %':>7}{'peak GiB':>9}")
    for r in rows:
        if r.get("oom"):
            print(f"{r['model']:<13}{r['what']:<36}{r['batch']:>5}  out of memory")
            continue
        line = f"{r['model']:<13}{r['what']:<36}{r['batch']:>5}{r['wall_ms'][0]:>10.1f}{r['wall_ms'][1]:>8.1f}"
        line += f"{r['cpu_ms'][0]:>9.1f}{r['cpu_ms'][1]:>8.1f}" if cpu else ""
        print(line + f"{fmt(r, 'samples_s'):>11}{fmt(r, 'tokens_s', spec='.0f'):>10}"
              f"{fmt(r, 'tflop_per_step', spec='.3f'):>11}{fmt(r, 'mfu', 100):>7}"
              f"{fmt(r, 'peak_memory_gib', spec='.2f'):>9}")
    fit = [r["batch"] for r in rows if r["what"] == "train step (sweep)" and not r.get("oom")]
    if fit:
        print(f"largest training batch of the sweep that fit: {max(fit)}")
    for r in rows:
        if "compile_s" in r:
            print(f"{r['model']}: first compiled chunk (compile included) {r['compile_s']:.1f} s; "
                  f"max |compiled - eager| {r['max_abs_diff_vs_eager']:.2e}")


def protocol(args, device):
    """What the numbers were measured under, for the JSON file."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "batch_size": args.batch_size, "full_batch": args.full_batch,
            "batch_sizes": args.batch_sizes, "label_len": args.label_len, "peak_tflops": peak_tflops(args, device),
            "dtypes": "CUDA: eager bf16 autocast over fp32 weights, FastSampler bf16 weights; CPU: fp32",
            "chunk": "batch 1, 10 Euler steps, p50/p90 after 3 warm-up calls (2 for compiled, after the compile)"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="tiny training batch")
    p.add_argument("--label-len", type=at_least(1), default=64, help="pose-text label tokens per sample")
    p.add_argument("--repeats", type=at_least(2), default=10, help="timed repeats (p50/p90 reported)")
    p.add_argument("--full", action="store_true", help="also paligemma-3b (GPU): training and chunk latency")
    p.add_argument("--full-batch", type=at_least(1), default=4, help="paligemma-3b training batch (per GPU)")
    p.add_argument("--batch-sizes", type=lambda s: [at_least(1)(b) for b in s.split(",")], default=[],
                   help="comma-separated training batches to sweep (paligemma-3b with --full, else tiny), "
                        "stopping at the first that runs out of memory")
    p.add_argument("--peak-tflops", type=at_least(0, float, strict=True), default=None,
                   help=f"device peak for MFU (default on CUDA, dense bf16: {PEAK_TFLOPS}; on CPU: MFU n/a)")
    p.add_argument("--out", default=None, help="write the rows and the protocol as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows, tok = bench_tiny(args, device)
    with torch.device("meta"):  # shapes only: no memory is allocated for 3B parameters
        full = PoseVLA(paligemma_3b_config())
    vlm = count_parameters(full.vlm)
    print(f"paligemma-3b config: VLM {vlm / 1e9:.3f}B + expert and heads "
          f"{(count_parameters(full) - vlm) / 1e9:.3f}B = {count_parameters(full) / 1e9:.3f}B parameters")
    if args.full:
        rows += bench_full(tok, args, device)
    print_table(rows, device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"protocol": protocol(args, device), "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    cli(main)
