"""The common interface of the robot-episode readers Pose-VLA trains on in stage 2 and post-training
(method.md §10.3-10.4), and `open_source`, which opens a dataset with the reader of its format.

Each reader is a `RobotSource`: per-episode state/action arrays and instructions read up front,
camera frames (`frame`: a `CameraFrame` of RGB, optional depth in metres, K, camera->world) read
lazily; `camera` reads only K and camera->world (no image decoding, for fitting bins). The readers:
LeRobot v2.0 / v2.1 / v3.0 (lerobot.py, with its writer) and RoboTwin HDF5 (robotwin.py).
Actions of an `ee16` source are world-frame end-effector poses in the 16-dim layout of ee16.py.
File handles (h5py, PyAV, parquet row groups) are opened lazily per process and never pickled, so
every DataLoader worker opens its own. Every error names the file, the key and what was expected;
NaN/inf in a state, action or camera array is refused with its episode and frame. With `skip_bad`
an unreadable episode is left out (warned, counted, reported once for the dataset) instead.
Grounding readers (Omni3D, BOP), the shared decoders and `detect_format` live in formats.py.
"""
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np

from formats import ROBOT_FORMATS, detect_format, report_dropped


# ----------------------------------------------------------------------------- common interface
@dataclass
class CameraFrame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    depth: np.ndarray | None = None  # (H, W) float32 metres
    K: np.ndarray | None = None  # (3, 3)
    cam2world: np.ndarray | None = None  # (4, 4), OpenCV camera axes


@dataclass
class Episode:
    state: np.ndarray  # (T, Ds) float32
    action: np.ndarray  # (T, Da) float32
    tasks: list  # instruction strings
    key: object  # reader-specific handle (file, row offset, ...)


CAMERA_ALIASES = {"head": ("head", "head_camera", "cam_head", "front", "image"),
                  "left_wrist": ("left_wrist", "left_camera", "cam_left_wrist"),
                  "right_wrist": ("right_wrist", "right_camera", "cam_right_wrist", "wrist_image")}


class RobotSource:
    """Common interface of the robot readers. `ee16`: actions are world-frame end-effector poses
    laid out [l_xyz, l_quat(wxyz), l_grip, r_xyz, r_quat, r_grip] (needed for trajectory targets).
    `dropped`: what the reader left out under skip_bad (Counter of reason -> episodes)."""
    path: str
    cameras: list
    episodes: list
    dropped: Counter
    ee16: bool = False

    def resolve_camera(self, name):
        if name in self.cameras:
            return name
        for cam in self.cameras:
            if name in CAMERA_ALIASES and cam in CAMERA_ALIASES[name]:
                return cam
        raise ValueError(f"{self.path}: camera '{name}' not found; available: {self.cameras}")

    def handles(self):
        """Open files/decoders of this process (a forked DataLoader worker opens its own)."""
        if getattr(self, "_pid", None) != os.getpid():
            self._cache, self._pid = OrderedDict(), os.getpid()
        return self._cache

    def __getstate__(self):  # no open file handles travel to spawned DataLoader workers
        state = self.__dict__.copy()
        state["_cache"], state["_pid"] = OrderedDict(), None
        return state


def _lru(cache, key, opener, size):
    """cache[key], opened with `opener` on a miss; the least recently used beyond `size` are closed."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = opener()
    while len(cache) > size:
        old = cache.popitem(last=False)[1]
        if hasattr(old, "close"):
            old.close()
    return value


def _finite_frames(arr, path, key, episode, dtype=np.float32):
    """`arr` (T, ...) as `dtype`, refusing NaN/inf (an overflow of the cast included) with the file,
    key, episode and first bad frame named."""
    with np.errstate(over="ignore"):
        arr = np.asarray(arr, np.float64).astype(dtype)
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=tuple(range(1, arr.ndim))))
    if len(bad):
        more = f" (and {len(bad) - 1} more frames)" if len(bad) > 1 else ""
        raise ValueError(f"{path}: '{key}' of episode {episode} holds NaN/inf at frame {bad[0]}{more}; "
                         "expected finite values")
    return arr


# ----------------------------------------------------------------------------- dispatch
def open_source(path, episodes=None, skip_bad=False, keys=None):
    """The RobotSource for a LeRobot or RoboTwin dataset at `path` (format detected); with
    `episodes`, only its first N episodes (few-demonstration experiments); with `skip_bad`,
    without its unreadable episodes (reported once); `keys`: a LeRobot dataset's feature names
    (lerobot.KEY_MAPS layout or dict; RoboTwin ignores it). A dataset without frames is an error."""
    fmt = detect_format(path)
    if fmt not in ROBOT_FORMATS:
        raise ValueError(f"{path}: format '{fmt}' holds no robot episodes; expected one of {ROBOT_FORMATS}")
    if fmt == "lerobot":  # the readers import this module, so they are imported here
        from lerobot import LeRobotSource
        source = LeRobotSource(path, skip_bad, keys)
    else:
        from robotwin import RoboTwinSource
        source = RoboTwinSource(path, skip_bad)
    frames = sum(len(e.state) for e in source.episodes)
    if not frames:
        why = "; ".join(f"{n} {r}" for r, n in source.dropped.items())
        raise ValueError(f"{path}: no frames in {len(source.episodes)} episode(s){f' ({why})' if why else ''}; "
                         "expected at least one episode with frames")
    report_dropped(path, source.dropped, f"{len(source.episodes)} episodes, {frames} frames")
    if episodes is not None:
        if not 1 <= episodes <= len(source.episodes):
            raise ValueError(f"{path}: asked for the first {episodes} episodes; it holds {len(source.episodes)}")
        source.episodes = source.episodes[:episodes]
    return source
