"""Robot format readers (lerobot.py, robotwin.py, robot_formats.py): LeRobot v2.1/v3.0 (parquet
frames, PNG images or MP4 video) and RoboTwin HDF5 in its three layouts, fixtures written in each
exact on-disk format, values read back; and opening a dataset by kind.

Catches: a LeRobot v3.0 episode that starts mid-file read from the file's start, depth, intrinsics
or extrinsics columns read wrongly, RoboTwin's OpenGL camera axes or world->camera extrinsics used
as they are, its OpenCV (BGR) JPEGs decoded with red and blue swapped, a grounding dataset opened as
robot episodes or the reverse, and errors that do not name the file and key.

The fixture writers here are also used by test_data.py and test_bad_input.py.
"""
import json
import os
import sys

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from formats import detect_format, load_scenes  # noqa: E402
from lerobot import LeRobotSource  # noqa: E402
from robot_formats import open_source  # noqa: E402
from robotwin import RoboTwinSource  # noqa: E402
from test_formats import H0, W0, cv2_jpeg, png, two_tone, write_omni3d  # noqa: E402
from tokenizer import euler_to_matrix, matrix_to_quat, quat_to_matrix  # noqa: E402


# ----------------------------------------------------------------------------- LeRobot
CAMS = ("head", "left_wrist", "right_wrist")
VW, VH = 64, 48


def frame_colour(ep, t, c):
    return np.array([min(250, 60 + 25 * t), 40 + 60 * c, 180 - 60 * ep], np.uint8)


def ee16(ep, t):
    """A valid 16-dim [l_xyz, l_quat, l_grip, r_xyz, r_quat, r_grip] state for frame t."""
    lq = matrix_to_quat(euler_to_matrix([np.pi, 0.1 * t, 0.05 * ep]))
    rq = matrix_to_quat(euler_to_matrix([np.pi, -0.1 * t, 0.2]))
    return np.r_[[-0.2 + 0.01 * t, 0.1 * ep, 0.3 - 0.01 * t], lq, [1.0 - 0.1 * t],
                 [0.25, 0.02 * t, 0.25], rq, [0.5]].astype(np.float32)


def look_at(pos, target, up=(0, 0, 1)):
    """cam2world (4, 4) with OpenCV axes."""
    z = np.asarray(target, float) - pos
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = np.stack([x, np.cross(z, x), z], 1), pos
    return T


CAM_POSES = {"head": look_at(np.array([0.0, -0.8, 0.7]), [0, 0, 0.1]),
             "left_wrist": look_at(np.array([-0.3, -0.2, 0.5]), [-0.2, 0.1, 0.2]),
             "right_wrist": look_at(np.array([0.3, -0.2, 0.5]), [0.25, 0.1, 0.2])}
KV = np.array([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]])


def write_mp4(path, frames, fps):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = VW, VH, "yuv420p"
        s.options = {"g": "3", "crf": "10"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _frame_table(eps, lengths, media, extras, state_width, start):
    cols = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index", "episode_index",
                            "index", "task_index")}
    img = {f"observation.images.{c}": [] for c in CAMS} if media == "image" else {}
    ext = ({f"observation.{k}.{c}": [] for k in ("intrinsics", "extrinsics", "depth") for c in CAMS}
           if extras else {})
    i = start
    for e in eps:
        for t in range(lengths[e]):
            s = ee16(e, t)
            cols["observation.state"].append(s[:state_width].tolist())
            cols["action"].append(ee16(e, t + 1).tolist())
            cols["timestamp"].append(t / 10)
            cols["frame_index"].append(t)
            cols["episode_index"].append(e)
            cols["index"].append(i)
            cols["task_index"].append(e % 2)
            i += 1
            for c, cam in enumerate(CAMS):
                if img:
                    img[f"observation.images.{cam}"].append({"bytes": png(np.full((VH, VW, 3), frame_colour(e, t, c))),
                                                              "path": None})
                if ext:
                    ext[f"observation.intrinsics.{cam}"].append(KV.ravel().tolist())
                    ext[f"observation.extrinsics.{cam}"].append(CAM_POSES[cam].ravel().tolist())
                    ext[f"observation.depth.{cam}"].append({"bytes": png(np.full((VH, VW), 800 + 100 * c, np.uint16)),
                                                             "path": None})
    flt = pa.list_(pa.float32())
    arrays = {"observation.state": pa.array(cols["observation.state"], flt), "action": pa.array(cols["action"], flt),
              "timestamp": pa.array(cols["timestamp"], pa.float32())}
    arrays.update({k: pa.array(cols[k], pa.int64()) for k in ("frame_index", "episode_index", "index", "task_index")})
    arrays.update({k: pa.array(v) for k, v in img.items()})
    arrays.update({k: pa.array(v, flt) if "depth" not in k else pa.array(v) for k, v in ext.items()})
    return pa.table(arrays)


