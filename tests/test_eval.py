"""Tests for policy.py, eval_sim.py and robotwin_policy/ (LIBERO: tests/test_libero.py): the tiny model with
untrained weights drives the real simulators (protocol tests, not success rates).

Catches: preprocessing that differs from training (K, rays, prompt), actions left normalised or
quaternions interpolated the long way round, re-planning at the wrong step, a compiled Policy that
plans differently, results that mix up seeds or lose finished episodes, RoboTwin depth left in
millimetres, AP that ignores tuple scores."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval_sim  # noqa: E402
import policy as policy_mod  # noqa: E402
import sim  # noqa: E402
from stats import Stats  # noqa: E402
from fusion import letterbox, ray_map  # noqa: E402
import metrics  # noqa: E402
from metrics import centre_errors  # noqa: E402
from model import build_model, save_checkpoint  # noqa: E402
from policy import Policy, expand_chunk, valid_actions  # noqa: E402
from robotwin_policy import deploy_policy  # noqa: E402
from tokenizer import PoseBins, PoseTokenizer, euler_to_matrix, quat_to_matrix  # noqa: E402

TABLETOP = {"robot": "tabletop", "cameras": ["head", "left_wrist", "right_wrist"], "chunk": 4, "stride": 3,
            "state_dim": 16, "action_dim": 16, "image_size": 112, "stage": "posttrain"}


@pytest.fixture(scope="module")
def make_ckpt(tmp_path_factory):
    """Factory: a tiny untrained checkpoint with the given recipe fields and action mean / std."""
    rng = np.random.default_rng(0)
    bins = PoseBins.fit(rng.normal(0, 0.3, (200, 3)) + [0, 0, 0.8], rng.uniform(0.02, 0.2, (200, 3)), n_bins=16)
    model, tok = build_model("tiny", bins, action_horizon=4)
    root = tmp_path_factory.mktemp("ckpts")

    def make(name, action_mean=0.0, action_std=0.01, **recipe):
        recipe = {**TABLETOP, **recipe}
        Ds, Da = recipe["state_dim"], recipe["action_dim"]
        state = Stats.compute(rng.normal(size=(20, Ds)), rng.normal(size=(20, Da))).state
        action = {"mean": [action_mean] * Da, "std": [action_std] * Da, "q01": [0.0] * Da, "q99": [0.0] * Da}
        path = str(root / name)
        save_checkpoint(path, model, tok, bins, extra={"stats.json": {"state": state, "action": action},
                                                       "recipe.json": recipe})
        return path
    return make


def synthetic_views(n=3, size=64):
    rng = np.random.default_rng(1)
    K = np.array([[60.0, 0, 31.5], [0, 60.0, 31.5], [0, 0, 1]])
    return [{"rgb": rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "K": K,
             "depth": np.full((size, size), 0.8, np.float32)} for _ in range(n)]


# ----------------------------------------------------------------------------- policy
def test_wilson_interval_known_values():
    assert eval_sim.wilson(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert eval_sim.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert eval_sim.wilson(10, 10)[1] == 1.0


def test_valid_actions_unit_quaternions_and_clipped_grippers():
    raw = np.zeros((2, 16))
    raw[:, 3:7] = [[2.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5 + 1e-3]]
    raw[:, 11:15] = [[0, 0, 0, 3.0], [0.9, 0.1, 0, 0]]
    raw[:, 7], raw[:, 15] = [1.2, 0.4], [-0.1, 0.7]
    out = valid_actions(raw, "robotwin")
    np.testing.assert_allclose(np.linalg.norm(out[:, 3:7], axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(out[:, 11:15], axis=1), 1.0)
    np.testing.assert_allclose(out[:, 3:7][0], [1, 0, 0, 0])
    assert out[:, 7].tolist() == [1.0, 0.4] and out[:, 15].tolist() == [0.0, 0.7]
    np.testing.assert_array_equal(valid_actions(raw[:, :7], "libero"), raw[:, :7])  # delta actions untouched


def test_expand_chunk_interpolates_positions_and_quaternions():
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    q0, q1 = np.array([1.0, 0, 0, 0]), np.array([c, 0, 0, s])     # identity -> 90 deg about z
    chunk = np.array([[0, 0, 0, *q0, 1.0], [3, 6, 0, *-q1, 0.0]])  # -q1 is the same rotation as q1
    out = expand_chunk(np.concatenate([chunk, chunk], 1), 3, (slice(3, 7), slice(11, 15)))
    assert out.shape == (4, 16)
    np.testing.assert_allclose(out[1, :3], [1, 2, 0])
    np.testing.assert_allclose(out[-1], np.concatenate([chunk[1], chunk[1]]))
    np.testing.assert_allclose(np.linalg.norm(out[:, 3:7], axis=1), 1.0)
    # nlerp the shorter way round (as the scripted expert moves): a third of the way turns by
    # 2 atan2(s / 3, 2/3 + c / 3) = 29.3 degrees about +z, not the long way round
    R = quat_to_matrix(out[1, 3:7])
    assert np.degrees(np.arctan2(R[1, 0], R[0, 0])) == pytest.approx(np.degrees(2 * np.arctan2(s / 3, 2 / 3 + c / 3)))
    np.testing.assert_array_equal(expand_chunk(chunk, 1), chunk)


def test_policy_uses_the_training_preprocessing_and_denormalises(make_ckpt):
    p = Policy(make_ckpt("pre", action_mean=5.0), exec_steps=4)
    views = synthetic_views()
    batch = p.preprocess(views, np.zeros(16), "pick up the red cube")
    lb = letterbox(views[1]["rgb"], views[1]["K"], 112, depth=views[1]["depth"])
    np.testing.assert_allclose(batch["rays"][0, 1].numpy(), ray_map(lb.K, lb.valid), atol=1e-6)
    assert batch["has_depth"].all() and float(batch["depth"][0, 0, 0].max()) == pytest.approx(0.8)
    ids = p.text_tok("pick up the red cube\n", add_special_tokens=False)["input_ids"]
    assert batch["prompt_ids"][0].tolist() == [p.text_tok.bos_token_id] + ids
    np.testing.assert_allclose(batch["state"][0, :16].numpy(), p.stats.normalize(np.zeros(16), "state"), atol=1e-6)
    assert not {"label_ids", "label_mask", "actions", "is_pad"} & set(batch)  # nothing to learn from
    plan = p.plan(views, np.zeros(16), "pick up the red cube")
    assert plan.shape == ((4 - 1) * 3 + 1, 16)
    positions = np.r_[0:3, 8:11]
    assert np.all(np.abs(plan[:, positions] - 5.0) < 0.5)  # mean 5, std 0.01: de-normalised into the robot's units
    assert np.all(plan[:, [7, 15]] == 1.0)  # grippers de-normalised to ~5, clipped to fully open
    np.testing.assert_allclose(np.linalg.norm(plan[:, 3:7], axis=1), 1.0)  # every quaternion unit, also interpolated
    # ablations drop the priors; missing views and wrong state widths are refused
    q = Policy(make_ckpt("pre"), use_rays=False, use_depth=False)
    b = q.preprocess(views, np.zeros(16), "x")
    assert not b["has_rays"].any() and not b["has_depth"].any()
    with pytest.raises(ValueError, match="3 camera views"):
        q.preprocess(views[:2], np.zeros(16), "x")
    with pytest.raises(ValueError, match="state has shape"):
        q.preprocess(views, np.zeros(8), "x")


def test_action_queue_replans_every_exec_steps(make_ckpt):
    ck = make_ckpt("queue")
    p = Policy(ck, exec_steps=3, seed=5)
    views = synthetic_views()
    actions = [p.act(views, np.zeros(16), "x") for _ in range(7)]
    assert len(p.chunk_seconds) == 3  # steps 0, 3, 6 re-plan
    np.testing.assert_array_equal(actions[6], p.last_plan[0])
    assert len(p.queue) == 2
    lat = p.latency()
    assert lat["chunks"] == 3 and lat["ms_per_chunk"] == pytest.approx(1000 * np.mean(p.chunk_seconds))
    assert lat["control_hz"] == pytest.approx(3 / np.mean(p.chunk_seconds))  # exec_steps per chunk, not the chunk
    same = Policy(ck, exec_steps=3, seed=5)
    np.testing.assert_allclose(same.act(views, np.zeros(16), "x"), actions[0])  # seeded noise: reproducible
    p.reset()
    assert not p.queue and p.last_plan is None
    # an episode's noise is its own: the same plan whatever ran before, another plan in another episode
    p.reset(episode=100003)
    first = p.act(views, np.zeros(16), "x")
    p.reset(episode=100003)
    np.testing.assert_array_equal(p.act(views, np.zeros(16), "x"), first)
    p.reset(episode=100004)
    assert not np.allclose(p.act(views, np.zeros(16), "x"), first)
    with pytest.raises(ValueError, match="exec_steps"):
        Policy(ck, exec_steps=11)


def test_compiled_policy_plans_the_same_actions(make_ckpt):
    """compile=True samples through fast.FastSampler: the eager reference's plans, prompt for prompt."""
    ck = make_ckpt("compiled", action_std=1.0)
    eager, fast = Policy(ck, seed=5), Policy(ck, seed=5, compile=True)
    views = synthetic_views()
    for prompt in ("pick up the red cube", "x"):  # two prompt lengths, one padded prefix shape
        want = eager.plan(views, np.zeros(16), prompt)
        np.testing.assert_allclose(fast.plan(views, np.zeros(16), prompt), want, atol=1e-5)
    assert fast.latency()["chunks"] == 1 and fast.latency()["compile_s"] > 0  # the compiling chunk kept apart
    assert eager.latency()["chunks"] == 2 and "compile_s" not in eager.latency()


