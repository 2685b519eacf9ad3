"""The LeRobot on-disk format (method.md §10.3): its reader `LeRobotSource` and its writer `write_lerobot`.

  - Reader: LeRobot v2.0 / v2.1 (one parquet + mp4 per episode) and v3.0 (episodes share files); images
    as mp4 decoded with PyAV by timestamp, or PNG bytes in the parquet; optional per-camera depth,
    intrinsics and extrinsics columns (the built-in world writes them, method.md §10.3); a dataset
    with its own feature names through a key map (KEY_MAPS: the public LIBERO layout).
  - Writer: `write_lerobot` records episodes (a real simulator's, LIBERO's or the built-in world's) in the
    v2.0 layout the reader reads.
The reader is a `RobotSource` (robot_formats.py, which also opens a dataset by its format: `open_source`).
"""
import glob
import json
import os
from collections import Counter

import numpy as np

from errors import BAD_INPUT, read_file, read_json
from formats import decode_depth_png, decode_image, depth_png, png_bytes, skip_or_raise
from robot_formats import CameraFrame, Episode, RobotSource, _finite_frames, _lru


# ----------------------------------------------------------------------------- reader
def _read_parquet(path, columns=None):
    import pyarrow.parquet as pq
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or foreign files
        raise ValueError(f"{path}: cannot read parquet ({e}); the file may be truncated") from e


