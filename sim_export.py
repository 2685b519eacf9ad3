"""Writers for the built-in tabletop world (method.md §10-11): grounding scenes and demonstrations.

- `write_grounding`: random layouts seen from random camera poses around the table, written in the
  Omni3D JSON format (method.md §10.1) with RGB PNGs and 16-bit depth PNGs in millimetres beside
  them; each `images[]` entry also carries `depth_path` and `cam2world` (4x4, OpenCV axes).
  Annotation boxes follow the Cube R-CNN convention: `dimensions` = [W, H, L] with L along the
  object's x axis, H along y (pointing down for an upright object, like the camera's y) and W
  along z; `bbox3D_cam` = R_cam @ corner + center_cam.
- `write_demos`: scripted-expert (expert.py) successes as a LeRobot v3.0 dataset (method.md §10.3) with PNG images in
  the parquet and, per camera, `observation.depth.{cam}` (16-bit PNG, mm),
  `observation.intrinsics.{cam}` (9, row-major K) and `observation.extrinsics.{cam}` (16,
  row-major camera->world, OpenCV axes).
- `builtin_grounding` / `builtin_demos`: the training sets pretrain.py and posttrain.py use without
  --data, written once into a cache folder (sizes in BUILTIN).
Everything is a pure function of the seed, so the same seed writes the same bytes. `bench` times
control steps and demo writing. `main` is the world's command line (`python sim.py ...` runs it).
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import ee16
import sim
from errors import at_least, cli
from formats import depth_png, png_bytes
from lerobot import INDEX_FEATURES, arrow_schema
from expert import rollout, show

# Object frame for annotations (Omni3D/Cube R-CNN): x = body x, y = -body z (down), z = body y.
ANN_TO_BODY = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
# Cube R-CNN corner order over (x, y, z) signs of (L/2, H/2, W/2).
CORNER_SIGNS = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1],
                         [-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]], np.float64)
STATE_NAMES = ee16.NAMES


def _r(x, nd=6):
    return np.round(np.asarray(x, np.float64), nd).tolist()


# ----------------------------------------------------------------------------- grounding
def random_camera(rng):
    """(cam2world OpenCV 4x4, fovy degrees) on a sphere cap around the table, facing it. Distances
    and fields of view bracket the head camera's (sim.HEAD_CAMERA: 0.66 m, 42 degrees), so objects
    appear at the sizes the policy will see them."""
    az, el = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(30, 65))
    dist = rng.uniform(0.5, 0.85)
    target = np.array([rng.uniform(-0.12, 0.12), rng.uniform(-0.08, 0.08), 0.0])
    pos = target + dist * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    T = np.eye(4)
    T[:3, :3] = sim.look_at(pos, target, np.array([0, 0, 1.0]))
    T[:3, 3] = pos
    return T, rng.uniform(38, 52)


def _box(us, vs):
    return [float(min(us)), float(min(vs)), float(max(us)), float(max(vs))]


def annotate(env, view, i):
    """Omni3D annotation of object i in a rendered view, or None when it is out of frame."""
    obj, size = env.objects[i], env.objects[i].size
    pos, R = env.object_pose(i)
    w2c = np.linalg.inv(view["cam2world"])
    center = w2c[:3, :3] @ pos + w2c[:3, 3]
    R_cam = w2c[:3, :3] @ R @ ANN_TO_BODY
    L, H, W = size[0], size[2], size[1]
    corners = (R_cam @ (CORNER_SIGNS * [L / 2, H / 2, W / 2]).T).T + center  # (8, 3)
    alone = view["alone"][i]
    if center[2] <= 0.05 or alone == 0:
        return None
    vs, us = np.nonzero(view["seg"] == i)
    S, K = view["rgb"].shape[0], view["K"]
    tight = _box(us, vs) if len(us) else [-1.0] * 4
    proj, trunc, truncation = [-1.0] * 4, [-1.0] * 4, -1.0
    if np.all(corners[:, 2] > 0.01):
        uv = (K @ corners.T).T
        uv = uv[:, :2] / uv[:, 2:]
        proj = _box(uv[:, 0], uv[:, 1])
        trunc = [float(np.clip(v, 0, S - 1)) for v in proj]
        area = lambda b: max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)  # noqa: E731
        truncation = 1.0 - area(trunc) / max(area(proj), 1e-9)
    return {"category_name": obj.name, "valid3D": bool(len(us) > 0), "bbox2D_tight": _r(tight, 2),
            "bbox2D_proj": _r(proj, 2), "bbox2D_trunc": _r(trunc, 2), "center_cam": _r(center),
            "dimensions": _r([W, H, L]), "R_cam": _r(R_cam), "bbox3D_cam": _r(corners),
            "visibility": round(len(us) / alone, 4), "truncation": round(truncation, 4),
            "behind_camera": False, "depth_error": -1, "segmentation_pts": -1, "lidar_pts": -1}


def scan_view(env, rng):
    """Render the `scan` camera from a random pose; also count each object's unoccluded pixels."""
    T, fovy = random_camera(rng)
    env.set_scan_camera(T, fovy)
    view = env.camera_view("scan")
    alone = []
    for i in range(len(env.objects)):
        keep = set(np.nonzero(env._geom_obj == i)[0].tolist())
        gid = env.views.geom_ids(keep=keep)
        alone.append(int(np.isin(gid, list(keep)).sum()))
        env.views.update(env.data, env.model.camera("scan").id)
    view["alone"] = alone
    return view


