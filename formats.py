"""Readers for the grounding dataset formats of pre-training stage 1 (method.md §7.3 and §10.1-10.2).

Each becomes a list of `SceneImage` records (image and depth paths, K, 3D objects in metres):
  - Omni3D JSON (Objectron, ARKitScenes, SUN RGB-D and the built-in tabletop scenes),
  - BOP scene folders (millimetres -> metres, `visib_fract` filter, id-to-name map).
Also here, shared with the robot readers of lerobot.py and robotwin.py: the image/depth decoders with errors
that name the file, `report_dropped` (what a reader left out and why, one warning per dataset or
file), and `detect_format`, which names the format stored at a path (omni3d, bop, lerobot or
robotwin). Every error names the file, the key and what was expected; a unit the format leaves to
the data (BOP's depth_scale) is never assumed. With `skip_bad` an unreadable image or annotation is
left out (warned and counted) instead of stopping the whole dataset; a dataset left without any
usable object is an error either way.
"""
import glob
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from errors import BAD_INPUT, read_json

DEPTH_RANGE = (0.01, 10.0)  # metres; method.md §7.3 filter, applied to object centres
BOP_MIN_VISIB = 0.3  # method.md §7.3: BOP objects need visib_fract >= 0.3
GROUNDING_FORMATS, ROBOT_FORMATS = ("omni3d", "bop"), ("lerobot", "robotwin")  # detect_format's names
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