def test_swap_sensitivity_measures_image_use_in_cm(make_ckpt):
    views = synthetic_views()
    probes = [(views, np.zeros(16), "pick up the red cube"),
              ([dict(v, rgb=255 - v["rgb"], depth=v["depth"] + 0.3) for v in views], np.zeros(16),
               "push the blue can to the left edge of the table")]
    p = Policy(make_ckpt("sens"))
    noise = p.generator.get_state()
    s = eval_sim.swap_sensitivity(p, probes)
    assert torch.equal(p.generator.get_state(), noise)  # the episodes' noise stream is untouched
    assert s["observations"] == s["prompt_pairs"] == 2 and s["image_swap_cm"] > 0 and s["prompt_swap_cm"] > 0
    # cm of the robot's raw actions: ten times the action std, ten times the displacement (up to the
    # state statistics, which the factory draws afresh per checkpoint)
    wide = eval_sim.swap_sensitivity(Policy(make_ckpt("sens_wide", action_std=0.1)), probes)
    assert wide["image_swap_cm"] == pytest.approx(10 * s["image_swap_cm"], rel=0.01)
    hook = p.model.fusion.register_forward_hook(lambda m, inputs, out: torch.zeros_like(out))  # image-blind
    try:
        blind = eval_sim.swap_sensitivity(p, probes)
    finally:
        hook.remove()
    assert blind["image_swap_cm"] == 0.0 and blind["prompt_swap_cm"] > 0
    assert eval_sim.swap_sensitivity(p, [(v, st, "x") for v, st, _ in probes])["prompt_swap_cm"] is None
    # by hand: the left gripper 3 cm away at every step, the right one 4 cm at one step of two;
    # quaternions and grippers are not positions
    a, b = np.zeros((2, 16)), np.zeros((2, 16))
    b[:, 0], b[0, 9:11], b[:, 3:8], b[:, 15] = 0.03, (0.0, 0.04), 0.5, 1.0
    assert eval_sim.ee_move_cm(p, a, b) == pytest.approx((3 + 2) / 2)