LEROBOT_TASKS = ["pick up the red cube", "push the blue bowl"]  # episode e does task e % 2


def write_lerobot(root, version="v3.0", media="video", lengths=(6, 4), extras=False, state_width=16, fps=10):
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    feats = {"observation.state": {"dtype": "float32", "shape": [16]}, "action": {"dtype": "float32", "shape": [16]}}
    for cam in CAMS:
        feats[f"observation.images.{cam}"] = {"dtype": media, "shape": [VH, VW, 3]}
        if extras:
            feats[f"observation.depth.{cam}"] = {"dtype": "image", "shape": [VH, VW]}
            feats[f"observation.intrinsics.{cam}"] = {"dtype": "float32", "shape": [9]}
            feats[f"observation.extrinsics.{cam}"] = {"dtype": "float32", "shape": [16]}
    eps = list(range(len(lengths)))
    frames = {c: [[np.full((VH, VW, 3), frame_colour(e, t, ci)) for t in range(lengths[e])] for e in eps]
              for ci, c in enumerate(CAMS)}
    info = {"codebase_version": version, "fps": fps, "features": feats, "chunks_size": 1000}
    table = lambda episodes, start: _frame_table(episodes, lengths, media, extras, state_width, start)  # noqa: E731
    write = _write_lerobot_v3 if version == "v3.0" else _write_lerobot_v2
    info.update(write(root, lengths, media, frames, fps, table))
    json.dump(info, open(os.path.join(root, "meta", "info.json"), "w"))
    return root