def write_grounding(out, n_scenes, seed=0, image_size=256, views_per_scene=2):
    """Write n_scenes random layouts x views_per_scene random views as an Omni3D dataset in `out`."""
    if n_scenes < 1 or views_per_scene < 1:
        raise ValueError(f"n_scenes and views_per_scene must be >= 1, got {n_scenes}, {views_per_scene}")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "depth"), exist_ok=True)
    names = [f"{c} {k}" for k in sim.CATALOGUE for c in sim.COLOURS]
    cat_id = {n: k for k, n in enumerate(names)}
    images, anns, envs = [], [], {}
    for scene in tqdm(range(n_scenes), desc="grounding scenes"):
        task, setting = sim.TASKS[scene % len(sim.TASKS)], sim.SETTINGS[(scene // len(sim.TASKS)) % 2]
        if (task, setting) not in envs:
            envs[(task, setting)] = sim.TabletopEnv(task, setting, seed, image_size, cameras=("scan",))
        env = envs[(task, setting)]
        env.reset(seed * 1_000_003 + scene)
        rng = np.random.default_rng([seed, scene, 7])
        for v in range(views_per_scene):
            view, img_id = scan_view(env, rng), len(images)
            rel, drel = f"images/{img_id:06d}.png", f"depth/{img_id:06d}.png"
            with open(os.path.join(out, rel), "wb") as f:
                f.write(png_bytes(view["rgb"]))
            with open(os.path.join(out, drel), "wb") as f:
                f.write(depth_png(view["depth"]))
            images.append({"id": img_id, "file_path": rel, "depth_path": drel, "width": image_size,
                           "height": image_size, "K": _r(view["K"]), "cam2world": _r(view["cam2world"]),
                           "dataset_id": 0, "scene_id": scene, "src_90_rotate": 0, "src_flagged": False})
            for i in range(len(env.objects)):
                a = annotate(env, view, i)
                if a is not None:
                    anns.append({"id": len(anns), "image_id": img_id, "category_id": cat_id[a["category_name"]], **a})
    for env in envs.values():
        env.close()
    doc = {"info": {"id": 0, "source": "Pose-VLA built-in tabletop world (sim.py)", "name": "posevla_sim",
                    "split": "train", "version": "1.0", "url": ""},
           "images": images,
           "categories": [{"id": k, "name": n, "supercategory": n.split()[-1]} for n, k in cat_id.items()],
           "annotations": anns}
    path = os.path.join(out, "annotations.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


# ----------------------------------------------------------------------------- LeRobot v3.0 demos
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
FILE_MB = 100  # LeRobot's default data file size before a new file is started


def _features(S):
    vec = lambda n, names=None: {"dtype": "float32", "shape": [n], "names": names}  # noqa: E731
    feats = {"observation.state": vec(16, STATE_NAMES), "action": vec(16, STATE_NAMES)}
    for cam in sim.CAMERAS:
        feats[f"observation.images.{cam}"] = {"dtype": "image", "shape": [S, S, 3],
                                              "names": ["height", "width", "channel"]}
        feats[f"observation.depth.{cam}"] = {"dtype": "image", "shape": [S, S, 1],
                                             "names": ["height", "width", "channel"],
                                             "info": {"format": "16-bit PNG", "unit": "mm", "invalid": 0}}
        feats[f"observation.intrinsics.{cam}"] = vec(9, [f"k{i}{j}" for i in range(3) for j in range(3)])
        feats[f"observation.extrinsics.{cam}"] = vec(16, [f"t{i}{j}" for i in range(4) for j in range(4)])
    for key, dtype in INDEX_FEATURES:
        feats[key] = {"dtype": dtype, "shape": [1], "names": None}
    return feats


class _Stats:
    """Running min/max/mean/std per feature; images per channel in [0, 1], depth in metres."""

    def __init__(self):
        self.acc = {}

    def add(self, key, x, axis):
        x = np.asarray(x, np.float64)
        s = (x.min(axis), x.max(axis), x.sum(axis), (x * x).sum(axis), x.size // np.size(x.min(axis)))
        if key not in self.acc:
            self.acc[key] = list(s)
        else:
            a = self.acc[key]
            a[0], a[1] = np.minimum(a[0], s[0]), np.maximum(a[1], s[1])
            a[2], a[3], a[4] = a[2] + s[2], a[3] + s[3], a[4] + s[4]

    def to_json(self, shapes):
        out = {}
        for key, (lo, hi, s, ss, n) in self.acc.items():
            mean = s / n
            std = np.sqrt(np.maximum(ss / n - mean ** 2, 0.0))
            shape = shapes.get(key, np.shape(mean))
            out[key] = {k: np.reshape(v, shape).tolist() for k, v in
                        (("min", lo), ("max", hi), ("mean", mean), ("std", std))}
            out[key]["count"] = [int(n)]
        return out


def _frame(obs, action, ep, t, index, task_index, stats):
    row = {"observation.state": obs["state"].tolist(), "action": action.astype(np.float32).tolist(),
           "timestamp": float(np.float32(t / sim.CONTROL_HZ)), "frame_index": t, "episode_index": ep,
           "index": index, "task_index": task_index}
    stats.add("observation.state", obs["state"][None], 0)
    stats.add("action", action[None], 0)
    for cam, v in obs["cameras"].items():
        row[f"observation.images.{cam}"] = {"bytes": png_bytes(v["rgb"]), "path": None}
        row[f"observation.depth.{cam}"] = {"bytes": depth_png(v["depth"]), "path": None}
        row[f"observation.intrinsics.{cam}"] = v["K"].astype(np.float32).ravel().tolist()
        row[f"observation.extrinsics.{cam}"] = v["cam2world"].astype(np.float32).ravel().tolist()
        stats.add(f"observation.images.{cam}", v["rgb"].reshape(-1, 3) / 255.0, 0)
        stats.add(f"observation.depth.{cam}", v["depth"].reshape(-1, 1), 0)
        stats.add(f"observation.intrinsics.{cam}", row[f"observation.intrinsics.{cam}"], None)
        stats.add(f"observation.extrinsics.{cam}", row[f"observation.extrinsics.{cam}"], None)
    return row


def _record(env, seed):
    """Roll out the expert; returns (success, [(obs, action)])."""
    steps = []
    ok = rollout(env, seed, on_step=lambda obs, action: steps.append((obs, action)))
    return ok, steps


def write_demos(out, task, n_episodes, setting="clean", seed=0, image_size=128):
    """Write n_episodes expert successes of `task` as a LeRobot v3.0 dataset in `out`.

    Failed expert rollouts are skipped (as RoboTwin does); episode seeds are seed, seed+1, ...
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    env = sim.TabletopEnv(task, setting, seed, image_size)
    feats, stats = _features(image_size), _Stats()
    schema = arrow_schema(feats)
    tasks, episodes, rows, file_index, file_bytes, total, attempt = {}, [], [], 0, 0, 0, 0
    bar = tqdm(total=n_episodes, desc=f"demos {task}/{setting}")
    while len(episodes) < n_episodes:
        if attempt >= 3 * n_episodes + 10:
            raise RuntimeError(f"the {task} expert failed too often ({attempt} attempts for {len(episodes)} successes)")
        ok, steps = _record(env, seed + attempt)
        attempt += 1
        if not ok:
            continue
        ti = tasks.setdefault(env.instruction, len(tasks))
        ep = len(episodes)
        for t, (obs, action) in enumerate(steps):
            rows.append(_frame(obs, action, ep, t, total + t, ti, stats))
            file_bytes += sum(len(v["bytes"]) for v in rows[-1].values() if isinstance(v, dict))
        episodes.append({"episode_index": ep, "tasks": [env.instruction], "length": len(steps),
                         "dataset_from_index": total, "dataset_to_index": total + len(steps),
                         "data/chunk_index": file_index // 1000, "data/file_index": file_index % 1000,
                         "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0, "seed": seed + attempt - 1})
        total += len(steps)
        bar.update(1)
        if file_bytes > FILE_MB * 2 ** 20 or len(episodes) == n_episodes:
            _write_table(out, file_index, rows, schema)
            rows, file_bytes, file_index = [], 0, file_index + 1
    bar.close()
    env.close()
    _write_meta(out, feats, stats, tasks, episodes, total, image_size)
    return out


def _write_table(out, file_index, rows, schema):
    path = os.path.join(out, DATA_PATH.format(chunk_index=file_index // 1000, file_index=file_index % 1000))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = {name: [r[name] for r in rows] for name in schema.names}
    pq.write_table(pa.table(cols, schema=schema), path)


def _write_meta(out, feats, stats, tasks, episodes, total, S):
    meta = os.path.join(out, "meta")
    os.makedirs(os.path.join(meta, "episodes", "chunk-000"), exist_ok=True)
    names = list(tasks)
    pq.write_table(pa.table({"task_index": pa.array(range(len(names)), pa.int64()), "task": names}),
                   os.path.join(meta, "tasks.parquet"))
    cols = {k: [e[k] for e in episodes] for k in episodes[0]}
    pq.write_table(pa.table(cols), os.path.join(meta, "episodes", "chunk-000", "file-000.parquet"))
    shapes = {f"observation.images.{c}": (3, 1, 1) for c in sim.CAMERAS}
    shapes.update({f"observation.depth.{c}": (1, 1, 1) for c in sim.CAMERAS})
    with open(os.path.join(meta, "stats.json"), "w") as f:
        json.dump(stats.to_json(shapes), f)
    info = {"codebase_version": "v3.0", "robot_type": "posevla_sim_two_grippers", "total_episodes": len(episodes),
            "total_frames": total, "total_tasks": len(names), "chunks_size": 1000,
            "data_files_size_in_mb": FILE_MB, "video_files_size_in_mb": 500, "fps": sim.CONTROL_HZ,
            "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH, "video_path": None,
            "features": feats}
    with open(os.path.join(meta, "info.json"), "w") as f:
        json.dump(info, f, indent=2)


# ----------------------------------------------------------------------------- built-in training data
BUILTIN = {  # split -> (grounding scenes, demos per task and setting, seed); sized for a CPU run
    # 4000 scenes (8000 views, ~3 CPU-minutes to render, 210 MB): with 300 the decoder memorises
    # the scenes (train loss 1.9, held-out 2.5) instead of learning where objects are.
    "train": (4000, 6, 0),
    "val": (32, 1, 10_000),
}


def builtin_grounding(cache, split, d):
    """Tabletop grounding scenes (Omni3D JSON + RGB + depth) for `split` ('train' or 'val'). The
    trainer (torch) is imported here, not at the top, so the world's command line stays light."""
    from trainer import generate_once
    scenes, _, seed = BUILTIN[split]
    return generate_once(os.path.join(cache, "tabletop_grounding", split),
                          lambda p: write_grounding(p, scenes, seed=seed), d)


def builtin_demos(cache, split, d):
    """Scripted-expert demonstrations (LeRobot v3.0), one dataset per task and setting."""
    from trainer import generate_once
    _, episodes, seed = BUILTIN[split]
    return [generate_once(os.path.join(cache, "tabletop_demos", split, f"{task}_{setting}"),
                           lambda p, t=task, s=setting: write_demos(p, t, episodes, s, seed), d)
            for task in sim.TASKS for setting in sim.SETTINGS]


# ----------------------------------------------------------------------------- timing
def bench(episodes=3, image_size=128):
    """Time control steps (physics + 3 cameras x RGB/depth/seg) and demo writing on this machine."""
    for render in (False, True):
        steps, t0, c0 = 0, time.perf_counter(), time.process_time()
        for task in tqdm(sim.TASKS, desc=f"bench render={render}"):
            env = sim.TabletopEnv(task, "randomized", 0, image_size, render=render)
            for s in range(episodes):
                rollout(env, s)
                steps += env.t
            env.close()
        kind = "physics + 3 cameras RGB/depth/seg" if render else "physics only"
        print(f"{kind} at {image_size} px: {1000 * (time.perf_counter() - t0) / steps:.1f} ms wall, "
              f"{1000 * (time.process_time() - c0) / steps:.1f} ms CPU per control step "
              f"({steps} steps, resets included)")
    with tempfile.TemporaryDirectory() as tmp:
        for task in sim.TASKS:
            t0, c0 = time.perf_counter(), time.process_time()
            write_demos(os.path.join(tmp, task), task, episodes, "randomized", 0, image_size)
            print(f"{task}: {60 * episodes / (time.perf_counter() - t0):.1f} demos per minute wall, "
                  f"{60 * episodes / (time.process_time() - c0):.1f} per CPU-minute (written to disk)")


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(description="The built-in MuJoCo tabletop world (method.md §11).")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grounding", help="write Omni3D-format grounding scenes")
    g.add_argument("--out", required=True, help="output folder (annotations.json, images/, depth/)")
    g.add_argument("--scenes", type=at_least(1), default=100, help="number of random layouts")
    g.add_argument("--views", type=at_least(1), default=2, help="random camera poses per layout")
    d = sub.add_parser("demos", help="write expert demonstrations as a LeRobot v3.0 dataset")
    d.add_argument("--task", required=True, choices=sim.TASKS, help="which task")
    d.add_argument("--episodes", type=at_least(1), default=50, help="number of successful episodes to keep")
    d.add_argument("--out", required=True, help="dataset root folder")
    d.add_argument("--setting", default="clean", choices=sim.SETTINGS, help="clean or randomized scenes")
    s = sub.add_parser("show", help="PNG of the three views and GIF of an expert rollout")
    s.add_argument("--task", required=True, choices=sim.TASKS, help="which task")
    s.add_argument("--setting", default="clean", choices=sim.SETTINGS, help="clean or randomized scenes")
    s.add_argument("--out", default="outputs/sim_show", help="output folder")
    b = sub.add_parser("bench", help="ms per control step and demos per minute")
    b.add_argument("--episodes", type=at_least(1), default=3, help="episodes per task to time")
    for q in (g, d, s, b):
        q.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
        q.add_argument("--size", type=at_least(1), default=256 if q is g else 128, help="square image size in pixels")
    a = p.parse_args(argv)
    if a.cmd == "grounding":
        print(write_grounding(a.out, a.scenes, a.seed, a.size, a.views))
    elif a.cmd == "demos":
        print(write_demos(a.out, a.task, a.episodes, a.setting, a.seed, a.size))
    elif a.cmd == "show":
        show(a.task, a.setting, a.seed, a.out, a.size)
    else:
        bench(a.episodes, a.size)


if __name__ == "__main__":
    cli(main)
