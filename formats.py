"""Readers for the on-disk dataset formats Pose-VLA trains on (SPEC sections 9 and 11).

Grounding data (pre-training stage 1) becomes a list of `SceneImage` records:
  - Omni3D JSON (Objectron, ARKitScenes, SUN RGB-D and the built-in tabletop scenes),
  - BOP scene folders (millimetres -> metres, `visib_fract` filter, id-to-name map).
Robot data (stage 2 and post-training) becomes a `RobotSource` with per-episode state/action arrays
and lazy per-frame camera access:
  - LeRobot v2.1 / v3.0 (parquet frames; images as mp4 decoded with PyAV by timestamp, or PNG bytes),
  - RoboTwin HDF5 in its three layouts (JPEG frames written by OpenCV, i.e. BGR order).
File handles (h5py, PyAV, parquet row groups) are opened lazily and never pickled, so every
DataLoader worker opens its own. Every error names the file, the key and what was expected.
"""
import glob
import io
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tokenizer import euler_to_matrix, matrix_to_quat

DEPTH_RANGE = (0.01, 10.0)  # metres; SPEC 6 filter, applied to object centres
BOP_MIN_VISIB = 0.3  # SPEC 6: BOP objects need visib_fract >= 0.3
SUPPORTED_FORMATS = ("omni3d (a COCO-like .json with images/annotations, or a folder of them)",
                     "bop (a dataset root, split folder or scene folder with scene_camera.json)",
                     "lerobot (a folder with meta/info.json, codebase_version v2.0/v2.1/v3.0)",
                     "robotwin (an .hdf5 episode or a folder with data/episode*.hdf5)")


# ----------------------------------------------------------------------------- decoding helpers
def _pil(data, where, what, convert=None):
    """Bytes or a file path -> array through PIL, with errors naming `where`."""
    if isinstance(data, str) and not os.path.exists(data):
        raise FileNotFoundError(f"{where}: file not found")
    try:
        with Image.open(data if isinstance(data, str) else io.BytesIO(bytes(data))) as im:
            return np.asarray(im.convert(convert) if convert else im)
    except Exception as e:  # PIL raises several unrelated types for corrupt data
        raise ValueError(f"{where}: cannot decode {what} ({type(e).__name__}: {e})") from e


def decode_image(data, where, bgr=False):
    """Decode PNG/JPEG bytes or a file path to (H, W, 3) uint8 RGB. `bgr`: bytes were written by
    OpenCV from an RGB array (OpenCV assumes BGR), so PIL's output has red and blue swapped."""
    arr = _pil(data, where, "image (expected PNG/JPEG)", "RGB")
    return np.ascontiguousarray(arr[..., ::-1]) if bgr else arr


def decode_depth_png(data, where, scale):
    """Decode a 16-bit depth PNG (bytes or path) to float32 metres (raw * scale)."""
    raw = _pil(data, where, "depth image (expected a 16-bit PNG)")
    if raw.ndim != 2:
        raise ValueError(f"{where}: depth image has shape {raw.shape}; expected a single channel")
    return raw.astype(np.float32) * np.float32(scale)


def read_json(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _finite(values, where, shape):
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != shape and arr.size == int(np.prod(shape)):
        arr = arr.reshape(shape)
    if arr.shape != shape:
        raise ValueError(f"{where}: has shape {arr.shape}; expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: contains NaN/inf; expected finite values")
    return arr


# ----------------------------------------------------------------------------- grounding records
@dataclass
class Object3D:
    name: str
    t: np.ndarray  # (3,) box centre, metres, camera frame
    R: np.ndarray  # (3, 3) object -> camera
    size: np.ndarray  # (3,) full extent along the object's x, y, z axes, metres
    box2d: np.ndarray | None  # (4,) x1 y1 x2 y2 in image pixels; None = use the projected 3D box


@dataclass
class SceneImage:
    image_path: str
    depth_path: str | None
    depth_scale: float  # raw depth value * depth_scale = metres
    K: np.ndarray  # (3, 3)
    objects: list = field(default_factory=list)  # list[Object3D]
    source: str = ""  # annotation file, for error messages


def _keep(t):
    return DEPTH_RANGE[0] <= t[2] <= DEPTH_RANGE[1]


def _omni3d_box(ann):
    """First present 2D box among tight/proj/trunc ([x1,y1,x2,y2]; -1 entries mark missing)."""
    for key in ("bbox2D_tight", "bbox2D_proj", "bbox2D_trunc"):
        box = ann.get(key)
        if box is not None and len(box) == 4 and not all(v == -1 for v in box):
            return np.asarray(box, dtype=np.float64)
    return None


def _resolve_root(json_path, rel):
    """Omni3D file paths are relative to the JSON's folder (ours) or to a dataset root above it."""
    base = os.path.dirname(os.path.abspath(json_path))
    for root in (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base))):
        if os.path.exists(os.path.join(root, rel)):
            return root
    raise FileNotFoundError(f"{json_path}: image file_path '{rel}' not found relative to {base} or "
                            "its two parent folders")


