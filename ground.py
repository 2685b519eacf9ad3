"""3D grounding on your own image: a stage-1 checkpoint, one RGB(-D) image and its intrinsics in,
metric object poses in the image's camera frame and an overlay PNG out (method.md §3, §4, §8.1).

    python ground.py --ckpt runs/pretrain_grounding/step_001500 --image rgb.png --K K.json \\
        --names "red cube" "blue mug" [--depth depth.png --depth-scale 0.001] [--out overlay.png]

Reading order:
  1. read_K / read_depth: intrinsics as "fx,fy,cx,cy" or a JSON file ({"fx", "fy", "cx", "cy"} or
     {"K": 3x3}); depth as a 16-bit PNG or .npy, times --depth-scale metres per unit;
  2. prepare(): the image as training's head view (data.GroundingDataset at crop scale 1, the way
     policy.Policy feeds a camera): letterboxed to the model's size with K following it, the ray
     map from that K and the metric depth prior (data.tensors);
  3. ground(): one query per name, `detect the {name}` as stage 1 trains (method.md §3.5), all in
     one greedy generate call; each answer's view-0 tuples decoded and scored as eval_sim does;
  4. detections(): decoded tuples -> Detections in the ORIGINAL image: the 3D pose is already in
     the camera frame (letterboxing changes the pixels, not the camera), the 2D anchor is mapped
     back through the letterbox, and the 3D box is projected with the original K. Tuples that are
     not object tuples (no size) are skipped and counted; malformed text never raises;
  5. main(): prints one line per detection and writes the overlay (draw.draw_image).
"""
import argparse
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from data import View, object_label, source_box, tensors
from draw import draw_image
from errors import at_least, cli, read_file, read_json
from eval_sim import generate_scored
from formats import decode_depth_png, decode_image
from fusion import letterbox, project
from tokenizer import NO_OBJECT, ObjectPose, PoseTokenizer, quat_to_matrix

MAX_NEW_TOKENS = 120  # a few tuples of ~16 tokens in view 0, and the view markers


# ----------------------------------------------------------------------------------------------
# Inputs

def read_K(spec):
    """(3, 3) intrinsics from "fx,fy,cx,cy" or a JSON file holding {"fx", "fy", "cx", "cy"} or {"K": 3x3}."""
    if os.path.exists(spec) or spec.endswith(".json"):
        d = read_json(spec, 'intrinsics: {"fx", "fy", "cx", "cy"} or {"K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]}')
        if isinstance(d, dict) and "K" in d:
            K, where = d["K"], f"{spec}: 'K'"
        elif isinstance(d, dict) and {"fx", "fy", "cx", "cy"} <= set(d):
            K, where = [[d["fx"], 0, d["cx"]], [0, d["fy"], d["cy"]], [0, 0, 1]], spec
        else:
            raise ValueError(f'{spec}: expected a JSON object with "fx", "fy", "cx", "cy" or "K" (3x3)')
    else:
        try:
            fx, fy, cx, cy = (float(x) for x in spec.split(","))
        except ValueError:
            raise ValueError(f"--K {spec!r}: expected fx,fy,cx,cy (four numbers) or a JSON file") from None
        K, where = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], f"--K {spec}"
    try:
        K = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a 3x3 matrix of numbers") from None
    if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"{where}: expected a finite 3x3 K with fx, fy > 0, got {K.tolist()}")
    return K


