"""The RoboTwin HDF5 reader `RoboTwinSource`, in RoboTwin's three layouts (method.md §10.4).

Its endpose point sits 0.12 m behind the TCP (method.md §10.4). Its JPEG frames were encoded by OpenCV
from RGB arrays that OpenCV took for BGR, so a standard decoder returns red and blue swapped;
`decode_image(..., bgr=True)` swaps them back. The reader is a `RobotSource` (robot_formats.py, which
also opens a dataset by its format: `open_source`).
"""
import glob
import json
import os
import re
from collections import Counter

import numpy as np

from errors import BAD_INPUT, read_json
from formats import decode_depth_png, decode_image, skip_or_raise
from robot_formats import CameraFrame, Episode, RobotSource, _finite_frames, _lru
from tokenizer import euler_to_matrix, matrix_to_quat

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL camera axes (y up, z back) -> OpenCV


def _h5(f, key, path):
    if key not in f:
        raise ValueError(f"{path}: missing key '{key}'")
    return f[key]


def _matrix(f, key, t, shape, path):
    """A camera matrix stored per frame (T, *shape) or once (*shape), as float64 at frame t."""
    ds = _h5(f, key, path)
    arr = np.asarray(ds[t] if ds.ndim == len(shape) + 1 else ds[()], np.float64)
    if arr.shape != shape:
        raise ValueError(f"{path}: '{key}' has shape {ds.shape}; expected (T, *{shape}) or {shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: '{key}' holds NaN/inf at frame {t}; expected a finite camera matrix")
    return arr