def read_omni3d(json_path):
    """Omni3D JSON -> list[SceneImage]. `dimensions` [W, H, L] follows Cube R-CNN: L along object x,
    H along y, W along z, so size = [L, H, W] (corners = R_cam @ local + center_cam)."""
    d = read_json(json_path)
    for key in ("images", "annotations"):
        if key not in d:
            raise ValueError(f"{json_path}: missing key '{key}'; expected an Omni3D JSON")
    cats = {c["id"]: c["name"] for c in d.get("categories", [])}
    images, root = {}, None
    for i, im in enumerate(d["images"]):
        where = f"{json_path}: images[{i}] (id {im.get('id')})"
        for key in ("id", "file_path"):
            if key not in im:
                raise ValueError(f"{where}: missing key '{key}'")
        if im.get("K") is None or im["K"] == -1:
            raise ValueError(f"{where}: missing intrinsics 'K'; expected a 3x3 matrix")
        K = _finite(im["K"], f"{where}.K", (3, 3))
        root = root or _resolve_root(json_path, im["file_path"])
        depth = im.get("depth_path")
        images[im["id"]] = SceneImage(os.path.join(root, im["file_path"]),
                                      os.path.join(root, depth) if depth else None,
                                      float(im.get("depth_scale", 0.001)), K, [], json_path)
    for j, ann in enumerate(d["annotations"]):
        if not ann.get("valid3D", True) or ann.get("behind_camera", False):
            continue
        where = f"{json_path}: annotations[{j}] (id {ann.get('id')})"
        if ann.get("image_id") not in images:
            raise ValueError(f"{where}: image_id {ann.get('image_id')} not in images[]")
        name = ann.get("category_name") or cats.get(ann.get("category_id"))
        if not name:
            raise ValueError(f"{where}: no category_name and unknown category_id")
        t = _finite(ann.get("center_cam"), f"{where}.center_cam", (3,))
        dims = _finite(ann.get("dimensions"), f"{where}.dimensions", (3,))
        R = _finite(ann.get("R_cam"), f"{where}.R_cam", (3, 3))
        if np.any(dims <= 0) or not _keep(t):
            continue
        images[ann["image_id"]].objects.append(
            Object3D(str(name), t, R, dims[[2, 1, 0]].copy(), _omni3d_box(ann)))
    return [im for im in images.values() if im.objects]


def _bop_scene_dirs(path, split):
    """A BOP scene folder, a split folder of scenes, or a dataset root with split folders."""
    if os.path.exists(os.path.join(path, "scene_camera.json")):
        return [path]
    scenes = sorted(p for p in glob.glob(os.path.join(path, "*", "scene_camera.json")))
    if scenes:
        return [os.path.dirname(p) for p in scenes]
    splits = sorted(p for p in glob.glob(os.path.join(path, "*")) if os.path.isdir(p)
                    and glob.glob(os.path.join(p, "*", "scene_camera.json")))
    chosen = [s for s in splits if os.path.basename(s).startswith(split)] or splits
    return [os.path.dirname(p) for s in chosen
            for p in sorted(glob.glob(os.path.join(s, "*", "scene_camera.json")))]


def _bop_dataset_root(scene_dir):
    for root in (os.path.dirname(os.path.dirname(scene_dir)), os.path.dirname(scene_dir)):
        if os.path.exists(os.path.join(root, "models", "models_info.json")):
            return root
    raise FileNotFoundError(f"{scene_dir}: models/models_info.json not found in the dataset root "
                            "(two folders up); expected BOP object sizes in mm")


def _bop_names(root, names):
    if names is None:
        path = os.path.join(root, "names.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found; BOP needs an object id -> name map "
                                    "(pass names= or write names.json beside the dataset)")
        names = read_json(path)
    return {int(k): str(v) for k, v in names.items()}


