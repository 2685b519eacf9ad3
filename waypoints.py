"""Trajectory targets (method.md §3.4): future end-effector waypoints in each camera's frame.

view_waypoints() lists, for one view at frame t, the waypoints the stage-2 target text writes
(tokenizer.Waypoint): every `every`-th future action's end-effector pose, moved into that camera's
frame and projected to its pixels. RobotDataset's targets and fit_bins' bins both come from it,
so the bins fit exactly the targets.
"""
from dataclasses import dataclass

import numpy as np

import ee16
from fusion import project
from tokenizer import quat_to_matrix


@dataclass
class TrajectoryConfig:
    every: int = 10  # method.md §3.4: every 10th action ...
    count: int = 5  # ... of a ~50-step horizon: 5 waypoints per arm
    tcp_offset: tuple = (0.0, 0.0, 0.0)  # added in the end-effector frame; RoboTwin's endpose is
    # 0.12 m behind the TCP (method.md §10.4); we keep the recorded point by default (= the action space)
    min_depth: float = 0.01  # [ours] m (method.md §3.4): nearer waypoints have no usable pixel


def view_waypoints(action, t, K, cam2world, image_hw, cam, traj=None):
    """method.md §3.4 trajectory tuples of one view at frame t: [(name, uv (2,) source pixels, t (3,), R (3, 3))],
    waypoint k = ee pose action[t + every*(k+1) - 1] (clamped) in this camera's frame at t. A wrist
    view lists only its own arm; the head an arm whose first waypoint projects into the image. [ours]
    Waypoints with z < min_depth (behind a wrist camera) are dropped, as dividing by z <= 0 mirrors
    (u, v); the rest keep their k. Shared by RobotDataset and fit_bins: bins fit exactly the targets.
    traj: TrajectoryConfig (None: the method's)."""
    traj = traj or TrajectoryConfig()
    steps = np.minimum(t + traj.every * np.arange(1, traj.count + 1) - 1, len(action) - 1)
    own = "left" if "left" in cam else "right" if "right" in cam else None
    Rcw, tcw, out = cam2world[:3, :3], cam2world[:3, 3], []
    for arm in (a for a in ee16.ARMS if own in (None, a)):
        pos, quat = ee16.position(arm), ee16.quaternion(arm)
        Rw = quat_to_matrix(action[steps, quat])  # (k, 3, 3)
        pw = action[steps, pos] + Rw @ np.asarray(traj.tcp_offset, float)  # (k, 3)
        pc = (pw - tcw) @ Rcw  # (k, 3) = Rcw^T (pw - tcw)
        Rc = np.einsum("ji,kjl->kil", Rcw, Rw)  # Rcw^T @ Rw
        front = pc[:, 2] >= traj.min_depth  # (k,)
        uv = project(K, np.where(front[:, None], pc, 1.0))  # (k, 2); rows behind are dropped below
        if own is None and not (front[0] and 0 <= uv[0, 0] < image_hw[1] and 0 <= uv[0, 1] < image_hw[0]):
            continue
        out += [(f"{arm} arm {k}", uv[k], pc[k], Rc[k]) for k in np.flatnonzero(front)]
    return out
