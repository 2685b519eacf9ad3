"""pretrain.py / posttrain.py / trainer.py / checkpoint.py on tiny configurations and small built-in data.

The data are written by sim_export into tmp_path (few scenes and episodes, small images); every run
is the real script's main() or the script itself in a subprocess (Ctrl-C, torchrun).

Catches: a stage whose loss does not fall, post-training that still trains the text head, a resume
that is not bit-exact (optimiser, RNG, data position, the step-0 probe), DDP replicas that drift or
share their flow noise, FSDP checkpoints that are saved sharded, bad flags found only after data
generation, the held-out monitor matching by position instead of by name or reading the <loc>
argmax of the wrong token, an image probe that swaps frames of one episode, --no-priors that keeps
the prior embedders, and a config that does not name its preset (or an old checkpoint without the
name whose preset is no longer recognised)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import posttrain
import pretrain
import sim_export
from stats import Stats
from model import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "4", "--warmup", "2", "--log-every", "1", "--workers", "0", "--eval-every", "0"]


def log(run_dir, key="loss"):
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


def records(run_dir, key):
    """The train_log.jsonl records that hold `key`."""
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def falls(values, k=3):
    return sum(values[-k:]) / k < sum(values[:k]) / k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = {"g": str(root / "ground"), "gv": str(root / "ground_val"), "d": str(root / "demos"),
             "dv": str(root / "demos_val")}
    sim_export.write_grounding(paths["g"], 6, seed=0, image_size=96, views_per_scene=2)
    # 128 px: large enough that a held-out target lists objects (<loc> anchors to measure)
    sim_export.write_grounding(paths["gv"], 1, seed=9, image_size=128, views_per_scene=1)
    sim_export.write_demos(paths["d"], "pick", 2, "clean", seed=0, image_size=48)
    sim_export.write_demos(paths["dv"], "pick", 1, "clean", seed=50, image_size=48)
    return paths


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "grounding")
    pretrain.main(["--data", data["g"], "--eval-data", data["gv"], "--out", out, "--steps", "14",
                   "--save-every", "7", "--eval-every", "14", "--show", "1", *FAST[:-2], "--n-bins", "64"])
    return out


def test_config_names_its_preset_and_old_checkpoints_fall_back_to_shapes():
    from dataclasses import asdict
    from config import CONFIGS, PoseVLAConfig
    from trainer import config_name
    for name, make in CONFIGS.items():
        old = {k: v for k, v in asdict(make()).items() if k != "preset"}  # a config.json from before the field
        assert make().preset == name and config_name(PoseVLAConfig(**old)) == name
    assert config_name(PoseVLAConfig(preset="tiny", vlm=CONFIGS["paligemma-3b"]().vlm)) == "tiny"  # no guessing
    assert config_name(PoseVLAConfig(vlm=CONFIGS["tiny"](expert_width=64).vlm)) == "tiny"


def test_pretrain_then_posttrain_end_to_end(stage1, data, tmp_path):
    losses = [v for _, v in log(stage1)]
    assert len(losses) == 14 and falls(losses)
    assert [os.path.basename(p) for p in sorted(os.listdir(stage1)) if p.startswith("step_")] == \
        ["step_000007", "step_000014"]
    assert os.path.isfile(os.path.join(stage1, "overlay.png"))
    assert [s for s, _ in log(stage1, "eval_recall")] == [14]  # the tuple monitor (pinned below) at --eval-every
    init, last = records(stage1, "eval_img_tv")  # before any update, and the evaluation at step 14
    assert init["step"] == 0 and last["step"] == 14 and init["eval_img_tv"] > 0 and init["eval_img_tv_loc"] > 0
    assert {"eval_img_tv_loc", "eval_loss", "eval_recall"} <= set(last)
    assert last["eval_loc_anchors"] > 0 and np.isfinite(last["eval_loc_argmax_err_px"])  # NaN: no <loc> target read
    assert 0 < last["eval_loc_centre_baseline_px"] < 112 / np.sqrt(2)
    with open(os.path.join(stage1, "step_000014", "recipe.json")) as f:
        assert json.load(f)["stage"] == "grounding"

    motion = str(tmp_path / "motion")
    pretrain.main(["--stage", "motion", "--init", stage1, "--data", data["d"], "--eval-data", data["dv"],
                   "--out", motion, "--steps", "10", *FAST[:-2], "--eval-every", "10"])
    rows = log(motion)
    assert len(rows) == 10 and falls([v for _, v in rows])
    assert {"ntp_loss", "flow_loss"} <= set(records(motion, "loss")[0])
    assert log(motion, "eval_flow_loss")
    init, last = records(motion, "eval_img_action_delta")
    assert init["step"] == 0 and last["step"] == 10 and init["eval_img_action_delta"] > 0
    for r in (init, last):  # trajectory text and actions: both figures, and the prompt-swap reference
        assert {"eval_img_tv", "eval_img_action_delta_first", "eval_prompt_action_delta"} <= set(r)

    post = str(tmp_path / "post")
    posttrain.main(["--robot", "tabletop", "--init", motion, "--data", data["d"], "--out", post,
                    "--steps", "12", *FAST])
    flow = [v for _, v in log(post, "flow_loss")]
    assert len(flow) == 12 and falls(flow)
    assert not log(post, "ntp_loss")  # flow matching only
    ckpt = os.path.join(post, "step_000012")
    stats = Stats.load(os.path.join(ckpt, "stats.json"))
    assert len(stats.state["mean"]) == 16 and len(stats.action["std"]) == 16
    with open(os.path.join(ckpt, "recipe.json")) as f:
        recipe = json.load(f)
    assert recipe == {"robot": "tabletop", "cameras": ["head", "left_wrist", "right_wrist"], "chunk": 16,
                      "stride": 1, "state_dim": 16, "action_dim": 16, "image_size": 112, "stage": "posttrain"}
    model, tok, bins = load_checkpoint(ckpt)
    assert bins.n_bins == 64 and model.cfg.action_horizon == 16


def script(name, *args):
    return [sys.executable, os.path.join(REPO, name), *args]


def test_interrupted_and_resumed_run_matches_uninterrupted(stage1, data, tmp_path):
    args = ["--stage", "motion", "--init", stage1, "--data", data["d"], "--steps", "12", "--save-every", "100",
            *FAST[:-2], "--eval-data", data["dv"], "--eval-every", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    subprocess.run(script("pretrain.py", *args, "--out", whole), check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(script("pretrain.py", *args, "--out", parts), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path = os.path.join(parts, "train_log.jsonl")
    while proc.poll() is None and not (os.path.exists(log_path) and open(log_path).read().count('"loss"') >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: finish the step, write a checkpoint, exit
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    (stopped,) = [p for p in os.listdir(parts) if p.startswith("step_")]
    assert 3 <= int(stopped[5:]) < 12
    subprocess.run(script("pretrain.py", "--resume", parts), check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert log(parts) == log(whole) and len(log(whole)) == 12
    assert log(parts, "flow_loss") == log(whole, "flow_loss")
    # held-out figures too, the image-sensitivity probe at init (once, not again on resume) included
    assert records(parts, "eval_img_tv") == records(whole, "eval_img_tv")
    assert [r["step"] for r in records(whole, "eval_img_tv")] == [0, 12]


DRIVER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import posttrain
run = posttrain.main(sys.argv[1:])
torch.save(run.model.state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


def test_torchrun_two_processes_keep_replicas_identical(data, tmp_path):
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=REPO, out=out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           "--robot", "tabletop", "--data", data["d"], "--eval-data", data["dv"], "--out", out, "--steps", "3",
           "--batch-size", "2", "--log-every", "1", "--workers", "0"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(os.path.join(out, "step_000003", "model.safetensors"))
    assert all(torch.equal(saved[k], a[k]) for k in saved)
    assert [s for s, _ in log(out)] == [1, 2, 3] and [s for s, _ in log(out, "eval_flow_loss")] == [3]
    state = torch.load(os.path.join(out, "step_000003", "train_state.pt"), weights_only=False)
    assert state["world"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # own flow noise per process


def test_bad_arguments_and_checkpoints_fail_at_start(stage1, data, tmp_path):
    out = str(tmp_path / "never")
    cases = [
        (pretrain, ["--data", str(tmp_path / "missing")], FileNotFoundError, "missing: path not found"),
        (pretrain, ["--stage", "motion", "--data", data["d"]], ValueError, "--init"),
        (pretrain, ["--init", str(tmp_path / "nope")], FileNotFoundError, "checkpoint directory not found"),
        (pretrain, ["--init", stage1, "--config", "paligemma-3b"], ValueError, "another configuration"),
        (posttrain, ["--data", data["d"]], ValueError, "--robot is required"),
        (posttrain, ["--robot", "robotwin"], ValueError, "needs --data"),
        (posttrain, ["--robot", "tabletop", "--data", data["g"]], ValueError, "post-training needs LeRobot"),
        (posttrain, ["--robot", "libero", "--data", data["d"]], ValueError, "expects 8"),
        (pretrain, ["--resume", stage1, "--batch-size", "2"], ValueError, "differs from the run's 4"),
    ]
    for module, argv, error, text in cases:
        with pytest.raises(error, match=text.replace("(", r"\(")):
            module.main([*argv, "--out", out])
    assert not os.path.exists(out)
    with pytest.raises(SystemExit):  # argparse: unknown robot
        posttrain.main(["--robot", "mars"])
    with pytest.raises(SystemExit):  # argparse: an impossible number (tests/test_bad_input.py has the rest)
        pretrain.main(["--steps", "0", "--data", data["g"]])
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(stage1, "step_000014"), broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        pretrain.main(["--init", str(broken), "--out", out])
    shutil.copy(os.path.join(stage1, "step_000014", "model.safetensors"), broken)
    with pytest.raises(FileNotFoundError, match="missing stats.json"):  # no normalisation statistics
        posttrain.main(["--robot", "tabletop", "--data", data["d"], "--resume", str(broken), "--out", out])
    assert not os.path.exists(out)


def test_fsdp_two_processes_train_save_and_resume(data, tmp_path):
    out = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "posttrain.py"), "--robot", "tabletop", "--data", data["d"], "--eval-data", data["dv"],
           "--out", out, "--steps", "3", "--save-every", "2", "--eval-every", "3", "--batch-size", "2",
           "--log-every", "1", "--workers", "0", "--fsdp", "--grad-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    load_checkpoint(os.path.join(out, "step_000003"))  # full (unsharded) weights
    again = str(tmp_path / "again")
    res = subprocess.run(cmd[:5] + [os.path.join(REPO, "posttrain.py"), "--resume", os.path.join(out, "step_000002"),
                                    "--out", again], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert log(again) == log(out)
    # the image-sensitivity probe runs outside forward(): FSDP gathers the weights for it too
    probes = records(out, "eval_img_action_delta")
    assert [r["step"] for r in probes] == [0, 3] and probes == records(again, "eval_img_action_delta")


def grounding_batches(path, workers, steps, state=None):
    """(Batches, the first `steps` batches) over a small grounding set, batch 4, one process."""
    from data import Collator, GroundingDataset, fit_bins
    from tokenizer import PoseTokenizer, build_tiny_tokenizer
    from batches import Batches
    from trainer import Dist, TrainConfig
    ds = GroundingDataset(path, PoseTokenizer(fit_bins(path, n_bins=16), 112), 112)
    batches = Batches(ds, Collator(build_tiny_tokenizer()), TrainConfig(batch_size=4, workers=workers), Dist())
    if state is not None:
        batches.load_state_dict(state)
    return batches, [next(batches) for _ in range(steps)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_batches_run_epoch_after_epoch_through_one_loader_and_resume_anywhere(data, monkeypatch):
    """One DataLoader for three epochs; each epoch is MixtureSampler's order cut to whole batches,
    its samples built for that epoch (as dataset.set_epoch(epoch) then dataset[i] builds them), and
    a run resumed from any position (an epoch's end included) draws the same batches next."""
    from data import Collator
    from loading import MixtureSampler
    from tokenizer import build_tiny_tokenizer
    made = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(torch.utils.data, "DataLoader", Counted)
    probe, _ = grounding_batches(data["g"], 0, 0)
    per_epoch = probe.sampler.per_epoch // 4
    assert 2 <= per_epoch < len(probe.loader.dataset) / 4 + 1
    made.clear()
    batches, seen = grounding_batches(data["g"], 0, 3 * per_epoch + 1)
    assert len(made) == 1 and batches.state_dict() == {"epoch": 3, "consumed": 4}
    ds, collate = batches.loader.dataset, Collator(build_tiny_tokenizer())
    for epoch in range(3):
        order = MixtureSampler(ds.sizes, seed=0).indices(epoch)
        ds.set_epoch(epoch)
        for b in (0, per_epoch - 1):
            assert same(seen[epoch * per_epoch + b], collate([ds[int(i)] for i in order[4 * b:4 * b + 4]]))
    assert not torch.equal(seen[0]["images"], seen[per_epoch]["images"])  # a new epoch: a new order and crops
    for epoch, consumed in ((0, 4), (0, 4 * per_epoch), (1, 4 * (per_epoch - 1))):
        k = epoch * per_epoch + consumed // 4
        _, again = grounding_batches(data["g"], 0, 3, {"epoch": epoch, "consumed": consumed})
        assert all(same(a, b) for a, b in zip(again, seen[k:k + 3]))


def test_batches_from_a_worker_match_the_main_process_across_an_epoch(data):
    """A spawned DataLoader worker, told the epoch by the sampler, builds exactly the batches the
    main process does, before and after an epoch boundary."""
    probe, _ = grounding_batches(data["g"], 0, 0)
    steps = probe.sampler.per_epoch // 4 + 2
    _, main = grounding_batches(data["g"], 0, steps)
    _, worker = grounding_batches(data["g"], 1, steps)
    assert all(same(a, b) for a, b in zip(main, worker))


def test_trainable_switches(data):
    import numpy as np
    from model import build_model
    from tokenizer import PoseBins
    from trainer import TrainConfig, set_trainable
    bins = PoseBins(np.linspace(-1, 1, 9), np.linspace(0, 2, 9), np.linspace(0, 1, 9))
    model, _ = build_model("tiny", bins)
    set_trainable(model, TrainConfig(freeze_vision=True))
    assert not any(p.requires_grad for p in model.vlm.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.lm.parameters())
    set_trainable(model, TrainConfig(train_expert_only=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("expert_", "state_proj", "action_")) for n in names)


def test_loc_argmax_error_reads_the_location_distribution_alone():
    S, loc_ids = 112, list(range(1500, 2524))  # 1024 <loc> token ids in a vocabulary of 3000
    L = lambda i: loc_ids[i]  # noqa: E731
    label_ids = torch.tensor([[5, L(412), L(530), 7, 8, L(100), L(200), L(300), L(400), 1],  # a (u, v), a 2D box
                              [9, L(50), L(60), 1, L(700), L(800), 0, 0, 0, 0]])               # a (u, v)
    label_mask = torch.tensor([[True] * 10, [True] * 4 + [False] * 6])  # the later <loc> ids are padding
    truth = {(0, 1): 412, (0, 2): 530, (0, 5): 100, (0, 6): 200, (0, 7): 300, (0, 8): 400, (1, 1): 50, (1, 2): 60}

    def logits(peaks):  # teacher-forced logits whose <loc> argmax at (sample, position) is peaks[...]
        out = torch.randn(2, 10, 3000, generator=torch.Generator().manual_seed(0))
        out[:, :, 6] = 50.0  # another token (<no_object>, say) wins the plain argmax everywhere
        for (b, k), bin_ in peaks.items():
            out[b, k, loc_ids[bin_]] = 10.0
        return out
    px = S / 1024  # one <loc> bin in pixels; a token decodes to its bin centre
    centres = [np.array([412.5, 530.5]) * px, np.array([200.5, 300.5]) * px, np.array([50.5, 60.5]) * px]
    errors, baseline = pretrain.anchor_errors(logits(truth), label_ids, label_mask, loc_ids, S)
    assert errors == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(baseline, [np.linalg.norm(c - S / 2) for c in centres])
    # u 10 bins right and v 20 up; the box's x1 8 bins right moves its centre 4 bins
    errors, same = pretrain.anchor_errors(logits({**truth, (0, 1): 422, (0, 2): 510, (0, 5): 108}), label_ids,
                                          label_mask, loc_ids, S)
    np.testing.assert_allclose(errors, [np.hypot(10, 20) * px, 4 * px, 0.0], atol=1e-9)
    assert same == baseline  # the image centre does not depend on the model


def test_tuple_errors_count_every_true_object_and_match_by_name():
    """Stage 1's held-out monitor on hand-built decodes: recall over every true object (a view with
    nothing decoded counts too), translation and rotation errors of same-name matches only, and the
    2D figures as eval_sim counts them."""
    from data import View
    from tokenizer import Decoded, DecodedTuple, ObjectPose, euler_to_matrix, matrix_to_quat
    cube = ObjectPose("red cube", (10, 10, 30, 30), np.array([0.1, 0.0, 0.8]), np.full(3, 0.05), np.eye(3))
    bowl = ObjectPose("blue bowl", (60, 60, 90, 80), np.array([-0.2, 0.1, 1.0]), np.full(3, 0.1), np.eye(3))
    far_cube = ObjectPose("red cube", (80, 20, 100, 40), np.array([0.3, -0.1, 1.2]), np.full(3, 0.05), np.eye(3))

    def decoded(name, anchor, t, yaw_deg):
        q = matrix_to_quat(euler_to_matrix([0.0, 0.0, np.radians(yaw_deg)]))
        return DecodedTuple(name, np.array(anchor, float), np.array(t), np.full(3, 0.05), q, None)
    # view 0: the cube 3 cm off and turned 10 degrees, its anchor 4 px below its box centre; the
    # bowl decoded under another name exactly where it is. View 1: its cube is not decoded.
    dec = Decoded([[decoded("red cube", (20, 24), [0.13, 0.0, 0.8], 10), decoded("blue can", (75, 70), bowl.t, 0)], []],
                  [False, False])
    m = pretrain.tuple_errors([([View(None, None, [cube, bowl]), View(None, None, [far_cube])], "", "", "", dec)], 112)
    assert m["eval_recall"] == pytest.approx(1 / 3) and m["eval_recall_2d"] == pytest.approx(1 / 3)
    assert m["eval_trans_err_cm"] == pytest.approx(3.0) and m["eval_rot_err_deg"] == pytest.approx(10.0)
    assert m["eval_centre_px"] == pytest.approx(4.0)


def test_start_model_from_init_can_drop_the_priors(stage1):
    """--no-priors with --init: the checkpoint's ray and depth embedders are removed (RGB only),
    everything else is the checkpoint's; without it they stay."""
    import argparse
    from checkpoint import start_model
    args = dict(resume=None, init=stage1, seed=0, config=None, vlm=None)
    kept, _, _ = start_model(argparse.Namespace(**args, no_priors=False), None)
    rgb, _, _ = start_model(argparse.Namespace(**args, no_priors=True), None)
    assert kept.fusion.rays is not None and kept.fusion.depth is not None and kept.cfg.use_rays
    assert rgb.fusion.rays is None and rgb.fusion.depth is None and not (rgb.cfg.use_rays or rgb.cfg.use_depth)
    assert not any(k.startswith("fusion.") for k in rgb.state_dict())
    for k, v in rgb.state_dict().items():
        torch.testing.assert_close(v, kept.state_dict()[k])


def test_held_out_probe_swaps_between_episodes(stage1, data):
    """The step-0 / evaluation probe (sensitivity.probe_images) must pair samples of different episodes:
    a robot set's first batch is one episode's consecutive frames, where the prompt swap is a no-op
    (prompt_action_delta exactly 0) and the view swap measures frame-to-frame change."""
    from types import SimpleNamespace
    from data import Collator, open_datasets
    from tokenizer import PoseTokenizer
    from sensitivity import probe_images
    from trainer import Dist
    model, tok, bins = load_checkpoint(os.path.join(stage1, "step_000014"))
    ds = open_datasets([data["d"]], "robot", pose_tokenizer=PoseTokenizer(bins, model.cfg.image_size),
                       image_size=model.cfg.image_size, seed=0, chunk=16, stride=1, stats="auto")
    assert len({ds[i]["prompt"] for i in range(len(ds))}) == 2  # two episodes, two instructions
    figures = probe_images(SimpleNamespace(model=model, tok=tok), ds, Collator(tok), SimpleNamespace(batch_size=4),
                           Dist())
    assert figures["eval_prompt_action_delta"] > 1e-3 and figures["eval_img_action_delta"] > 1e-3


def test_anchor_flag_reaches_the_targets_and_the_monitor(stage1, data, tmp_path, monkeypatch):
    """--anchor box: stage 1's targets write each object's box corners (4 <loc>s) and the held-out
    monitor still reads them (one anchor per tuple, its centre scored); the default writes 2."""
    built, real = {}, pretrain.datasets

    def spy(args, *rest):  # the datasets main() builds, kept by --anchor
        built[args.anchor] = real(args, *rest)
        return built[args.anchor]

    monkeypatch.setattr(pretrain, "datasets", spy)
    for anchor in ("center", "box"):
        out = str(tmp_path / anchor)
        pretrain.main(["--data", data["g"], "--eval-data", data["gv"], "--out", out, "--steps", "1", "--init", stage1,
                       "--eval-every", "1", "--show", "1", "--anchor", anchor, *FAST[:-2]])
        (last,) = [r for r in records(out, "eval_loc_anchors") if r["step"] == 1]
        assert last["eval_loc_anchors"] > 0 and np.isfinite(last["eval_loc_argmax_err_px"])
    for anchor, n_loc in (("center", 2), ("box", 4)):
        train_ds, eval_ds = built[anchor]
        texts = [ds.build(i)[2] for ds in (train_ds, eval_ds) for i in range(len(ds))]
        runs = {len(r) // len("<loc0000>") for t in texts for r in re.findall(r"(?:<loc\d{4}>)+", t)}
        assert runs == {n_loc}, (anchor, runs)


def test_resume_fills_flags_added_later_and_still_refuses_the_other_script(stage1, tmp_path):
    """A run written before a flag existed (checkpoint.LATER_FLAGS) resumes with the value that
    continues it; a flag missing for any other reason means another script's run: refused."""
    old = tmp_path / "old"
    shutil.copytree(os.path.join(stage1, "step_000014"), old)
    path = old / "train_args.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("anchor", "skip_bad")}))
    pretrain.main(["--resume", str(old), "--steps", "15", "--out", str(tmp_path / "more")])
    with open(tmp_path / "more" / "step_000015" / "train_args.json") as f:
        resumed = json.load(f)
    assert resumed["anchor"] == "center" and resumed["skip_bad"] is False and resumed["steps"] == 15
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "targets"}))
    with pytest.raises(ValueError, match=r"lacks \['targets'\]: the run was written by the other"):
        pretrain.main(["--resume", str(old), "--steps", "16", "--out", str(tmp_path / "never")])