def _bop_frame_file(scene_dir, folder, im_id, exts):
    for ext in exts:
        p = os.path.join(scene_dir, folder, f"{im_id:06d}{ext}")
        if os.path.exists(p):
            return p
    return None


def read_bop(path, names=None, split="train"):
    """BOP scenes -> list[SceneImage]. Keys of the scene JSONs are unpadded ("1"); files are
    000001.png (.jpg in PBR sets). Translations and sizes are mm; the box centre is the model's
    bounding-box centre (models_info min + size/2), not necessarily the model origin."""
    out = []
    for scene in _bop_scene_dirs(path, split):
        root = _bop_dataset_root(scene)
        id2name = _bop_names(root, names)
        info_path = os.path.join(root, "models", "models_info.json")
        models = read_json(info_path)
        cams = read_json(os.path.join(scene, "scene_camera.json"))
        gts = read_json(os.path.join(scene, "scene_gt.json"))
        gt_infos = read_json(os.path.join(scene, "scene_gt_info.json"))
        for key in sorted(gts, key=int):
            out_im = _bop_image(scene, int(key), cams, gts[key], gt_infos.get(key), models, id2name,
                                info_path)
            if out_im.objects:
                out.append(out_im)
    return out


def _bop_image(scene, im_id, cams, gt, gt_info, models, id2name, info_path):
    key = str(im_id)
    cam_file = os.path.join(scene, "scene_camera.json")
    if key not in cams or "cam_K" not in cams[key]:
        raise ValueError(f"{cam_file}: image '{key}' has no 'cam_K'; expected 9 intrinsics values")
    if gt_info is None or len(gt_info) != len(gt):
        raise ValueError(f"{os.path.join(scene, 'scene_gt_info.json')}: image '{key}' needs one "
                         f"entry per scene_gt object ({len(gt)})")
    rgb = _bop_frame_file(scene, "rgb", im_id, (".png", ".jpg"))
    if rgb is None:
        raise FileNotFoundError(f"{scene}/rgb/{im_id:06d}.png (or .jpg): file not found")
    depth = _bop_frame_file(scene, "depth", im_id, (".png", ".tif"))
    K = _finite(cams[key]["cam_K"], f"{cam_file}: '{key}'.cam_K", (3, 3))
    im = SceneImage(rgb, depth, float(cams[key].get("depth_scale", 1.0)) / 1000.0, K, [],
                    os.path.join(scene, "scene_gt.json"))
    for g, info in zip(gt, gt_info):
        oid = int(g["obj_id"])
        if oid not in id2name or str(oid) not in models:
            raise ValueError(f"{im.source}: obj_id {oid} missing from the names map or {info_path}")
        if info.get("visib_fract", 0.0) < BOP_MIN_VISIB or list(info["bbox_visib"]) == [-1] * 4:
            continue
        m = models[str(oid)]
        size = np.array([m["size_x"], m["size_y"], m["size_z"]], dtype=np.float64) / 1000.0
        centre = np.array([m.get("min_x", -m["size_x"] / 2), m.get("min_y", -m["size_y"] / 2),
                           m.get("min_z", -m["size_z"] / 2)]) / 1000.0 + size / 2
        R = _finite(g["cam_R_m2c"], f"{im.source}: '{key}'.cam_R_m2c", (3, 3))
        t = _finite(g["cam_t_m2c"], f"{im.source}: '{key}'.cam_t_m2c", (3,)) / 1000.0 + R @ centre
        x, y, w, h = info["bbox_visib"]
        if _keep(t):
            im.objects.append(Object3D(id2name[oid], t, R, size, np.array([x, y, x + w, y + h], float)))
    return im


