"""ablation.py: the paper's claim in miniature. The --quick budget runs the real pipeline (data,
both pre-training stages per arm, grounding evaluation, post-training, closed-loop evaluation,
tables, plot) at toy scale; a second call resumes instead of redoing work.

Catches: a summary that drops a seed or mixes the clean and randomized runs, an interval that is
not the pooled episodes' Wilson interval, arms that differ in more than their targets and priors,
a resume that trains or evaluates again, or one that ends somewhere else than the uninterrupted run."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

import ablation  # noqa: E402
import eval_sim  # noqa: E402


def config(ckpt):
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f)


def test_quick_ablation_end_to_end_then_resumes(tmp_path):
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    argv = ["--quick", "--out", out, "--cache", cache]
    b = ablation.BUDGETS["quick"]
    res = ablation.main(argv)
    check_results(res, out, b)
    check_arms(out)

    # Rerunning finds everything done: nothing is trained or evaluated again.
    steps = json.load(open(os.path.join(out, "steps.json")))
    assert len(steps) == ablation.count_steps(b) and res["total_wall_s"] == pytest.approx(sum(steps.values()))
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


def check_results(res, out, b):
    """The quick run's results: every arm and setting summarised from its seeds' episodes, the
    grounding evaluation, the demonstrations curve and the wall times."""
    assert res["complete"] and res["protocol"]["budget_name"] == "quick" and "seed 0" in res["protocol"]["seeds"]
    for arm in ablation.ARMS:
        for setting in ablation.SETTINGS:
            r = res["main"][arm][setting]
            runs = [json.load(open(ablation.eval_path(out, arm, b.demos, s, setting))) for s in range(b.seeds)]
            episodes = [e for run in runs for e in run["episodes"]]  # every seed's, this setting's only
            assert r["seeds"] == b.seeds and r["episodes"] == len(episodes) == b.seeds * 4 * b.episodes
            assert r["per_seed"] == [run["mean_success"] for run in runs]
            assert r["mean"] == pytest.approx(np.mean(r["per_seed"]))
            assert list(r["ci95"]) == pytest.approx(list(eval_sim.wilson(sum(e["success"] for e in episodes),
                                                                          len(episodes))))
            for key in ("min_reach_cm", "start_cm", "touched"):
                assert r[key] == pytest.approx(np.mean([e[key] for e in episodes])), key
    assert sorted(res["grounding"]) == ["pose", "pose+priors", "semantic"]
    assert all(g is not None and g["n_gt"] > 0 for g in res["grounding"].values())
    for arm in ablation.CURVE_ARMS:
        assert sorted(res["curve"][arm]) == ["1", "2"]
        assert res["curve"][arm]["2"] == res["main"][arm]  # the main table's runs are the curve's point
    assert all(res["wall_s"][arm]["pretrain"] > 0 for arm in ("semantic", "pose", "pose+priors"))
    assert res["wall_s"]["none"]["pretrain"] == 0


def check_arms(out):
    """The arms differ only where they should (text targets and priors); the report, curve and GIFs exist."""
    pre = os.path.join(out, "pretrain")
    for arm, (targets, priors) in ablation.ARMS.items():
        if targets:
            with open(os.path.join(pre, arm, "stage1", "step_000004", "train_args.json")) as f:
                assert json.load(f)["targets"] == targets
        post = config(os.path.join(ablation.run_dir(out, arm, 2, 0), "step_000004"))
        assert post["use_rays"] == post["use_depth"] == priors

    md = open(os.path.join(out, "results.md")).read()
    assert all(f"| {arm} |" in md for arm in ablation.ARMS) and "demos per task" in md
    assert Image.open(os.path.join(out, "demos_curve.png")).format == "PNG"
    assert os.path.isfile(os.path.join(ablation.run_dir(out, "pose", 2, 0), "eval_clean", "pick_clean_100000.gif"))