class RoboTwinSource(RobotSource):
    """RoboTwin HDF5 episodes. Layouts (method.md §10.4): 'release' (2.0: /observation, /endpose group),
    'early' (/endpose is one (T,14) euler dataset) and 'current' (state/, action/, vision/).
    State = 16-dim [l_xyz, l_quat, l_grip, r_xyz, r_quat, r_grip] in the world frame; in the older
    layouts action[t] = state[t+1] (the last frame repeats). The endpose point is 0.12 m behind the
    TCP (method.md §10.4); it is kept as is so actions stay in RoboTwin's own action space.
    When the release layout has an empty /endpose group, the 14-dim joint vector is used instead."""
    CAMS = {"release": ("head_camera", "left_camera", "right_camera", "front_camera"),
            "current": ("cam_head", "cam_left_wrist", "cam_right_wrist")}

    def __init__(self, path, skip_bad=False):
        if os.path.isfile(path):
            files, self.path = [path], path
        else:
            files = sorted(glob.glob(os.path.join(path, "data", "episode*.hdf5")) or
                           glob.glob(os.path.join(path, "episode*.hdf5")),
                           key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0))
            self.path = path
        if not files:
            raise FileNotFoundError(f"{path}: no data/episode*.hdf5 files found")
        self.episodes, self.cameras, self.dropped = [], None, Counter()
        for k, p in enumerate(files):
            try:
                ep, cams = self._read_file(p, k)
            except BAD_INPUT as e:
                skip_or_raise(e, skip_bad, self.dropped, "episode")
                continue
            self.cameras = cams if self.cameras is None else [c for c in self.cameras if c in cams]
            self.episodes.append(ep)
        self.ee16 = all(e.key["ee16"] for e in self.episodes)

    def _read_file(self, p, k):
        import h5py
        try:
            with h5py.File(p, "r") as f:
                return self._read_episode(f, p, k)
        except OSError as e:
            raise ValueError(f"{p}: cannot open HDF5 ({e}); the file may be truncated") from e

    @staticmethod
    def layout(f):
        if "vision" in f and "state" in f:
            return "current"
        if "endpose" in f and not hasattr(f["endpose"], "keys"):
            return "early"
        if "observation" in f:
            return "release"
        raise ValueError(f"{f.filename}: unknown RoboTwin layout; expected /observation + /endpose "
                         "or vision/ + state/ + action/")

    def _read_episode(self, f, p, k):
        """(Episode, camera names) of file `p`, the dataset's episode k."""
        layout = self.layout(f)
        if layout == "current":
            st = _finite_frames(self._arms(f, "state", p), p, "state", k)
            ac = _finite_frames(self._arms(f, "action", p), p, "action", k)
            cams = [c for c in self.CAMS["current"] if f"vision/{c}/colors" in f]
            tasks = _instructions(f["instructions"][()] if "instructions" in f else None)
            ee16 = True
        else:
            if layout == "early":
                st, ee16 = self._early_endpose(f, p), True
            elif len(f["endpose"].keys()) == 0:
                st, ee16 = np.asarray(_h5(f, "joint_action/vector", p), np.float32), False
            else:
                st, ee16 = self._arms(f, "endpose", p), True
            st = _finite_frames(st, p, "endpose" if ee16 else "joint_action/vector", k)
            ac = np.concatenate([st[1:], st[-1:]], axis=0)
            cams = [c for c in self.CAMS["release"] if f"observation/{c}/rgb" in f]
            tasks = self._instruction_file(p)
        if not cams:
            raise ValueError(f"{p}: no camera images found (layout '{layout}')")
        return Episode(st, ac, tasks, dict(file=p, layout=layout, ee16=ee16)), cams

    @staticmethod
    def _arms(f, group, p):
        """[l_xyz, l_quat, l_grip, r_xyz, r_quat, r_grip] from one group of a file."""
        names = {"endpose": ("{}_endpose", "{}_gripper"), "state": ("{}_ee_poses", "{}_ee_joint_states"),
                 "action": ("{}_ee_poses", "{}_ee_joint_states")}[group]
        parts = []
        for arm in ("left", "right"):
            pose = np.asarray(_h5(f, f"{group}/{names[0].format(arm)}", p), np.float32)
            grip = np.asarray(_h5(f, f"{group}/{names[1].format(arm)}", p), np.float32)
            if pose.ndim != 2 or pose.shape[1] != 7:
                raise ValueError(f"{p}: '{group}/{names[0].format(arm)}' has shape {pose.shape}; "
                                 "expected (T, 7) [x, y, z, qw, qx, qy, qz]")
            grip = grip.reshape(len(grip), -1)[:, :1]
            if len(grip) != len(pose):
                raise ValueError(f"{p}: '{group}/{names[1].format(arm)}' has {len(grip)} frames; "
                                 f"expected {len(pose)}")
            parts += [pose, grip]
        return np.concatenate(parts, axis=1)

    @staticmethod
    def _early_endpose(f, p):
        arr = np.asarray(f["endpose"], np.float64)
        if arr.ndim != 2 or arr.shape[1] != 14:
            raise ValueError(f"{p}: 'endpose' has shape {arr.shape}; expected (T, 14) "
                             "[x, y, z, roll, pitch, yaw, gripper] per arm")
        parts = []
        for a in (arr[:, :7], arr[:, 7:]):
            quat = matrix_to_quat(euler_to_matrix(a[:, 3:6]))  # (T, 4)
            parts += [a[:, :3], quat, a[:, 6:7]]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _instruction_file(self, p):
        m = re.search(r"(\d+)\.hdf5$", p)
        root = os.path.dirname(os.path.dirname(p))
        path = os.path.join(root, "instructions", f"episode{int(m.group(1)) if m else 0}.json")
        if os.path.exists(path):
            return _instructions(read_json(path, "RoboTwin instructions (seen/unseen lists)"))
        return [os.path.basename(os.path.dirname(root)).replace("_", " ")]

    def _file(self, p):
        import h5py
        return _lru(self.handles(), p, lambda: h5py.File(p, "r"), 8)

    def frame(self, ep, t, cam, want_depth=True):
        e = self.episodes[ep].key
        p, f, cur = e["file"], self._file(e["file"]), e["layout"] == "current"
        g = f"vision/{cam}" if cur else f"observation/{cam}"
        rgb, depth_key = ("colors", "depths") if cur else ("rgb", "depth")
        image = decode_image(_h5(f, f"{g}/{rgb}", p)[t], f"{p}: '{g}/{rgb}'[{t}]", bgr=True)
        depth_key = f"{g}/{depth_key}"
        depth = None
        if want_depth and depth_key in f:
            raw = f[depth_key][t]
            encoded = isinstance(raw, (bytes, np.bytes_)) or np.ndim(raw) == 1  # PNG bytes, else mm array
            depth = (decode_depth_png(raw, f"{p}: '{depth_key}'[{t}]", 0.001) if encoded
                     else np.asarray(raw, np.float32) / 1000.0)
        return CameraFrame(image, depth, *self.camera(ep, t, cam))

    def camera(self, ep, t, cam):
        """(K (3, 3), cam2world (4, 4), OpenCV axes) at frame t without decoding the image."""
        e = self.episodes[ep].key
        p, f = e["file"], self._file(e["file"])
        if e["layout"] == "current":  # camera -> world in OpenGL axes
            K = _matrix(f, f"vision/{cam}/intrinsic_matrix", t, (3, 3), p)
            return K, _matrix(f, f"vision/{cam}/extrinsics_matrix", t, (4, 4), p) @ GL_TO_CV
        K = _matrix(f, f"observation/{cam}/intrinsic_cv", t, (3, 3), p)  # world -> camera (3, 4), OpenCV axes
        ext = _matrix(f, f"observation/{cam}/extrinsic_cv", t, (3, 4), p)
        return K, np.linalg.inv(np.vstack([ext, [0, 0, 0, 1]]))


def _instructions(value):
    """RoboTwin instructions: {'seen': [...], 'unseen': [...]}, a list, or a string (maybe JSON)."""
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    if isinstance(value, dict):
        value = value.get("seen") or value.get("unseen") or []
    return [str(v) for v in (value or [])]