def read_depth(path, scale, shape):
    """(H, W) float32 metres from a depth PNG or .npy, raw value * scale; scale None: 0.001 for
    integer data (millimetres, method.md §2.4), 1.0 for float .npy (metres)."""
    if path.endswith(".npy"):
        raw = read_file(path, "a depth array (.npy)", np.load)
        raw = raw[..., 0] if raw.ndim == 3 and raw.shape[-1] == 1 else raw
        if raw.dtype.kind not in "uif":
            raise ValueError(f"{path}: depth has dtype {raw.dtype}; expected numbers")
        default = 1.0 if raw.dtype.kind == "f" else 0.001
        depth = raw.astype(np.float32) * np.float32(default if scale is None else scale)
    else:
        depth = decode_depth_png(path, path, 0.001 if scale is None else scale)
    if depth.shape != tuple(shape):
        raise ValueError(f"{path}: depth is {depth.shape}; expected the image's {tuple(shape)}")
    ok = np.isfinite(depth) & (depth > 0)
    median = float(np.median(depth[ok])) if ok.any() else float("nan")
    if not 0.05 <= median <= 50:
        warnings.warn(f"{path}: median valid depth is {median:.4g} m; check --depth-scale (metres per stored unit)")
    return depth


def prepare(rgb, K, size, depth=None, use_rays=True):
    """The image as the model's view 0: (View with the letterboxed image and K, sample arrays of
    data.tensors: images, rays, depth priors and their flags, each with one view)."""
    H, W = rgb.shape[:2]
    view = View(letterbox(rgb, K, size, depth=depth), (0, 0, W, H), [], has_K=use_rays)
    return view, tensors([view], size)


# ----------------------------------------------------------------------------------------------
# Decoded tuples -> poses in the original image

@dataclass
class Detection:
    query: str               # the name asked for
    name: str                # the name the model wrote
    score: float             # mean log-probability of the tuple's tokens
    t: np.ndarray            # (3,) centre, metres, camera frame of the original image
    size: np.ndarray         # (3,) full extents along the object's axes, metres
    R: np.ndarray            # (3, 3) object -> camera
    quat: np.ndarray         # (4,) [qw, qx, qy, qz]
    euler: np.ndarray        # (3,) roll, pitch, yaw, radians (R = Rz Ry Rx, method.md §2.2)
    anchor: np.ndarray       # (2,) the written 2D centre, original pixels (a box anchor: its centre)
    centre_px: np.ndarray | None  # (2,) t projected with the original K; None behind the camera
    box2d: np.ndarray | None      # (4,) x1 y1 x2 y2 original pixels: the written box, or the projected 3D box

    def as_object(self):
        """ObjectPose in the original image, for drawing (box: the 2D box, else the anchor point)."""
        box = self.box2d if self.box2d is not None else np.r_[self.anchor, self.anchor]
        return ObjectPose(self.name, tuple(box), self.t, self.size, self.R)


def detections(tuples, scores, query, view, K, image_shape):
    """(Detections, tuples skipped) for one view's DecodedTuples written in the letterboxed `view`
    of an image of `image_shape` (H, W) with intrinsics K."""
    H, W = image_shape[:2]
    scale, offset = view.lb.scale, np.asarray(view.lb.offset)
    out, skipped = [], 0
    for d, score in zip(tuples, scores):
        if d.size is None:  # a waypoint or 2D-box tuple: not an object pose
            skipped += 1
            continue
        corners = (np.asarray(d.anchor, np.float64).reshape(-1, 2) - offset) / scale  # letterbox -> original
        R = quat_to_matrix(d.quat)
        if len(corners) == 2:  # box anchor (tokenizer anchor="box")
            box = corners.ravel()
        else:
            box = source_box(ObjectPose(d.name, None, d.t, d.size, R), K, W, H)  # projected 3D box, clipped
        centre = project(K, d.t[None])[0] if d.t[2] > 0 else None
        out.append(Detection(query, d.name, float(score), d.t, d.size, R, d.quat, d.euler, corners.mean(0),
                             centre, box))
    return out, skipped


# ----------------------------------------------------------------------------------------------
# The model

def ground(model, tok, pose_tok, arrays, names, max_new_tokens=MAX_NEW_TOKENS, device="cpu"):
    """One query per name on the prepared view (prepare's arrays) -> per name (Decoded with view 0
    only, the scores of its tuples, the generated text)."""
    items = [{**arrays, "prompt": f"detect the {object_label(n)}", "target": ""} for n in names]
    answers = generate_scored(model, tok, pose_tok, items, 1, max_new_tokens, device)
    return [(decoded, scores[0], tok.decode(row, skip_special_tokens=True)) for decoded, scores, row in answers]