def png_bytes(array):
    """An (H, W, 3) uint8 or (H, W) uint16 array -> PNG bytes (decode_image / decode_depth_png read them)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def depth_png(depth_m):
    """Metric depth -> 16-bit PNG in millimetres (0 = invalid, saturates at 65.535 m)."""
    return png_bytes(np.round(depth_m * 1000.0).clip(0, 65535).astype(np.uint16))


def report_dropped(where, dropped, kept):
    """One warning for a dataset (or file) listing what its reader left out and why, beside what it
    kept; nothing when nothing was left out. dropped: Counter of reason -> count."""
    if dropped:
        reasons = "; ".join(f"{n} {why}" for why, n in dropped.items())
        warnings.warn(f"{where}: kept {kept}; left out {reasons}")


def scenes_kept(where, scenes, dropped, what, expected, nothing):
    """A grounding reader's last word: `scenes` (SceneImages with objects) after one report_dropped
    warning, or a ValueError naming `where`, the counts per reason (`nothing` when there are none)
    and what a usable `what` needs (`expected`) when no scene is left."""
    if not scenes:
        why = "; ".join(f"{n} {r}" for r, n in dropped.items()) or nothing
        raise ValueError(f"{where}: no usable {what} ({why}); expected {expected}")
    report_dropped(where, dropped, f"{sum(len(im.objects) for im in scenes)} objects in {len(scenes)} images")
    return scenes


def skip_or_raise(err, skip_bad, dropped, what):
    """Under --skip-bad, leave out one unreadable record (`what`: 'image', 'episode', ...) with a
    warning naming it and count it in `dropped`; otherwise raise `err`."""
    if not skip_bad:
        raise err
    warnings.warn(f"--skip-bad: left out one {what}: {err}")
    dropped[f"unreadable {what}s (--skip-bad)"] += 1


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
    depth_scale: float | None  # raw depth value * depth_scale = metres (None without depth)
    K: np.ndarray  # (3, 3)
    objects: list = field(default_factory=list)  # list[Object3D]
    source: str = ""  # annotation file, for error messages

    def load(self):
        """(image (H, W, 3) uint8 RGB, depth (H, W) float32 metres or None)."""
        image = decode_image(self.image_path, self.image_path)
        if self.depth_path is None:
            return image, None
        depth = decode_depth_png(self.depth_path, self.depth_path, self.depth_scale)
        if depth.shape != image.shape[:2]:
            raise ValueError(f"{self.depth_path}: depth is {depth.shape}; expected {image.shape[:2]}")
        return image, depth


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


def read_omni3d(json_path, skip_bad=False):
    """Omni3D JSON -> list[SceneImage]. `dimensions` [W, H, L] follows Cube R-CNN: L along object x,
    H along y, W along z, so size = [L, H, W] (corners = R_cam @ local + center_cam). `depth_path`
    (ours, written by sim_export) is a 16-bit PNG in millimetres, or in `depth_scale` metres per unit.
    Left out, counted and reported once (report_dropped): annotations marked invalid, with a
    non-positive dimension or a centre outside DEPTH_RANGE, and images left without an object; a
    file with no usable object at all is an error."""
    d = read_json(json_path, "an Omni3D JSON (images, annotations, categories)")
    for key in ("images", "annotations"):
        if key not in d:
            raise ValueError(f"{json_path}: missing key '{key}'; expected an Omni3D JSON")
    cats = {c.get("id"): c.get("name") for c in d.get("categories", [])}
    images, root, dropped = {}, None, Counter()
    for i, im in enumerate(d["images"]):
        try:
            scene, root = _omni3d_image(im, f"{json_path}: images[{i}] (id {im.get('id')})", json_path, root)
            images[im["id"]] = scene
        except BAD_INPUT as e:
            skip_or_raise(e, skip_bad, dropped, "image")
    for j, ann in enumerate(d["annotations"]):
        if not ann.get("valid3D", True) or ann.get("behind_camera", False):
            dropped["annotations marked valid3D false or behind_camera"] += 1
            continue
        where = f"{json_path}: annotations[{j}] (id {ann.get('id')})"
        try:
            image_id, obj = _omni3d_object(ann, where, images, cats)
        except BAD_INPUT as e:
            skip_or_raise(e, skip_bad, dropped, "annotation")
            continue
        if np.any(obj.size <= 0):
            dropped["annotations with a dimension <= 0"] += 1
        elif not _keep(obj.t):
            dropped[f"annotations with the centre's depth outside {DEPTH_RANGE[0]}-{DEPTH_RANGE[1]} m"] += 1
        else:
            images[image_id].objects.append(obj)
    kept = [im for im in images.values() if im.objects]
    dropped["images without a usable object"] += len(images) - len(kept)
    return scenes_kept(json_path, kept, +dropped, "3D object",  # +: zero counts out
                       "annotations with valid3D, positive dimensions and a centre depth in "
                       f"{DEPTH_RANGE[0]}-{DEPTH_RANGE[1]} m", "it lists none")


def _omni3d_image(im, where, json_path, root):
    """(SceneImage without objects, the dataset root: `root`, or found from this image's path)."""
    for key in ("id", "file_path"):
        if key not in im:
            raise ValueError(f"{where}: missing key '{key}'")
    if im.get("K") is None or im["K"] == -1:
        raise ValueError(f"{where}: missing intrinsics 'K'; expected a 3x3 matrix")
    K = _finite(im["K"], f"{where}.K", (3, 3))
    scale = _finite(im.get("depth_scale", 0.001), f"{where}.depth_scale", ())
    root = root or _resolve_root(json_path, im["file_path"])
    depth = im.get("depth_path")
    return SceneImage(os.path.join(root, im["file_path"]), os.path.join(root, depth) if depth else None,
                      float(scale), K, [], json_path), root


def _omni3d_object(ann, where, images, cats):
    """(image id, Object3D) of one annotation; its filters are applied by the caller."""
    if ann.get("image_id") not in images:
        raise ValueError(f"{where}: image_id {ann.get('image_id')} not in images[]")
    name = ann.get("category_name") or cats.get(ann.get("category_id"))
    if not name:
        raise ValueError(f"{where}: no category_name and unknown category_id")
    t = _finite(ann.get("center_cam"), f"{where}.center_cam", (3,))
    dims = _finite(ann.get("dimensions"), f"{where}.dimensions", (3,))
    R = _finite(ann.get("R_cam"), f"{where}.R_cam", (3, 3))
    return ann["image_id"], Object3D(str(name), t, R, dims[[2, 1, 0]].copy(), _omni3d_box(ann))


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
        names = read_json(path, "a BOP object id -> name map")
    return {int(k): str(v) for k, v in names.items()}


def _bop_frame_file(scene_dir, folder, im_id, exts):
    for ext in exts:
        p = os.path.join(scene_dir, folder, f"{im_id:06d}{ext}")
        if os.path.exists(p):
            return p
    return None


def read_bop(path, names=None, split="train", skip_bad=False):
    """BOP scenes -> list[SceneImage]. Keys of the scene JSONs are unpadded ("1"); files are
    000001.png (.jpg in PBR sets). Translations and sizes are mm; the box centre is the model's
    bounding-box centre (models_info min + size/2), not necessarily the model origin. Depth needs
    the scene's `depth_scale` (raw value x depth_scale = mm). Left out, counted and reported once
    for the dataset: objects under BOP_MIN_VISIB or without a visible box, centres outside
    DEPTH_RANGE, images left without an object; a dataset with no usable object is an error."""
    out, dropped = [], Counter()
    for scene in _bop_scene_dirs(path, split):
        root = _bop_dataset_root(scene)
        id2name = _bop_names(root, names)
        info_path = os.path.join(root, "models", "models_info.json")
        models = read_json(info_path, "BOP models_info (object sizes in mm)")
        cams = read_json(os.path.join(scene, "scene_camera.json"), "BOP scene_camera (cam_K, depth_scale)")
        gts = read_json(os.path.join(scene, "scene_gt.json"), "BOP scene_gt (object poses)")
        gt_infos = read_json(os.path.join(scene, "scene_gt_info.json"), "BOP scene_gt_info (visibility)")
        for key in sorted(gts, key=int):
            try:
                im = _bop_image(scene, int(key), cams, gts[key], gt_infos.get(key), models, id2name, info_path,
                                dropped)
            except KeyError as e:
                err = ValueError(f"{scene}: image '{key}' lacks key {e} in scene_gt.json, scene_gt_info.json or "
                                 f"{info_path}; expected BOP's fields")
                skip_or_raise(err, skip_bad, dropped, "image")
                continue
            except BAD_INPUT as e:
                skip_or_raise(e, skip_bad, dropped, "image")
                continue
            if im.objects:
                out.append(im)
            else:
                dropped["images without a usable object"] += 1
    return scenes_kept(path, out, dropped, "BOP object", f"objects with visib_fract >= {BOP_MIN_VISIB} and a "
                       f"centre depth in {DEPTH_RANGE[0]}-{DEPTH_RANGE[1]} m", "no annotated image")


def _bop_image(scene, im_id, cams, gt, gt_info, models, id2name, info_path, dropped):
    """One image's SceneImage; the objects its filters leave out are counted in `dropped`."""
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
    if depth is not None and "depth_scale" not in cams[key]:
        raise ValueError(f"{cam_file}: image '{key}' has a depth image but no 'depth_scale'; expected the "
                         "factor that turns its raw values into millimetres")
    K = _finite(cams[key]["cam_K"], f"{cam_file}: '{key}'.cam_K", (3, 3))
    scale = float(_finite(cams[key]["depth_scale"], f"{cam_file}: '{key}'.depth_scale", ())) / 1000.0 if depth else None
    im = SceneImage(rgb, depth, scale, K, [], os.path.join(scene, "scene_gt.json"))
    for g, info in zip(gt, gt_info):
        oid = int(g["obj_id"])
        if oid not in id2name or str(oid) not in models:
            raise ValueError(f"{im.source}: obj_id {oid} missing from the names map or {info_path}")
        if info.get("visib_fract", 0.0) < BOP_MIN_VISIB or list(info["bbox_visib"]) == [-1] * 4:
            dropped[f"objects with visib_fract < {BOP_MIN_VISIB} or no visible box"] += 1
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
        else:
            dropped[f"objects with the centre's depth outside {DEPTH_RANGE[0]}-{DEPTH_RANGE[1]} m"] += 1
    return im


def load_scenes(path, split="train", names=None, skip_bad=False):
    """All SceneImages of a grounding dataset at `path` (format detected; BOP needs `names`).
    skip_bad: leave out unreadable images and annotations (warned, counted) instead of raising."""
    fmt = detect_format(path)
    if fmt == "bop":
        return read_bop(path, names=names, split=split, skip_bad=skip_bad)
    if fmt == "omni3d":
        return [im for f in omni3d_files(path, split) for im in read_omni3d(f, skip_bad)]
    raise ValueError(f"{path}: format '{fmt}' has no 3D object annotations; grounding needs "
                     f"one of {GROUNDING_FORMATS}")


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