def test_bad_checkpoints_are_refused(make_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Policy(str(tmp_path / "nope"))
    ck = make_ckpt("norecipe")
    os.remove(os.path.join(ck, "recipe.json"))
    with pytest.raises(FileNotFoundError, match="recipe.json"):
        Policy(ck)
    ck = make_ckpt("nostats")
    os.remove(os.path.join(ck, "stats.json"))
    with pytest.raises(FileNotFoundError, match="stats.json"):
        Policy(ck)
    with pytest.raises(ValueError, match="robot 'robotwin'"):
        Policy(make_ckpt("rt", robot="robotwin"), robots=("tabletop",))
    with pytest.raises(ValueError, match="image_size 224"):
        Policy(make_ckpt("big", image_size=224))
    with pytest.raises(ValueError, match="delta actions"):
        Policy(make_ckpt("lib", robot="libero", state_dim=8, action_dim=7, cameras=["image", "wrist_image"]))


# ----------------------------------------------------------------------------- tabletop
def read_results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_tabletop_eval_records_the_protocol_and_gifs(make_ckpt, tmp_path):
    out = str(tmp_path / "ev")
    eval_sim.main(["--ckpt", make_ckpt("tt"), "--task", "pick", "--episodes", "2", "--max-steps", "4",
                   "--exec-steps", "2", "--gifs", "1", "--waypoint-tokens", "0", "--render-size", "64", "--out", out])
    r = read_results(out)
    p = r["protocol"]
    assert r["complete"] and p["seeds"] == [eval_sim.EVAL_SEED0, eval_sim.EVAL_SEED0 + 1]
    assert p["step_limits"] == {"pick": 4} and p["exec_steps"] == 2 and p["setting"] == "clean"
    assert len(p["checkpoint"]["config_hash"]) == 16 and p["code"]
    assert [e["seed"] for e in r["episodes"]] == p["seeds"] and all(e["steps"] <= 4 for e in r["episodes"])
    assert r["per_task"]["pick"]["episodes"] == 2 and r["latency"]["chunks"] >= 4
    env = sim.TabletopEnv("pick", "clean", render=False)
    for e in r["episodes"]:  # the graded measures start from the episode's own scene at reset
        env.reset(e["seed"])
        assert e["start_cm"] == pytest.approx(env.reach_cm())
    assert r["per_task"]["pick"]["min_reach_cm"] == np.mean([e["min_reach_cm"] for e in r["episodes"]])
    assert r["per_task"]["pick"]["touched_rate"] == np.mean([e["touched"] for e in r["episodes"]])
    sens = r["image_sensitivity"]  # both episodes' first observations, each with the other's views
    assert sens["observations"] == 2 and sens["image_swap_cm"] > 0
    gif = Image.open(os.path.join(out, f"pick_clean_{eval_sim.EVAL_SEED0}.gif"))
    assert gif.n_frames == r["episodes"][0]["steps"] + 1  # one frame per step, and the final scene
    assert not os.path.exists(os.path.join(out, f"pick_clean_{eval_sim.EVAL_SEED0 + 1}.gif"))


def test_each_episode_restarts_the_policy_noise(make_ckpt):
    """An episode's actions follow from its own seed, not from how long the episodes before it ran."""
    p = Policy(make_ckpt("noise", action_std=0.1), exec_steps=2)
    env = sim.TabletopEnv("pick", "clean", eval_sim.EVAL_SEED0, 64, cameras=tuple(c.split(".")[-1] for c in p.cameras))
    ends = []
    for before in (2, 5):  # one plan before, or three
        eval_sim.tabletop_episode(env, p, eval_sim.EVAL_SEED0, before)
        eval_sim.tabletop_episode(env, p, eval_sim.EVAL_SEED0 + 1, 3)
        ends.append(env.state())
    env.close()
    np.testing.assert_array_equal(ends[0], ends[1])


def test_interrupted_run_keeps_finished_episodes(make_ckpt, tmp_path, monkeypatch):
    calls, plan = [], Policy.plan

    def interrupt_in_second_episode(self, *a):
        calls.append(1)
        if len(calls) == 3:  # 2 plans per episode with 4 steps, 2 executed per chunk
            raise KeyboardInterrupt
        return plan(self, *a)
    monkeypatch.setattr(policy_mod.Policy, "plan", interrupt_in_second_episode)
    out = str(tmp_path / "ev")
    with pytest.raises(KeyboardInterrupt):
        eval_sim.main(["--ckpt", make_ckpt("tt2"), "--task", "push", "--episodes", "3", "--max-steps", "4",
                       "--exec-steps", "2", "--gifs", "0", "--render-size", "48", "--out", out])
    r = read_results(out)
    assert not r["complete"] and r["stopped"].startswith("KeyboardInterrupt") and len(r["episodes"]) == 1


def test_bad_eval_arguments(make_ckpt, tmp_path):
    ck, out = make_ckpt("args"), str(tmp_path / "ev")
    with pytest.raises(ValueError, match="unknown task 'fly'"):
        eval_sim.main(["--ckpt", ck, "--task", "fly", "--out", out])
    with pytest.raises(ValueError, match="unknown setting"):
        eval_sim.main(["--ckpt", ck, "--setting", "dark", "--out", out])
    with pytest.raises(FileNotFoundError, match="not found"):
        eval_sim.main(["--ckpt", str(tmp_path / "none"), "--out", out])
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        eval_sim.main(["--ckpt", ck, "--sim", "libero", "--suite", "libero_100", "--out", out])
    with pytest.raises(ValueError, match="camera"):
        eval_sim.main(["--ckpt", make_ckpt("cams", cameras=["head", "front", "right_wrist"]), "--out", out,
                       "--episodes", "1"])
    obs = {"cameras": {"head": synthetic_views(1)[0]}}
    with pytest.raises(ValueError, match="no camera 'left_wrist'"):
        eval_sim.tabletop_views(obs, ["head", "left_wrist"])


# ----------------------------------------------------------------------------- grounding
def test_grounding_pairs_of_ground_truth_text_score_perfectly():
    """Encoded ground truth decoded back through eval_sim's conversion reaches AP@0.25 = 1."""
    from data import View
    from metrics import evaluate
    from tokenizer import ObjectPose
    rng = np.random.default_rng(3)
    objs = [ObjectPose("red cube", (10, 10, 30, 30), np.array([x, 0.05, 0.9]), np.array([0.1, 0.06, 0.04]),
                       euler_to_matrix(rng.uniform(-1, 1, 3))) for x in (-0.2, 0.15)]
    bins = PoseBins.fit(rng.normal(0, 0.3, (500, 3)) + [0, 0, 0.9], rng.uniform(0.03, 0.12, (500, 3)), n_bins=1024)
    tok = PoseTokenizer(bins, 112)
    lb = letterbox(np.zeros((112, 112, 3), np.uint8), np.eye(3), 112)
    views = [View(lb, (0, 0, 112, 112), objs), View(lb, (0, 0, 112, 112), [])]
    decoded = tok.decode(tok.encode_objects([v.objects for v in views]), n_views=2)
    m = evaluate(metrics.grounding_pairs(decoded, views))
    assert m["n_gt"] == 2 and m["n_matched"] == 2 and m["AP@0.25"] == pytest.approx(1.0)
    assert m["rot_deg"] < 2.0 and m["5deg5cm"] == 1.0


def test_centre_errors_compare_pose_anchors_and_2d_boxes_alike():
    """The grounding measure the box-only baseline shares: centre of a decoded anchor (pose tuple)
    or of a decoded 2D box vs the true 2D box centre, by name; inf when the name is missing."""
    from data import View
    from tokenizer import ObjectPose
    rng = np.random.default_rng(0)
    bins = PoseBins.fit(rng.normal(0, 0.3, (500, 3)) + [0, 0, 0.9], rng.uniform(0.03, 0.12, (500, 3)), n_bins=256)
    tok = PoseTokenizer(bins, 112)
    objs = [ObjectPose("red cube", (10, 20, 30, 40), np.array([0.1, 0.0, 0.9]), np.array([0.05] * 3), np.eye(3)),
            ObjectPose("blue bowl", (60, 60, 100, 90), np.array([0.2, 0.1, 1.0]), np.array([0.1] * 3), np.eye(3))]
    lb = letterbox(np.zeros((112, 112, 3), np.uint8), np.eye(3), 112)
    views = [View(lb, (0, 0, 112, 112), objs)]
    for text in (tok.encode_objects([objs]), tok.encode_boxes([objs])):
        errors = centre_errors(tok.decode(text, n_views=1), views)
        assert len(errors) == 2 and max(errors) < 112 / 1024 * 1.5  # within a loc bin of the truth
    only_cube = tok.encode_boxes([objs[:1]])
    errors = centre_errors(tok.decode(only_cube, n_views=1), views)
    assert errors[0] < 1 and errors[1] == np.inf


def test_landings_tell_a_confused_object_from_a_missed_one():
    """A "red cube" anchor written on the cube, on the bowl and on empty table: queried / other /
    none, judged against every labelled object; other names' tuples are not counted."""
    from data import View
    from metrics import landing_summary, landings
    from tokenizer import ObjectPose
    rng = np.random.default_rng(0)
    bins = PoseBins.fit(rng.normal(0, 0.3, (500, 3)) + [0, 0, 0.9], rng.uniform(0.03, 0.12, (500, 3)), n_bins=256)
    tok = PoseTokenizer(bins, 112)
    pose = lambda name, box: ObjectPose(name, box, np.array([0.1, 0.0, 0.9]), np.array([0.05] * 3), np.eye(3))  # noqa: E731
    cube, bowl = pose("red cube", (10, 20, 30, 40)), pose("blue bowl", (60, 60, 100, 90))
    lb = letterbox(np.zeros((112, 112, 3), np.uint8), np.eye(3), 112)
    views = [View(lb, (0, 0, 112, 112), [cube, bowl])] * 3
    written = [[pose("red cube", cube.box2d)], [pose("red cube", bowl.box2d), bowl], [pose("red cube", (95, 5, 105, 15))]]
    decoded = tok.decode(tok.encode_boxes(written), n_views=3)
    assert landings(decoded, views, "red cube", 112) == ["queried", "other", "none"]
    assert landings(decoded, views, "blue bowl", 112) == ["queried"]
    m = landing_summary(landings(decoded, views, "red cube", 112))
    assert m == pytest.approx({"landed_queried": 1 / 3, "landed_other": 1 / 3, "landed_none": 1 / 3})
    assert np.isnan(landing_summary([])["landed_queried"])


def test_scored_decode_scores_each_tuple_by_its_tokens():
    """Generated ids with known log-probabilities: each tuple gets the mean over its own tokens,
    the tuples equal those of decoding the whole text, and AP ranks by those scores."""
    from data import View
    from metrics import evaluate
    from config import tiny_config
    from model import attach_tokenizer
    from tokenizer import ObjectPose, build_tiny_tokenizer
    rng = np.random.default_rng(4)
    bins = PoseBins.fit(rng.normal(0, 0.3, (500, 3)) + [0, 0, 0.9], rng.uniform(0.03, 0.12, (500, 3)), n_bins=64)
    text_tok = attach_tokenizer(tiny_config(), build_tiny_tokenizer(), bins)
    pose_tok = PoseTokenizer(bins, 112)
    near = ObjectPose("red cube", (10, 10, 30, 30), np.array([0.1, 0.0, 0.6]), np.array([0.1, 0.06, 0.04]), np.eye(3))
    far = ObjectPose("red cube", (50, 50, 70, 70), np.array([-0.2, 0.1, 1.2]), np.array([0.1, 0.06, 0.04]), np.eye(3))
    text = pose_tok.encode_objects([[near, far], [far]])
    ids = text_tok(text, add_special_tokens=False).input_ids + [text_tok.eos_token_id]
    semis = [k for k, i in enumerate(ids) if ";" in text_tok.decode([i])]
    logps = np.full(len(ids), -0.1)
    logps[semis[0] + 1:semis[1] + 1] = -2.0                    # the second tuple of view 0 is uncertain
    decoded, scores = eval_sim.scored_decode(text_tok, pose_tok, ids, logps, 2)
    whole = pose_tok.decode(text, n_views=2)
    for v in range(2):
        assert [d.t.tolist() for d in decoded.views[v]] == [d.t.tolist() for d in whole.views[v]]
    assert scores[0] == [pytest.approx(-0.1), pytest.approx(-2.0)] and scores[1] == [pytest.approx(-0.1)]
    assert decoded.n_rejected == 0
    # ranked by score, the confident true positive comes first: precision 1 at the first recall step
    views = [View(None, None, [near]), View(None, None, [far])]
    m = evaluate(metrics.grounding_pairs(decoded, views, scores))
    assert m["n_matched"] == 2 and m["AP@0.25"] == pytest.approx(1.0)
    unscored = evaluate(metrics.grounding_pairs(decoded, views))  # ties: one operating point, precision 2/3
    assert unscored["AP@0.25"] < 0.7


def test_grounding_cli_writes_metrics_and_overlays(make_ckpt, tmp_path):
    import sim_export
    data = str(tmp_path / "g_val")
    sim_export.write_grounding(data, 1, seed=3, image_size=64, views_per_scene=1)  # 3 objects
    out = str(tmp_path / "ev")
    eval_sim.main(["--grounding", "--ckpt", make_ckpt("gr"), "--data", data, "--max-samples", "2",
                   "--max-new-tokens", "8", "--overlays", "1", "--batch-size", "2", "--out", out])
    r = read_results(out)
    g = r["grounding"]
    assert r["complete"] and 1 <= r["protocol"]["samples"] <= 2 and g["n_images"] == 3 * r["protocol"]["samples"]
    # 8 new tokens cannot hold a whole tuple: nothing is found, and every true object counts as missed
    assert g["n_gt"] > 0 and g["n_matched"] == 0 and g["AP@0.25"] == 0.0 and g["recall_2d"] == 0.0
    assert np.isnan(g["landed_queried"])  # nothing written, nothing landed
    # the truth is the queried class only, though the views are built with every object to judge landings
    from data import GroundingDataset
    from model import load_checkpoint
    model, _, bins = load_checkpoint(make_ckpt("gr"))
    S = model.cfg.image_size
    ds = GroundingDataset(data, PoseTokenizer(bins, S), S, n_views=model.cfg.n_views, neg_frac=0.0, split="val", seed=0)
    n = r["protocol"]["samples"]
    assert g["n_gt"] == sum(len(v.objects) for i in range(n) for v in ds.build(i)[0])
    assert sum(len(v.objects) for i in range(n) for v in ds.build(i, every_object=True)[0]) > g["n_gt"]
    assert os.path.isfile(os.path.join(out, "grounding_0000.png"))
    with pytest.raises(ValueError, match="--data"):
        eval_sim.main(["--grounding", "--ckpt", make_ckpt("gr"), "--out", out])


# ----------------------------------------------------------------------------- RoboTwin
class RoboTwinStandIn:
    """RoboTwin 2.0's task-environment interface on top of the real tabletop physics: get_obs()
    (per-camera rgb, depth in mm, intrinsic_cv, extrinsic_cv world->camera; endpose), take_action
    with action_type='ee', take_action_cnt, step_lim, eval_success, get_instruction()."""
    NAMES = {"head_camera": "head", "left_camera": "left_wrist", "right_camera": "right_wrist"}

    def __init__(self, task, seed, step_lim, drop_camera=None):
        self.env = sim.TabletopEnv(task, "clean", seed, image_size=64)
        self.obs, self.step_lim, self.take_action_cnt, self.eval_success = self.env.observe(), step_lim, 0, False
        self.drop, self.actions = drop_camera, []

    def get_instruction(self):
        return self.env.instruction

    def get_obs(self):
        cams = {}
        for rt, name in self.NAMES.items():
            if rt == self.drop:
                continue
            v, world2cam = self.obs["cameras"][name], np.linalg.inv(self.obs["cameras"][name]["cam2world"])
            cams[rt] = {"rgb": v["rgb"], "depth": v["depth"].astype(np.float64) * 1000.0,
                        "intrinsic_cv": v["K"], "extrinsic_cv": world2cam[:3]}
        s = self.obs["state"]
        return {"observation": cams, "endpose": {"left_endpose": s[:7], "left_gripper": s[7],
                                                 "right_endpose": s[8:15], "right_gripper": s[15]}}

    def take_action(self, action, action_type="qpos"):
        assert action_type == "ee" and np.shape(action) == (16,)
        if self.take_action_cnt >= self.step_lim:
            return
        self.actions.append(np.asarray(action))
        self.obs = self.env.step(action)
        self.take_action_cnt += 1
        self.eval_success = bool(self.env.success())


def test_robotwin_policy_folder_drives_the_stand_in(make_ckpt):
    ck = make_ckpt("robotwin", robot="robotwin", cameras=["head_camera", "left_camera", "right_camera"])
    with open(os.path.join(ROOT, "robotwin_policy", "deploy_policy.yml")) as f:
        assert "ckpt_dir:" in f.read()
    model = deploy_policy.get_model({"ckpt_dir": ck, "exec_steps": 4, "device": "cpu"})
    env = RoboTwinStandIn("pick", 7, step_lim=6)
    deploy_policy.reset_model(model)
    calls = 0
    while env.take_action_cnt < env.step_lim:  # RoboTwin's eval loop
        deploy_policy.eval(env, model, env.get_obs())
        calls += 1
        if env.eval_success:
            break
    assert calls == 2 and env.take_action_cnt == 6 and len(model.chunk_seconds) == 2
    assert not np.allclose(env.env.state()[:3], sim.HOME["left"])  # the physics moved
    views, state = deploy_policy.encode_obs(env.get_obs(), model.cameras)
    np.testing.assert_allclose(views[0]["depth"], env.obs["cameras"]["head"]["depth"], atol=1e-6)  # mm -> m
    np.testing.assert_allclose(state, env.obs["state"])
    env.drop = "left_camera"
    with pytest.raises(ValueError, match="no camera 'left_camera'"):
        deploy_policy.eval(env, model, env.get_obs())
    with pytest.raises(ValueError, match="ckpt_dir"):
        deploy_policy.get_model({})