# ----------------------------------------------------------------------------- robot sources
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
    laid out [l_xyz, l_quat(wxyz), l_grip, r_xyz, r_quat, r_grip] (needed for trajectory targets)."""
    path: str
    cameras: list
    episodes: list
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
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = opener()
    while len(cache) > size:
        old = cache.popitem(last=False)[1]
        if hasattr(old, "close"):
            old.close()
    return value


def _read_parquet(path, columns=None):
    import pyarrow.parquet as pq
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or foreign files
        raise ValueError(f"{path}: cannot read parquet ({e}); the file may be truncated") from e


def _column(table, key, path, width=None):
    """A numeric (list) column as a float array (N, width) or (N,)."""
    if key not in table.column_names:
        raise ValueError(f"{path}: missing column '{key}'")
    import pyarrow as pa
    col = table.column(key).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        if len(col) and flat.size % len(col):
            raise ValueError(f"{path}: column '{key}' has rows of unequal width")
        arr = flat.reshape(len(col), -1)
    else:
        arr = col.to_numpy(zero_copy_only=False).astype(np.float64)
    if width is not None and (arr.ndim != 2 or arr.shape[1] != width):
        raise ValueError(f"{path}: column '{key}' has width {arr.shape[1:]}; expected {width} "
                         "(meta/info.json features shape)")
    return arr


class LeRobotSource(RobotSource):
    """LeRobot v2.0/v2.1 (one parquet and mp4 per episode) or v3.0 (episodes share files)."""
    VERSIONS = ("v2.0", "v2.1", "v3.0")

    def __init__(self, root):
        self.path = root
        info_path = os.path.join(root, "meta", "info.json")
        self.info = read_json(info_path)
        version = self.info.get("codebase_version")
        if version not in self.VERSIONS:
            raise ValueError(f"{info_path}: codebase_version '{version}' is not supported; "
                             f"expected one of {self.VERSIONS}")
        self.v3, self.fps = version == "v3.0", float(self.info.get("fps", 30))
        feats = self.info.get("features", {})
        for key in ("observation.state", "action"):
            if key not in feats:
                raise ValueError(f"{info_path}: features has no '{key}'")
        self.widths = {k: int(np.prod(feats[k]["shape"])) for k in ("observation.state", "action")}
        self.media = {k[len("observation.images."):]: (k, feats[k]["dtype"]) for k in feats
                      if k.startswith("observation.images.") and feats[k]["dtype"] in ("image", "video")}
        self.cameras = list(self.media)
        self.extra = [k for k in feats if k.startswith(("observation.intrinsics.",
                                                        "observation.extrinsics."))]
        self.depth_keys = {k[len("observation.depth."):]: k for k in feats if k.startswith("observation.depth.")}
        self.episodes = self._load_v3() if self.v3 else self._load_v2()
        self.ee16 = self.widths["action"] == 16 and any("extrinsics" in k for k in self.extra)

    def _episode_arrays(self, table, path, lo, hi):
        st = _column(table, "observation.state", path, self.widths["observation.state"])[lo:hi]
        ac = _column(table, "action", path, self.widths["action"])[lo:hi]
        extra = {k: _column(table, k, path)[lo:hi] for k in self.extra}
        ts = _column(table, "timestamp", path)[lo:hi]
        return st.astype(np.float32), ac.astype(np.float32), extra, ts

    def _load_v2(self):
        path = os.path.join(self.path, "meta", "episodes.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: file not found")
        rows = [json.loads(line) for line in open(path) if line.strip()]
        chunks = int(self.info.get("chunks_size", 1000))
        episodes = []
        for row in sorted(rows, key=lambda r: r["episode_index"]):
            e = int(row["episode_index"])
            path = os.path.join(self.path, self.info["data_path"].format(
                episode_chunk=e // chunks, episode_index=e))
            table = _read_parquet(path, self._numeric_columns())
            st, ac, extra, ts = self._episode_arrays(table, path, 0, table.num_rows)
            videos = {cam: (os.path.join(self.path, self.info["video_path"].format(
                episode_chunk=e // chunks, video_key=key, episode_index=e)), 0.0)
                for cam, (key, dtype) in self.media.items() if dtype == "video"}
            episodes.append(Episode(st, ac, list(row.get("tasks", [])),
                                    dict(file=path, row=0, ts=ts, extra=extra, videos=videos)))
        return episodes

    def _load_v3(self):
        meta = os.path.join(self.path, "meta", "episodes")
        files = sorted(glob.glob(os.path.join(meta, "*", "*.parquet")))
        if not files:
            raise FileNotFoundError(f"{meta}/chunk-*/file-*.parquet: no episodes table found")
        tasks = self._v3_tasks()
        tables, episodes = {}, []
        for f in files:
            t = _read_parquet(f).to_pylist()
            for row in sorted(t, key=lambda r: r["episode_index"]):
                path = os.path.join(self.path, self.info["data_path"].format(
                    chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]))
                if path not in tables:
                    tables[path] = (_read_parquet(path, self._numeric_columns()),)
                    tables[path] += (_column(tables[path][0], "index", path).astype(np.int64),)
                table, index = tables[path]
                lo = int(np.searchsorted(index, row["dataset_from_index"]))
                hi = lo + int(row["dataset_to_index"] - row["dataset_from_index"])
                if hi > len(index) or index[lo] != row["dataset_from_index"]:
                    raise ValueError(f"{path}: rows {row['dataset_from_index']}..{row['dataset_to_index']}"
                                     f" of episode {row['episode_index']} (from {f}) are missing")
                st, ac, extra, ts = self._episode_arrays(table, path, lo, hi)
                videos = {cam: (os.path.join(self.path, self.info["video_path"].format(
                    video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                    file_index=row[f"videos/{key}/file_index"])), float(row[f"videos/{key}/from_timestamp"]))
                    for cam, (key, dtype) in self.media.items() if dtype == "video"}
                names = row.get("tasks") or [tasks.get(int(i), "") for i in
                                             np.unique(_column(table, "task_index", path)[lo:hi])]
                episodes.append(Episode(st, ac, list(names),
                                        dict(file=path, row=lo, ts=ts, extra=extra, videos=videos)))
        return episodes

    def _numeric_columns(self):  # image columns stay on disk until a frame is asked for
        return ["observation.state", "action", "timestamp", "index", "task_index"] + self.extra

    def _v3_tasks(self):
        path = os.path.join(self.path, "meta", "tasks.parquet")
        table = _read_parquet(path)
        names = [c for c in ("task", "__index_level_0__") if c in table.column_names]
        if not names or "task_index" not in table.column_names:
            raise ValueError(f"{path}: expected columns 'task_index' and 'task' (or the index)")
        return dict(zip(table.column("task_index").to_pylist(), table.column(names[0]).to_pylist()))

    def frame(self, ep, t, cam, want_depth=True):
        e = self.episodes[ep].key
        key, dtype = self.media[cam]
        if dtype == "video":
            path, start = e["videos"][cam]
            image = self._video_frame(path, start + float(e["ts"][t]))
        else:
            image = decode_image(self._cell(e["file"], key, e["row"] + t)["bytes"],
                                 f"{e['file']}: row {e['row'] + t} '{key}'")
        depth = None
        if want_depth and cam in self.depth_keys:
            k = self.depth_keys[cam]
            depth = decode_depth_png(self._cell(e["file"], k, e["row"] + t)["bytes"],
                                     f"{e['file']}: row {e['row'] + t} '{k}'", 0.001)
        K = e["extra"].get(f"observation.intrinsics.{cam}")
        T = e["extra"].get(f"observation.extrinsics.{cam}")
        return CameraFrame(image, depth, None if K is None else K[t].reshape(3, 3),
                           None if T is None else T[t].reshape(4, 4))

    def _cell(self, path, key, row):
        """One cell of an image column; the row group is cached (LRU) per worker."""
        import pyarrow.parquet as pq
        pf = _lru(self.handles(), ("pf", path), lambda: pq.ParquetFile(path), 8)
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        g = int(np.searchsorted(starts, row, side="right") - 1)
        try:
            col = _lru(self.handles(), ("rg", path, g, key),
                       lambda: pf.read_row_group(g, columns=[key]).column(0), 16)
        except Exception as e:
            raise ValueError(f"{path}: cannot read column '{key}' row group {g} ({e})") from e
        return col[row - starts[g]].as_py()

    def _video_frame(self, path, ts):
        import av
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: video file not found")
        try:
            container = _lru(self.handles(), ("av", path), lambda: av.open(path), 6)
            stream = container.streams.video[0]
            container.seek(max(0, int(ts / stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is not None and float(frame.pts * stream.time_base) >= ts - 0.5 / self.fps:
                    return frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: cannot decode video at {ts:.3f} s ({e})") from e
        raise ValueError(f"{path}: no frame at timestamp {ts:.3f} s; the video is shorter")



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
    return arr


class RoboTwinSource(RobotSource):
    """RoboTwin HDF5 episodes. Layouts (SPEC 9): 'release' (2.0: /observation, /endpose group),
    'early' (/endpose is one (T,14) euler dataset) and 'current' (state/, action/, vision/).
    State = 16-dim [l_xyz, l_quat, l_grip, r_xyz, r_quat, r_grip] in the world frame; in the older
    layouts action[t] = state[t+1] (the last frame repeats). The endpose point is 0.12 m behind the
    TCP (SPEC 11); it is kept as is so actions stay in RoboTwin's own action space.
    When the release layout has an empty /endpose group, the 14-dim joint vector is used instead."""
    CAMS = {"release": ("head_camera", "left_camera", "right_camera", "front_camera"),
            "current": ("cam_head", "cam_left_wrist", "cam_right_wrist")}

    def __init__(self, path):
        import h5py
        if os.path.isfile(path):
            files, self.path = [path], path
        else:
            files = sorted(glob.glob(os.path.join(path, "data", "episode*.hdf5")) or
                           glob.glob(os.path.join(path, "episode*.hdf5")),
                           key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0))
            self.path = path
        if not files:
            raise FileNotFoundError(f"{path}: no data/episode*.hdf5 files found")
        self.episodes, self.cameras = [], None
        for p in files:
            try:
                with h5py.File(p, "r") as f:
                    ep, cams = self._read_episode(f, p)
            except OSError as e:
                raise ValueError(f"{p}: cannot open HDF5 ({e}); the file may be truncated") from e
            self.cameras = cams if self.cameras is None else [c for c in self.cameras if c in cams]
            self.episodes.append(ep)
        self.ee16 = all(e.key["ee16"] for e in self.episodes)

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

    def _read_episode(self, f, p):
        layout = self.layout(f)
        if layout == "current":
            st = self._arms(f, "state", p)
            ac = self._arms(f, "action", p)
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
            return _instructions(read_json(path))
        return [os.path.basename(os.path.dirname(root)).replace("_", " ")]

    def _file(self, p):
        import h5py
        return _lru(self.handles(), p, lambda: h5py.File(p, "r"), 8)

    def frame(self, ep, t, cam, want_depth=True):
        e = self.episodes[ep].key
        p, f, cur = e["file"], self._file(e["file"]), e["layout"] == "current"
        g = f"vision/{cam}" if cur else f"observation/{cam}"
        rgb, intr, extr, depth_key = (("colors", "intrinsic_matrix", "extrinsics_matrix", "depths") if cur else
                                      ("rgb", "intrinsic_cv", "extrinsic_cv", "depth"))
        image = decode_image(_h5(f, f"{g}/{rgb}", p)[t], f"{p}: '{g}/{rgb}'[{t}]", bgr=True)
        K = _matrix(f, f"{g}/{intr}", t, (3, 3), p)
        if cur:  # camera -> world in OpenGL axes
            ext = _matrix(f, f"{g}/{extr}", t, (4, 4), p) @ GL_TO_CV
        else:  # world -> camera (3, 4), OpenCV axes
            ext = np.linalg.inv(np.vstack([_matrix(f, f"{g}/{extr}", t, (3, 4), p), [0, 0, 0, 1]]))
        depth_key = f"{g}/{depth_key}"
        depth = None
        if want_depth and depth_key in f:
            raw = f[depth_key][t]
            encoded = isinstance(raw, (bytes, np.bytes_)) or np.ndim(raw) == 1  # PNG bytes, else mm array
            depth = (decode_depth_png(raw, f"{p}: '{depth_key}'[{t}]", 0.001) if encoded
                     else np.asarray(raw, np.float32) / 1000.0)
        return CameraFrame(image, depth, K, ext)


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


# ----------------------------------------------------------------------------- detection
def detect_format(path):
    """Name of the format stored at `path`: omni3d, bop, lerobot or robotwin."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: path not found")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return "omni3d"
        if path.endswith((".hdf5", ".h5")):
            return "robotwin"
    elif os.path.exists(os.path.join(path, "meta", "info.json")):
        return "lerobot"
    elif glob.glob(os.path.join(path, "data", "episode*.hdf5")) or glob.glob(os.path.join(path, "episode*.hdf5")):
        return "robotwin"
    elif _bop_scene_dirs(path, ""):
        return "bop"
    elif omni3d_files(path, None):
        return "omni3d"
    raise ValueError(f"{path}: unknown dataset format; supported:\n  " + "\n  ".join(SUPPORTED_FORMATS))


def omni3d_files(path, split):
    """Omni3D JSONs in a folder; with `split`, those whose name contains it if any do."""
    if os.path.isfile(path):
        return [path]
    files = []
    for p in sorted(glob.glob(os.path.join(path, "*.json"))):
        with open(p) as f:
            head = f.read(4096)
        if '"images"' in head or '"annotations"' in head or '"categories"' in head:
            files.append(p)
    named = [p for p in files if split and split in os.path.basename(p)]
    return named or files
