"""Pose-VLA in RoboTwin 2.0's evaluator (method.md §8.6): `get_model`, `eval`, `reset_model`.

RoboTwin calls `reset_model(model)` at the start of an episode, then repeatedly
`eval(TASK_ENV, model, TASK_ENV.get_obs())` until `TASK_ENV.eval_success` or
`TASK_ENV.take_action_cnt >= TASK_ENV.step_lim`. Each `eval` call plans one chunk from the
observation and executes its first `exec_steps` control steps with
`TASK_ENV.take_action(action, action_type='ee')`, stopping early on success or at the step limit.

Observation (RoboTwin 2.0): `observation[cam]` for `head_camera`, `left_camera`, `right_camera`
with `rgb` (H, W, 3) uint8, `depth` (H, W) millimetres when enabled, `intrinsic_cv` (3, 3) and
`extrinsic_cv` (3, 4) world->camera; `endpose` with `left_endpose` / `right_endpose`
[x, y, z, qw, qx, qy, qz] and `left_gripper` / `right_gripper` in [0, 1] (1 = open). The state and
the 16-dim 'ee' action are both [l_xyz, l_quat, l_grip, r_xyz, r_quat, r_grip], the layout the
post-training data (RoboTwin's endpose group) uses, so no frame or offset conversion happens here.
"""
import os
import sys

import numpy as np

ROBOTWIN_CAMERAS = ("head_camera", "left_camera", "right_camera")


def _import_policy(root):
    root = os.path.abspath(root or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(root, "policy.py")):
        raise FileNotFoundError(f"{root}: no policy.py; set posevla_root in deploy_policy.yml "
                                "to the Pose-VLA code folder")
    if root not in sys.path:
        sys.path.insert(0, root)
    from policy import Policy
    return Policy


def get_model(usr_args):
    """usr_args: deploy_policy.yml merged with RoboTwin's arguments; needs `ckpt_dir`."""
    if not usr_args.get("ckpt_dir"):
        raise ValueError("deploy_policy.yml: ckpt_dir is required (a post-trained Pose-VLA checkpoint directory)")
    Policy = _import_policy(usr_args.get("posevla_root"))
    return Policy(usr_args["ckpt_dir"], robots=("robotwin",), exec_steps=usr_args.get("exec_steps"),
                  use_rays=usr_args.get("use_rays", True), use_depth=usr_args.get("use_depth", True),
                  seed=int(usr_args.get("seed") or 0), device=usr_args.get("device", "cpu"),
                  compile=bool(usr_args.get("compile", False)))


def encode_obs(observation, cameras):
    """RoboTwin observation -> (views in the checkpoint's camera order, 16-dim state). A recipe
    camera that is a RoboTwin camera name is used by name, others (e.g. 'head') by view position."""
    cams, views = observation.get("observation", {}), []
    for i, cam in enumerate(cameras):
        name = cam.split(".")[-1]
        name = name if name in ROBOTWIN_CAMERAS else ROBOTWIN_CAMERAS[i]
        if name not in cams:
            raise ValueError(f"observation has no camera {name!r} (present: {sorted(cams)}); enable it in the "
                             f"task config's camera settings")
        c = cams[name]
        for key in ("rgb", "intrinsic_cv"):
            if key not in c:
                raise ValueError(f"observation[{name!r}] has no {key!r}; expected rgb, intrinsic_cv, extrinsic_cv")
        depth = None if c.get("depth") is None else np.asarray(c["depth"], np.float32) / 1000.0  # mm -> m
        views.append({"rgb": np.asarray(c["rgb"], np.uint8), "K": np.asarray(c["intrinsic_cv"], np.float64),
                      "depth": depth})
    e = observation.get("endpose")
    if not e or any(k not in e for k in ("left_endpose", "left_gripper", "right_endpose", "right_gripper")):
        raise ValueError("observation has no complete 'endpose' "
                         "(left_endpose, left_gripper, right_endpose, right_gripper)")
    state = np.concatenate([np.ravel(e["left_endpose"]), np.ravel(e["left_gripper"]),
                            np.ravel(e["right_endpose"]), np.ravel(e["right_gripper"])])
    return views, state


def eval(TASK_ENV, model, observation):  # noqa: A001 - the name RoboTwin's evaluator calls
    """Plan one chunk and execute its first `exec_steps` actions (or until success / step limit)."""
    views, state = encode_obs(observation, model.cameras)
    for action in model.next_actions(views, state, TASK_ENV.get_instruction()):
        if TASK_ENV.eval_success or TASK_ENV.take_action_cnt >= TASK_ENV.step_lim:
            break
        TASK_ENV.take_action(np.asarray(action, np.float64), action_type="ee")


def reset_model(model):
    model.reset()
