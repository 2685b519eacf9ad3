"""Model benchmark: sizes, sequence lengths, action-chunk latency with and without the
prefix KV cache, training throughput, and the full 3B configuration's parameter count.

    python bench.py                      # tiny 3-view config on this machine
    python bench.py --full --device cuda # also the paligemma-3b training recipe: step time, peak memory

Timings are medians over repeats; compare ratios within one run, not across machines.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from errors import at_least, cli
from model import PoseVLA, attach_tokenizer, build_model, count_parameters, paligemma_3b_config
from tokenizer import PoseBins


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


def timed(fn, repeats, device):
    """Median wall seconds over `repeats` calls after a warm-up call. On CPU the median process
    CPU seconds are returned too: on a shared machine they are the steadier figure."""
    wall, cpu = [], []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall[1:]), statistics.median(cpu[1:])


def bench_model(model, tok, args, device, dtype):
    model.to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    batch = random_batch(model, tok, 1, args.label_len, device)
    n_prefix = model.cfg.n_views * (model.cfg.tokens_per_view + 2) + batch["prompt_ids"].shape[1]
    print(f"  prefix tokens {n_prefix} (3 views x ({model.cfg.tokens_per_view}+2) + prompt), "
          f"label tokens {args.label_len}, suffix tokens {1 + model.cfg.action_horizon}")
    model.eval()
    with autocast:
        cached = timed(lambda: model.sample_actions(batch), args.repeats, device)
        naive = timed(lambda: model.sample_actions(batch, use_cache=False), args.repeats, device)
    for what, i in (("wall", 0), ("CPU", 1)):
        print(f"  action chunk ({model.cfg.flow_steps} Euler steps, {what}): {1000 * cached[i]:.1f} ms with prefix "
              f"cache, {1000 * naive[i]:.1f} ms without  -> {naive[i] / cached[i]:.1f}x")
    model.train()
    batch = random_batch(model, tok, args.batch_size, args.label_len, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        with autocast:
            loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt, _ = timed(step, args.repeats, device)
    print(f"  train step at batch {args.batch_size}: {dt * 1000:.0f} ms -> {1 / dt:.2f} steps/s, "
          f"{args.batch_size / dt:.1f} samples/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="training batch for the throughput figure")
    p.add_argument("--label-len", type=at_least(1), default=64, help="pose-text label tokens per sample")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed repeats (median reported)")
    p.add_argument("--full", action="store_true", help="also allocate and time paligemma-3b (GPU: fp32 weights, "
                   "bf16 autocast, AdamW, as trainer.py trains it)")
    p.add_argument("--full-batch", type=at_least(1), default=4, help="paligemma-3b training batch (per GPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print("tiny config (3 views, fp32):")
    model, tok = build_model("tiny", bins=synthetic_bins(256))
    vlm = count_parameters(model.vlm)
    print(f"  parameters: {count_parameters(model) / 1e6:.2f}M total = VLM {vlm / 1e6:.2f}M "
          f"+ expert and heads {(count_parameters(model) - vlm) / 1e6:.2f}M")
    bench_model(model, tok, args, device, torch.float32)

    with torch.device("meta"):  # shapes only: no memory is allocated for 3B parameters
        full = PoseVLA(paligemma_3b_config())
    vlm = count_parameters(full.vlm)
    print(f"paligemma-3b config: VLM {vlm / 1e9:.3f}B + expert and heads "
          f"{(count_parameters(full) - vlm) / 1e9:.3f}B = {count_parameters(full) / 1e9:.3f}B parameters")
    if args.full:
        bench_full(tok, args, device)


def bench_full(tok, args, device):
    """The training recipe on one GPU: fp32 weights, bf16 autocast, AdamW (trainer.py); step time
    and peak memory for full fine-tuning with and without gradient checkpointing, and expert-only."""
    from trainer import TrainConfig, make_optimizer, set_trainable
    cfg = paligemma_3b_config()
    attach_tokenizer(cfg, tok, synthetic_bins(256))  # marker ids from the tiny tokenizer (< 257k vocab)
    with torch.device(device):
        full = PoseVLA(cfg)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"paligemma-3b on {where}: fp32 weights, bf16 autocast")
    full.eval()
    batch = random_batch(full, tok, 1, args.label_len, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        cached = timed(lambda: full.sample_actions(batch), args.repeats, device)[0]
        naive = timed(lambda: full.sample_actions(batch, use_cache=False), args.repeats, device)[0]
    print(f"  action chunk: {1000 * cached:.1f} ms with prefix cache, {1000 * naive:.1f} ms without "
          f"-> {naive / cached:.1f}x")
    full.train()
    for name, train_cfg in (("full fine-tuning", TrainConfig()),
                            ("full fine-tuning + grad checkpointing", TrainConfig(grad_checkpointing=True)),
                            ("--train-expert-only", TrainConfig(train_expert_only=True))):
        for p in full.parameters():
            p.requires_grad_(True)
        set_trainable(full, train_cfg)
        full.grad_checkpointing = train_cfg.grad_checkpointing
        tower = full.vlm.model.vision_tower
        tower.activation_checkpointing_enable({"use_reentrant": False}) if train_cfg.grad_checkpointing \
            else tower.activation_checkpointing_disable()
        opt = make_optimizer(full, train_cfg)
        batch = random_batch(full, tok, args.full_batch, args.label_len, device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = full(batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        dt = timed(step, args.repeats, device)[0]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        print(f"  train step, {name}, batch {args.full_batch}: {1000 * dt:.0f} ms ({args.full_batch / dt:.1f} "
              f"samples/s), peak memory {peak:.1f} GiB")
        opt.state.clear()
        full.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    cli(main)