def report(names, answers, view, K, image_shape):
    """Print each query's detections in the original camera frame; returns every Detection."""
    v3 = lambda a, f="+.3f": "(" + ", ".join(format(float(x), f) for x in a) + ")"  # noqa: E731
    found = []
    for name, (decoded, scores, text) in zip(names, answers):
        dets, skipped = detections(decoded.views[0], scores, name, view, K, image_shape)
        extra = f", {decoded.n_rejected} malformed fragments rejected" * bool(decoded.n_rejected)
        extra += f", {skipped} non-object tuples skipped" * bool(skipped)
        said = f" (answered {NO_OBJECT})" * bool(decoded.negative[0] and not dets)
        print(f"detect the {object_label(name)}: {len(dets)} found{said}{extra}")
        if not dets and not decoded.negative[0]:
            print(f"  model wrote: {text[:200]!r}")
        for d in dets:
            box = "box px " + (v3(d.box2d, ".1f") if d.box2d is not None else "(behind the camera)")
            centre = "centre px " + (v3(d.centre_px, ".1f") if d.centre_px is not None else "(behind the camera)")
            print(f"  {d.name:<16} xyz m {v3(d.t)}  size m {v3(d.size)}  rpy deg {v3(np.degrees(d.euler), '+.1f')}  "
                  f"quat wxyz {v3(d.quat)}  {centre}  {box}  score {d.score:.2f}")
        found += dets
    return found


# ----------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="3D grounding on one RGB(-D) image with a stage-1 checkpoint: "
                                            "object poses in the image's camera frame (OpenCV axes, metres)")
    p.add_argument("--ckpt", required=True, help="a stage-1 (grounding) checkpoint directory")
    p.add_argument("--image", required=True, help="RGB image (PNG/JPEG)")
    p.add_argument("--K", required=True, help='intrinsics of --image: fx,fy,cx,cy or a JSON file with '
                                              '{"fx", "fy", "cx", "cy"} or {"K": 3x3}')
    p.add_argument("--names", nargs="+", required=True, help="object names to look for, one query each")
    p.add_argument("--depth", default=None, help="metric depth prior: 16-bit PNG or .npy, the image's size")
    p.add_argument("--depth-scale", type=at_least(0, float, strict=True), default=None,
                   help="metres per stored depth unit (default: 0.001 for PNG/integer data, 1 for float .npy)")
    p.add_argument("--no-rays", action="store_true", help="leave the ray-map prior out")
    p.add_argument("--out", default="ground.png", help="overlay PNG: projected 3D boxes and 2D boxes")
    p.add_argument("--max-new-tokens", type=at_least(1), default=MAX_NEW_TOKENS, help="decoding budget per name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from model import load_checkpoint
    rgb = decode_image(args.image, args.image)
    K = read_K(args.K)
    depth = read_depth(args.depth, args.depth_scale, rgb.shape[:2]) if args.depth else None
    names = [object_label(n) for n in args.names]
    for n in names:
        PoseTokenizer._name(n)  # raises on an empty name or one with '<', '>' or ';'
    model, tok, bins = load_checkpoint(args.ckpt, map_location=args.device)
    model.eval().to(args.device)
    size = model.cfg.image_size
    view, arrays = prepare(rgb, K, size, depth, use_rays=not args.no_rays)
    answers = ground(model, tok, PoseTokenizer(bins, size), arrays, names, args.max_new_tokens, args.device)
    found = report(names, answers, view, K, rgb.shape)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    draw_image(rgb, K, [d.as_object() for d in found], f"{os.path.basename(args.image)}: {', '.join(names)}"
               ).save(args.out)
    print(f"wrote {args.out}: projected 3D boxes (yellow), 2D boxes (green), axes (x red, y green, z blue)")
    return found


if __name__ == "__main__":
    cli(main)
