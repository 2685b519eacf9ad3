"""ablation.py: the paper's claim in miniature. The --quick budget runs the real pipeline (data,
both pre-training stages per arm, grounding evaluation, post-training, closed-loop evaluation,
tables, plot) at toy scale; a second call resumes instead of redoing work."""
import json
import os
import shutil
import sys

import pytest
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

import ablation  # noqa: E402


def config(ckpt):
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f)


def test_quick_ablation_end_to_end_then_resumes(tmp_path):
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    argv = ["--quick", "--out", out, "--cache", cache]
    b = ablation.BUDGETS["quick"]
    res = ablation.main(argv)

    assert res["complete"] and res["protocol"]["budget_name"] == "quick" and "seed 0" in res["protocol"]["seeds"]
    for arm in ablation.ARMS:
        for setting in ablation.SETTINGS:
            r = res["main"][arm][setting]
            assert r["seeds"] == b.seeds and r["episodes"] == b.seeds * 4 * b.episodes
            assert len(r["per_seed"]) == b.seeds and 0 <= r["mean"] <= 1
            assert r["ci95"][0] <= r["mean"] <= r["ci95"][1]  # pooled = mean of seeds here (equal counts)
            assert 0 < r["min_reach_cm"] <= r["start_cm"] and 0 <= r["touched"] <= 1
    assert sorted(res["grounding"]) == ["pose", "pose+priors", "semantic"]
    assert all(g is not None and g["n_gt"] > 0 for g in res["grounding"].values())
    for arm in ablation.CURVE_ARMS:
        assert sorted(res["curve"][arm]) == ["1", "2"]
        assert res["curve"][arm]["2"] == res["main"][arm]  # the main table's runs are the curve's point
    assert all(res["wall_s"][arm]["pretrain"] > 0 for arm in ("semantic", "pose", "pose+priors"))
    assert res["wall_s"]["none"]["pretrain"] == 0 and res["total_wall_s"] > 0

    # The arms differ only where they should: text targets and priors.
    pre = os.path.join(out, "pretrain")
    for arm, (targets, priors) in ablation.ARMS.items():
        if targets:
            with open(os.path.join(pre, arm, "stage1", "step_000004", "train_args.json")) as f:
                assert json.load(f)["targets"] == targets
        post = config(os.path.join(ablation.run_dir(out, arm, 2, 0), "step_000004"))
        assert post["use_rays"] == post["use_depth"] == priors

    md = open(os.path.join(out, "results.md")).read()
    assert all(f"| {arm} |" in md for arm in ablation.ARMS) and "demos per task" in md
    assert Image.open(os.path.join(out, "demos_curve.png")).size == (640, 630)
    assert os.path.isfile(os.path.join(ablation.run_dir(out, "pose", 2, 0), "eval_clean", "pick_clean_100000.gif"))

    # Rerunning finds everything done: nothing is trained or evaluated again.
    steps = json.load(open(os.path.join(out, "steps.json")))
    again = ablation.main(argv)
    assert json.load(open(os.path.join(out, "steps.json"))) == steps and again["main"] == res["main"]

    # A run stopped half-way continues from its checkpoint and ends where it would have.
    run = ablation.run_dir(out, "none", 1, 1)
    final = load_file(os.path.join(run, "step_000004", "model.safetensors"))
    shutil.rmtree(os.path.join(run, "step_000004"))
    shutil.rmtree(os.path.join(run, "eval_clean"))
    ablation.main(argv)
    redone = load_file(os.path.join(run, "step_000004", "model.safetensors"))
    assert all((final[k] == redone[k]).all() for k in final)
    log = [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]
    assert [r["step"] for r in log if "loss" in r][-1] == 4
    assert json.load(open(os.path.join(run, "eval_clean", "results.json")))["complete"]

    with pytest.raises(ValueError, match="budget"):
        ablation.main(["--budget", "default", "--out", out, "--cache", cache])