def _jsonl(path):
    """JSON lines -> list of objects (blank lines skipped); a bad line is named by its number."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {n}: {e}") from e
    return rows


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


# Feature names of published layouts that differ from LeRobot's own: layout -> {LeRobot name: dataset name}.
# "libero": the public LIBERO conversion (physical-intelligence/libero, LeRobot v2.0, fps 10): top-level
# `image` (agentview) and `wrist_image` (image structs, PNG bytes, 256 x 256 x 3, both rotated 180 degrees as
# LIBERO's evaluators do), `state` (8,: eef position, robosuite axis-angle, two fingers), `actions` (7,).
KEY_MAPS = {"lerobot": {},
            "libero": {"observation.state": "state", "action": "actions", "observation.images.image": "image",
                       "observation.images.wrist_image": "wrist_image"}}


def key_map(keys):
    """A layout name of KEY_MAPS (None: LeRobot's own names) or a {LeRobot name: dataset name} dict."""
    if keys is None or isinstance(keys, dict):
        return dict(keys or {})
    if keys not in KEY_MAPS:
        raise ValueError(f"unknown LeRobot key layout {keys!r}; expected one of {sorted(KEY_MAPS)} or a dict")
    return dict(KEY_MAPS[keys])


class LeRobotSource(RobotSource):
    """LeRobot v2.0/v2.1 (one parquet and mp4 per episode) or v3.0 (episodes share files). `keys`: the
    dataset's own feature names (a KEY_MAPS layout or dict, see key_map); columns are read under them
    and everything else sees LeRobot's names (`observation.state`, `observation.images.<cam>`, ...)."""
    VERSIONS = ("v2.0", "v2.1", "v3.0")

    def __init__(self, root, skip_bad=False, keys=None):
        self.path, self.skip_bad, self.dropped = root, skip_bad, Counter()
        info_path = os.path.join(root, "meta", "info.json")
        self.info = read_json(info_path, "LeRobot meta/info.json (codebase_version, features)")
        version = self.info.get("codebase_version")
        if version not in self.VERSIONS:
            raise ValueError(f"{info_path}: codebase_version '{version}' is not supported; "
                             f"expected one of {self.VERSIONS}")
        self.v3, self.fps = version == "v3.0", float(self.info.get("fps", 30))
        self.keys = key_map(keys)
        named = {v: k for k, v in self.keys.items()}  # dataset name -> LeRobot name
        feats = {named.get(k, k): v for k, v in self.info.get("features", {}).items()}
        for key in ("observation.state", "action"):
            if key not in feats:
                fits = [n for n, m in KEY_MAPS.items() if m and all(v in self.info.get("features", {})
                                                                   for v in m.values())]
                hint = (f"; its names are those of the {fits[0]!r} layout (posttrain.py --robot {fits[0]})"
                        if fits else "")
                raise ValueError(f"{info_path}: features has no '{self.col(key)}'{hint}")
        lacking = [f"features['{k}'].{field}" for k in feats for field in ("dtype", "shape") if field not in feats[k]]
        if lacking:
            raise ValueError(f"{info_path}: missing {lacking[:3]}; expected a dtype and a shape per feature")
        self.widths = {k: int(np.prod(feats[k]["shape"])) for k in ("observation.state", "action")}
        self.media = {k[len("observation.images."):]: (self.col(k), feats[k]["dtype"]) for k in feats
                      if k.startswith("observation.images.") and feats[k]["dtype"] in ("image", "video")}
        paths = (("data_path", "video_path") if any(dtype == "video" for _, dtype in self.media.values())
                 else ("data_path",))
        if any(k not in self.info for k in paths):
            raise ValueError(f"{info_path}: missing {[k for k in paths if k not in self.info]}; expected the file "
                             "name patterns of the frames (and videos)")
        self.cameras = list(self.media)
        self.extra = [k for k in feats if k.startswith(("observation.intrinsics.",
                                                        "observation.extrinsics."))]
        self.depth_keys = {k[len("observation.depth."):]: self.col(k) for k in feats
                           if k.startswith("observation.depth.")}
        self.episodes = self._load_v3() if self.v3 else self._load_v2()
        self.ee16 = self.widths["action"] == 16 and any("extrinsics" in k for k in self.extra)

    def col(self, key):
        """The dataset's column name of the LeRobot feature `key`."""
        return self.keys.get(key, key)

    def _episode_arrays(self, table, path, lo, hi, episode):
        """Per-frame state, action, camera extras and timestamps of one episode, all finite."""
        def col(key, dtype=np.float64):
            name = self.col(key)
            return _finite_frames(_column(table, name, path, self.widths.get(key))[lo:hi], path, name, episode, dtype)
        return (col("observation.state", np.float32), col("action", np.float32), {k: col(k) for k in self.extra},
                col("timestamp"))

    def _load_v2(self):
        path = os.path.join(self.path, "meta", "episodes.jsonl")
        rows = read_file(path, "LeRobot v2 episodes (one JSON object per line)", _jsonl)
        chunks = int(self.info.get("chunks_size", 1000))
        episodes = []
        for row in sorted(rows, key=lambda r: r.get("episode_index", -1)):
            try:
                episodes.append(self._v2_episode(row, chunks, path))
            except BAD_INPUT as e:
                skip_or_raise(e, self.skip_bad, self.dropped, "episode")
        return episodes

    def _v2_episode(self, row, chunks, rows_path):
        if "episode_index" not in row:
            raise ValueError(f"{rows_path}: a row has no 'episode_index'")
        e = int(row["episode_index"])
        path = os.path.join(self.path, self.info["data_path"].format(episode_chunk=e // chunks, episode_index=e))
        table = _read_parquet(path, self._numeric_columns())
        st, ac, extra, ts = self._episode_arrays(table, path, 0, table.num_rows, e)
        videos = {cam: (os.path.join(self.path, self.info["video_path"].format(
            episode_chunk=e // chunks, video_key=key, episode_index=e)), 0.0)
            for cam, (key, dtype) in self.media.items() if dtype == "video"}
        return Episode(st, ac, list(row.get("tasks", [])), dict(file=path, row=0, ts=ts, extra=extra, videos=videos))

    def _load_v3(self):
        meta = os.path.join(self.path, "meta", "episodes")
        files = sorted(glob.glob(os.path.join(meta, "*", "*.parquet")))
        if not files:
            raise FileNotFoundError(f"{meta}/chunk-*/file-*.parquet: no episodes table found")
        tasks = self._v3_tasks()
        tables, episodes = {}, []
        for f in files:
            for row in sorted(_read_parquet(f).to_pylist(), key=lambda r: r.get("episode_index", -1)):
                try:
                    episodes.append(self._v3_episode(row, f, tables, tasks))
                except KeyError as e:
                    skip_or_raise(ValueError(f"{f}: episode row {row.get('episode_index')} has no column {e}"),
                                  self.skip_bad, self.dropped, "episode")
                except BAD_INPUT as e:
                    skip_or_raise(e, self.skip_bad, self.dropped, "episode")
        return episodes

    def _v3_episode(self, row, rows_path, tables, tasks):
        """One episode of a v3.0 dataset from its row of meta/episodes; `tables` caches data files."""
        path = os.path.join(self.path, self.info["data_path"].format(
            chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]))
        if path not in tables:
            table = _read_parquet(path, self._numeric_columns())
            tables[path] = (table, _column(table, "index", path).astype(np.int64))
        table, index = tables[path]
        lo = int(np.searchsorted(index, row["dataset_from_index"]))
        hi = lo + int(row["dataset_to_index"] - row["dataset_from_index"])
        if hi > len(index) or (hi > lo and index[lo] != row["dataset_from_index"]):
            raise ValueError(f"{path}: rows {row['dataset_from_index']}..{row['dataset_to_index']}"
                             f" of episode {row['episode_index']} (from {rows_path}) are missing")
        st, ac, extra, ts = self._episode_arrays(table, path, lo, hi, row["episode_index"])
        videos = {cam: (os.path.join(self.path, self.info["video_path"].format(
            video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
            file_index=row[f"videos/{key}/file_index"])), float(row[f"videos/{key}/from_timestamp"]))
            for cam, (key, dtype) in self.media.items() if dtype == "video"}
        names = row.get("tasks") or [tasks.get(int(i), "") for i in
                                     np.unique(_column(table, "task_index", path)[lo:hi])]
        return Episode(st, ac, list(names), dict(file=path, row=lo, ts=ts, extra=extra, videos=videos))

    def _numeric_columns(self):  # image columns stay on disk until a frame is asked for
        return [self.col(k) for k in ["observation.state", "action", "timestamp", "index", "task_index"] + self.extra]

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
        return CameraFrame(image, depth, *self.camera(ep, t, cam))

    def camera(self, ep, t, cam):
        """(K (3, 3), cam2world (4, 4)) at frame t without decoding the image; None where not recorded."""
        e = self.episodes[ep].key
        K = e["extra"].get(f"observation.intrinsics.{cam}")
        T = e["extra"].get(f"observation.extrinsics.{cam}")
        return None if K is None else K[t].reshape(3, 3), None if T is None else T[t].reshape(4, 4)

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


# ----------------------------------------------------------------------------- writer
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
INDEX_FEATURES = (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                  ("index", "int64"), ("task_index", "int64"))


def write_lerobot(root, episodes, fps, keys=None, robot_type=None, chunks_size=1000):
    """Record episodes as a LeRobot v2.0 dataset that LeRobotSource(root, keys=keys) reads back:
    meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl, meta/stats.json and one parquet per
    episode (data/chunk-XXX/episode_XXXXXX.parquet) holding every frame, images as PNG bytes in
    image structs {bytes, path}. `episodes`: an iterable (written one at a time, so a generator
    keeps one episode in memory) of dicts {"task": str, "frames": iterable of
    {"state": (Ds,), "action": (Da,), "views": {camera: {"rgb": (H, W, 3) uint8, optionally
    "depth": (H, W) metres (16-bit PNG, mm), "K": (3, 3), "cam2world": (4, 4) OpenCV axes}}}}}.
    The first frame fixes the features; `keys` (a KEY_MAPS layout or dict) writes them under a
    dataset's own names (keys="libero": the public LIBERO layout). Returns (episodes, frames)."""
    names = key_map(keys)
    feats, tasks, rows_meta, total, stats = None, {}, [], 0, {}
    for e, episode in enumerate(episodes):
        ti = tasks.setdefault(str(episode["task"]), len(tasks))
        cols, feats = _episode_columns(root, e, episode["frames"], feats, dict(task_index=ti, fps=fps, first=total))
        n = len(cols["action"])
        for k in ("observation.state", "action"):
            stats.setdefault(k, []).append(np.stack(cols[k]))
        _write_episode(os.path.join(root, V2_DATA_PATH.format(episode_chunk=e // chunks_size, episode_index=e)),
                       cols, feats, names)
        rows_meta.append({"episode_index": e, "tasks": [str(episode["task"])], "length": n})
        total += n
    if feats is None:
        raise ValueError(f"{root}: no episodes to write")
    _write_meta(os.path.join(root, "meta"), rows_meta, tasks, stats, names)
    info = {"codebase_version": "v2.0", "robot_type": robot_type, "total_episodes": len(rows_meta),
            "total_frames": total, "total_tasks": len(tasks), "total_videos": 0,
            "total_chunks": (len(rows_meta) - 1) // chunks_size + 1, "chunks_size": chunks_size, "fps": fps,
            "splits": {"train": f"0:{len(rows_meta)}"}, "data_path": V2_DATA_PATH, "video_path": V2_VIDEO_PATH,
            "features": {names.get(k, k): v for k, v in feats.items()}}
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    return len(rows_meta), total


def _episode_columns(root, e, frames, feats, index):
    """({LeRobot name: per-frame values}, features) of episode e; `feats` None: its first frame fixes
    them. `index`: the episode's task_index, the fps and the dataset index of its first frame."""
    cols = {}
    for t, fr in enumerate(frames):
        row = _frame_row(fr, t)
        if feats is None:
            feats = _writer_features(row)
        if set(row) != set(feats) - {k for k, _ in INDEX_FEATURES}:
            raise ValueError(f"{root}: episode {e} frame {t} has features {sorted(row)}; the first frame had "
                             f"{sorted(k for k in feats if k.startswith('observation') or k == 'action')}")
        row.update(timestamp=np.float32(t / index["fps"]), frame_index=t, episode_index=e,
                   index=index["first"] + t, task_index=index["task_index"])
        for k, value in row.items():
            cols.setdefault(k, []).append(value[1] if isinstance(value, tuple) else value)
    if not cols:
        raise ValueError(f"{root}: episode {e} has no frames")
    return cols, feats


def _frame_row(fr, t):
    """One frame's features under LeRobot names; an image is (shape, {bytes, path}), the rest arrays."""
    row = {"observation.state": np.asarray(fr["state"], np.float32),
           "action": np.asarray(fr["action"], np.float32)}
    for cam, v in fr["views"].items():
        rgb = np.asarray(v["rgb"], np.uint8)
        row[f"observation.images.{cam}"] = (rgb.shape, {"bytes": png_bytes(rgb), "path": f"frame_{t:06d}.png"})
        if v.get("depth") is not None:
            row[f"observation.depth.{cam}"] = (np.shape(v["depth"]) + (1,),
                                               {"bytes": depth_png(np.asarray(v["depth"])), "path": None})
        for what, shape in (("K", 9), ("cam2world", 16)):
            if v.get(what) is not None:
                name = "intrinsics" if what == "K" else "extrinsics"
                row[f"observation.{name}.{cam}"] = np.asarray(v[what], np.float32).reshape(shape)
    return row


def _writer_features(row):
    """meta/info.json features of the writer's first row (LeRobot names)."""
    feats = {}
    for k, value in row.items():
        if isinstance(value, tuple):  # (shape, image struct)
            feats[k] = {"dtype": "image", "shape": list(value[0]), "names": ["height", "width", "channel"]}
        else:
            feats[k] = {"dtype": "float32", "shape": [len(value)], "names": None}
    for k, dtype in INDEX_FEATURES:
        feats[k] = {"dtype": dtype, "shape": [1], "names": None}
    return feats


def arrow_schema(feats, names=None):
    """The parquet schema of LeRobot features (both writers: v3.0 demos in sim_export, v2.0 here):
    images as {bytes, path} structs, one-number features as scalars (timestamp float32, indices
    int64), vectors as float32 lists; `names` renames the columns (a KEY_MAPS layout)."""
    import pyarrow as pa
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    names = names or {}
    def arrow_type(f):
        if f["dtype"] == "image":
            return image
        if f["shape"] != [1]:
            return pa.list_(pa.float32())
        return pa.float32() if f["dtype"] == "float32" else pa.int64()
    return pa.schema([(names.get(k, k), arrow_type(f)) for k, f in feats.items()])


def _write_episode(path, cols, feats, names):
    """One episode's parquet, columns under the dataset's names."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = arrow_schema(feats, names)
    table = pa.table({names.get(k, k): pa.array([x.tolist() if np.ndim(x) else x for x in v],
                                                schema.field(names.get(k, k)).type) for k, v in cols.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def _write_meta(meta, rows_meta, tasks, stats, names):
    """meta/episodes.jsonl, meta/tasks.jsonl and meta/stats.json (state and action statistics)."""
    os.makedirs(meta, exist_ok=True)
    for name, rows in (("episodes.jsonl", rows_meta),
                       ("tasks.jsonl", [{"task_index": i, "task": task} for task, i in tasks.items()])):
        with open(os.path.join(meta, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(meta, "stats.json"), "w") as f:
        json.dump({names.get(k, k): {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
                                     "max": a.max(0).tolist()} for k, a in
                   ((k, np.concatenate(v).astype(np.float64)) for k, v in stats.items())}, f)