def _write_lerobot_v3(root, lengths, media, frames, fps, table):
    """v3.0 files: every episode in one data file (and one video per camera), meta/episodes rows
    pointing into them, meta/tasks.parquet. `table(episodes, start)`: their frame table.
    Returns the info.json path patterns."""
    eps = list(range(len(lengths)))
    os.makedirs(os.path.join(root, "data", "chunk-000"))
    pq.write_table(table(eps, 0), os.path.join(root, "data", "chunk-000", "file-000.parquet"), row_group_size=4)
    starts = np.cumsum([0] + list(lengths))
    rows = {"episode_index": eps, "tasks": [[LEROBOT_TASKS[e % 2]] for e in eps], "length": list(lengths),
            "dataset_from_index": starts[:-1].tolist(), "dataset_to_index": starts[1:].tolist(),
            "data/chunk_index": [0] * len(eps), "data/file_index": [0] * len(eps)}
    for cam in CAMS:
        key = f"observation.images.{cam}"
        rows.update({f"videos/{key}/chunk_index": [0] * len(eps), f"videos/{key}/file_index": [0] * len(eps),
                     f"videos/{key}/from_timestamp": (starts[:-1] / fps).tolist(),
                     f"videos/{key}/to_timestamp": (starts[1:] / fps).tolist()})
        if media == "video":
            write_mp4(os.path.join(root, "videos", key, "chunk-000", "file-000.mp4"),
                      [f for e in eps for f in frames[cam][e]], fps)
    os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"))
    pq.write_table(pa.table(rows), os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"))
    pq.write_table(pa.table({"task_index": [0, 1], "__index_level_0__": LEROBOT_TASKS}),
                   os.path.join(root, "meta", "tasks.parquet"))
    return {"data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}


def _write_lerobot_v2(root, lengths, media, frames, fps, table):
    """v2.x files: one data file (and one video per camera) per episode, meta/episodes.jsonl and
    meta/tasks.jsonl. `table(episodes, start)`: their frame table. Returns the info.json path patterns."""
    os.makedirs(os.path.join(root, "data", "chunk-000"))
    start = 0
    for e, n in enumerate(lengths):
        pq.write_table(table([e], start), os.path.join(root, "data", "chunk-000", f"episode_{e:06d}.parquet"))
        start += n
        for cam in CAMS if media == "video" else []:
            write_mp4(os.path.join(root, "videos", "chunk-000", f"observation.images.{cam}",
                                   f"episode_{e:06d}.mp4"), frames[cam][e], fps)
    with open(os.path.join(root, "meta", "episodes.jsonl"), "w") as f:
        f.writelines(json.dumps({"episode_index": e, "tasks": [LEROBOT_TASKS[e % 2]], "length": n}) + "\n"
                     for e, n in enumerate(lengths))
    with open(os.path.join(root, "meta", "tasks.jsonl"), "w") as f:
        f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(LEROBOT_TASKS))
    return {"data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}


@pytest.mark.parametrize("version,media", [("v2.1", "video"), ("v3.0", "video"), ("v2.1", "image"),
                                           ("v3.0", "image")])
def test_lerobot_reads_frames_and_images(tmp_path, version, media):
    root = write_lerobot(str(tmp_path / "ds"), version, media)
    assert detect_format(root) == "lerobot"
    src = LeRobotSource(root)
    assert [len(e.state) for e in src.episodes] == [6, 4]
    assert src.episodes[1].tasks == ["push the blue bowl"]
    np.testing.assert_allclose(src.episodes[1].state[2], ee16(1, 2), atol=1e-6)
    np.testing.assert_allclose(src.episodes[0].action[5], ee16(0, 6), atol=1e-6)
    for e, t, c in ((0, 0, 0), (0, 5, 2), (1, 0, 1), (1, 3, 0), (0, 2, 1)):  # episode 1 starts mid-file in v3.0
        img = src.frame(e, t, CAMS[c]).image
        assert img.shape == (VH, VW, 3)
        tol = 0 if media == "image" else 8  # lossy video
        np.testing.assert_allclose(img.reshape(-1, 3).mean(0), frame_colour(e, t, c), atol=tol + 1e-9)


def test_lerobot_extras_depth_intrinsics_extrinsics(tmp_path):
    src = LeRobotSource(write_lerobot(str(tmp_path / "ds"), "v3.0", "image", extras=True))
    f = src.frame(1, 2, "left_wrist")
    np.testing.assert_allclose(f.K, KV)
    np.testing.assert_allclose(f.cam2world, CAM_POSES["left_wrist"], atol=1e-6)
    np.testing.assert_allclose(f.depth, 0.9, atol=1e-6)  # 900 mm
    assert src.ee16


def test_lerobot_bad_input(tmp_path):
    root = write_lerobot(str(tmp_path / "a"), "v3.0", "image")
    info = json.load(open(os.path.join(root, "meta", "info.json")))
    json.dump(dict(info, codebase_version="v9.9"), open(os.path.join(root, "meta", "info.json"), "w"))
    with pytest.raises(ValueError, match=r"info.json: codebase_version 'v9.9'.*v2.1.*v3.0"):
        LeRobotSource(root)
    json.dump(info, open(os.path.join(root, "meta", "info.json"), "w"))
    path = os.path.join(root, "data", "chunk-000", "file-000.parquet")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"file-000.parquet: cannot read parquet.*truncated"):
        LeRobotSource(root)
    narrow = write_lerobot(str(tmp_path / "b"), "v2.1", "image", state_width=14)
    with pytest.raises(ValueError, match=r"episode_000000.parquet: column 'observation.state' has width "
                                         r"\(14,\); expected 16"):
        LeRobotSource(narrow)
    corrupt = write_lerobot(str(tmp_path / "c"), "v2.1", "image")
    path = os.path.join(corrupt, "data", "chunk-000", "episode_000001.parquet")
    t = pq.read_table(path)
    col = t.column("observation.images.head").to_pylist()
    col[2] = {"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": None}
    pq.write_table(t.set_column(t.column_names.index("observation.images.head"), "observation.images.head",
                                pa.array(col)), path)
    with pytest.raises(ValueError, match=r"episode_000001.parquet: row 2 'observation.images.head': cannot decode"):
        LeRobotSource(corrupt).frame(1, 2, "head")


# ----------------------------------------------------------------------------- RoboTwin
def robotwin_frame(t, c):
    return two_tone((200 - 10 * t, 40 + 50 * c, 30), (30, 60, 210), VW, VH)


def _jpeg_column(frames):
    data = [cv2_jpeg(f) for f in frames]
    return np.array(data, dtype=f"S{max(map(len, data)) + 7}")  # NUL-padded like RoboTwin


def write_robotwin(root, layout="release", T=8, ep=0):
    data = os.path.join(root, "data")
    os.makedirs(data, exist_ok=True)
    states = np.stack([ee16(ep, t) for t in range(T)])
    name = f"episode_{ep:07d}.hdf5" if layout == "current" else f"episode{ep}.hdf5"
    with h5py.File(os.path.join(data, name), "w") as f:
        cams = ("cam_head", "cam_left_wrist", "cam_right_wrist") if layout == "current" else \
            ("head_camera", "left_camera", "right_camera")
        for c, cam in enumerate(cams):
            T_cw = CAM_POSES[CAMS[c]]
            rgb = _jpeg_column([robotwin_frame(t, c) for t in range(T)])
            if layout == "current":
                g = f.create_group(f"vision/{cam}")
                g["colors"], g["intrinsic_matrix"] = rgb, KV
                g["extrinsics_matrix"] = T_cw @ np.diag([1.0, -1, -1, 1])  # OpenGL axes
            else:
                g = f.create_group(f"observation/{cam}")
                g["rgb"], g["intrinsic_cv"] = rgb, np.repeat(KV[None], T, 0)
                g["extrinsic_cv"] = np.repeat(np.linalg.inv(T_cw)[None, :3], T, 0)
                g["cam2world_gl"] = np.repeat((T_cw @ np.diag([1.0, -1, -1, 1]))[None], T, 0)
                if c == 0:
                    depth = np.full((T, VH, VW), 750.0)
                    depth[:, :4, :4] = np.nan
                    g["depth"] = depth
        if layout == "current":
            for grp, arr in (("state", states), ("action", np.concatenate([states[1:], states[-1:]]))):
                f[f"{grp}/left_ee_poses"], f[f"{grp}/right_ee_poses"] = arr[:, 0:7], arr[:, 8:15]
                f[f"{grp}/left_ee_joint_states"], f[f"{grp}/right_ee_joint_states"] = arr[:, 7:8], arr[:, 15:16]
                f[f"{grp}/left_arm_joint_states"] = np.zeros((T, 6))
            f["instructions"] = json.dumps({"seen": ["stack the cubes"], "unseen": ["pile them up"]})
            f["additional_info/frequency"], f["data_format_version"] = 25, "1.0"
        elif layout == "release":
            f["endpose/left_endpose"], f["endpose/right_endpose"] = states[:, 0:7], states[:, 8:15]
            f["endpose/left_gripper"], f["endpose/right_gripper"] = states[:, 7], states[:, 15]
            f["joint_action/vector"] = np.zeros((T, 14))
        else:  # early: one (T, 14) euler endpose dataset
            eul = [np.stack([np.pi * np.ones(T), 0.1 * np.arange(T), np.full(T, 0.05 * ep)], 1),
                   np.stack([np.pi * np.ones(T), -0.1 * np.arange(T), np.full(T, 0.2)], 1)]
            f["endpose"] = np.concatenate([states[:, 0:3], eul[0], states[:, 7:8], states[:, 8:11], eul[1],
                                           states[:, 15:16]], 1)
    if layout != "current":
        os.makedirs(os.path.join(root, "instructions"), exist_ok=True)
        json.dump({"seen": ["stack the cubes"], "unseen": ["pile them up"]},
                  open(os.path.join(root, "instructions", f"episode{ep}.json"), "w"))
    return root, states


@pytest.mark.parametrize("layout", ["release", "early", "current"])
def test_robotwin_layouts(tmp_path, layout):
    root, states = write_robotwin(str(tmp_path / "rt"), layout)
    assert detect_format(root) == "robotwin"
    src = RoboTwinSource(root)
    ep = src.episodes[0]
    assert ep.key["layout"] == layout and ep.tasks == ["stack the cubes"] and src.ee16
    for s in (slice(0, 3), slice(7, 11), slice(15, 16)):
        np.testing.assert_allclose(ep.state[:, s], states[:, s], atol=1e-6)
    for q in (slice(3, 7), slice(11, 15)):  # same rotation (quaternion sign is free)
        np.testing.assert_allclose(quat_to_matrix(ep.state[:, q]), quat_to_matrix(states[:, q]), atol=1e-6)
    np.testing.assert_allclose(ep.action[:-1], ep.state[1:])
    for t, c, cam in ((0, 0, "head"), (5, 2, "right_wrist")):
        f = src.frame(0, t, src.resolve_camera(cam))
        # colours not swapped: left half reddish, right half blue (JPEG tolerance)
        np.testing.assert_allclose(f.image[:, 4:24].reshape(-1, 3).mean(0), robotwin_frame(t, c)[0, 0], atol=6)
        np.testing.assert_allclose(f.image[:, -24:-4].reshape(-1, 3).mean(0), [30, 60, 210], atol=6)
        np.testing.assert_allclose(f.K, KV)
        np.testing.assert_allclose(f.cam2world, CAM_POSES[CAMS[c]], atol=1e-9)
    head = src.frame(0, 1, src.resolve_camera("head"))
    if layout != "current":
        assert np.isnan(head.depth[0, 0]) and head.depth[10, 10] == pytest.approx(0.75)


def test_robotwin_bad_input(tmp_path):
    root, _ = write_robotwin(str(tmp_path / "rt"), "release")
    path = os.path.join(root, "data", "episode0.hdf5")
    with h5py.File(path, "a") as f:
        rgb = f["observation/head_camera/rgb"][()]
        rgb[3] = b"\xff\xd8\xff garbage"
        del f["observation/head_camera/rgb"]
        f["observation/head_camera/rgb"] = rgb
    with pytest.raises(ValueError, match=r"episode0.hdf5: 'observation/head_camera/rgb'\[3\]: cannot decode"):
        RoboTwinSource(root).frame(0, 3, "head_camera")
    with h5py.File(path, "a") as f:
        pose = f["endpose/left_endpose"][:, :6]
        del f["endpose/left_endpose"]
        f["endpose/left_endpose"] = pose
    with pytest.raises(ValueError, match=r"episode0.hdf5: 'endpose/left_endpose' has shape \(8, 6\); expected"):
        RoboTwinSource(root)
    open(path, "wb").write(b"not hdf5")
    with pytest.raises(ValueError, match="episode0.hdf5: cannot open HDF5"):
        RoboTwinSource(root)


def test_open_by_kind_and_scene_pixels(tmp_path):
    omni = write_omni3d(str(tmp_path / "omni"))
    rt, _ = write_robotwin(str(tmp_path / "rt"))
    scene = load_scenes(omni)[0]
    image, depth = scene.load()
    assert image.shape == (H0, W0, 3) and image[0, 0].tolist() == [200, 30, 30]
    assert depth.dtype == np.float32 and depth[50, 50] == pytest.approx(1.5) and depth[0, 0] == 0
    assert isinstance(open_source(rt), RoboTwinSource)
    with pytest.raises(ValueError, match="format 'omni3d' holds no robot episodes"):
        open_source(omni)
    with pytest.raises(ValueError, match="format 'robotwin' has no 3D object annotations"):
        load_scenes(rt)
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(scene.depth_path)
    with pytest.raises(ValueError, match=r"000000_depth.png: depth is \(10, 10\); expected \(120, 160\)"):
        scene.load()
