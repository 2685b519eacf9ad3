"""fast.py: the prepared, compiled sampler against the eager reference (model.sample_actions) on
the tiny configuration, CPU, fp32; and bench.py, which measures the two.

Catches: a compiled loop that ignores the prefix (views or prompt), runs the wrong t schedule or
number of steps, prompt padding (the static prefix shape) that changes the chunk, graph outputs
reused across calls (a second batch of the same shape must give its own chunk), and a bf16 path
(what CUDA runs) that mixes dtypes or drifts from the fp32 reference; bench.py rows or protocol
that go missing."""
import copy
import json

import pytest
import torch

import bench
from fast import FastSampler
from model import build_model
from sensitivity import VISUAL_KEYS, roll_samples
from test_model import make_batch, tiny_bins


def test_compiled_chunk_equals_eager():
    torch.manual_seed(0)
    model, tok = build_model("tiny", bins=tiny_bins())
    model.eval()
    sampler = FastSampler(model)
    batch = make_batch(model, tok, labels=None)  # two prompt lengths (one padded), a missing view
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.max_dim, generator=torch.Generator().manual_seed(1))
    others = {"views": roll_samples(batch, VISUAL_KEYS), "prompts": roll_samples(batch, ("prompt_ids", "prompt_mask")),
              "prompt length": {**batch, "prompt_ids": batch["prompt_ids"][:, :3],
                                "prompt_mask": batch["prompt_mask"][:, :3]}}
    ref = model.sample_actions(batch, noise=noise)                              # (B, H, D)
    torch.testing.assert_close(sampler(batch, noise), ref, rtol=1e-5, atol=1e-5)
    for what, other in others.items():
        want = model.sample_actions(other, noise=noise)
        assert (want - ref).abs().max() > 1e-3, f"the reference does not depend on the {what}"
        with torch._dynamo.config.patch(error_on_recompile=True):  # one padded prefix shape: no recompile
            torch.testing.assert_close(sampler(other, noise), want, rtol=1e-5, atol=1e-5)


def test_bf16_weights_sample_close_to_fp32():
    torch.manual_seed(0)
    model, tok = build_model("tiny", bins=tiny_bins())
    model.eval()
    batch = make_batch(model, tok, labels=None)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.max_dim, generator=torch.Generator().manual_seed(1))
    ref = model.sample_actions(batch, noise=noise)
    sampler = FastSampler(copy.deepcopy(model), compile=False, dtype=torch.bfloat16)
    out = sampler(batch, noise)
    assert out.dtype == torch.float32 and next(sampler.model.parameters()).dtype == torch.bfloat16
    assert sampler.model.rotary.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()  # measured: 0.2 %


def test_bench_reports_every_row_and_its_protocol(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--batch-size", "2", "--label-len", "4", "--repeats", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["what"]: r for r in report["rows"]}
    assert set(rows) == {"train step", "chunk, eager, no prefix cache", "chunk, eager, prefix cache",
                         "chunk, FastSampler, not compiled", "chunk, FastSampler, compiled"}
    train = rows["train step"]
    assert train["batch"] == 2 and train["mfu"] is None and train["tflop_per_step"] > 0  # no CPU peak: n/a
    assert train["tokens_s"] == pytest.approx(train["samples_s"] * (3 * 66 + 10 + 4 + 17))  # prefix+labels+suffix
    assert rows["chunk, FastSampler, compiled"]["max_abs_diff_vs_eager"] < 1e-5
    assert all(len(r["wall_ms"]) == 2 and r["wall_ms"][0] <= r["wall_ms"][1] for r in rows.values())  # p50, p90
    assert {"torch", "device", "repeats", "threads", "command"} <= set(report["protocol"])
