"""Everything the project draws, in one place, so training, evaluation and the data CLI share it
and training does not import evaluation.

  - draw_views(): letterboxed views side by side with 2D boxes, projected 3D boxes, object and
    waypoint axes and the target text (`data.py show`, the overlays below);
  - overlay() / stack(): ground truth over prediction for a grounding sample (pretrain.py's
    held-out report, eval_sim.py's grounding overlays);
  - draw_image(): one image of any size with its own K and objects (ground.py);
  - world_to_pixels() / draw_points() / save_gif(): the closed-loop GIFs of eval_sim.py.
"""
import textwrap
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from fusion import box_corners, project
from metrics import EDGES  # the 12 edges of box_corners' corner order
from tokenizer import ObjectPose, quat_to_matrix


def draw_objects(pen, objects, K, zoom=1, dx=0, labels=False):
    """Onto a PIL ImageDraw: per object seen through intrinsics K, its 2D box (green), its projected
    3D box (yellow) and its axes (x red, y green, z blue; waypoints: axes only), every pixel
    coordinate times `zoom` plus `dx` horizontally; with `labels` each object's name at its box."""
    P = lambda pts: [(float(x) * zoom + dx, float(y) * zoom) for x, y in project(K, pts)]  # noqa: E731
    for o in objects:
        t = np.asarray(o.t)
        if t[2] <= 0:
            continue
        if isinstance(o, ObjectPose):
            x1, y1, x2, y2 = (float(b) * zoom for b in o.box2d)
            pen.rectangle([x1 + dx, y1, x2 + dx, y2], outline=(0, 255, 0))
            if labels:
                pen.text((x1 + dx + 2, y1 + 2), o.name, fill=(255, 255, 255))
            corners = box_corners(t, o.R, o.size)
            c = P(corners) if np.all(corners[:, 2] > 0) else []
            for a, b in EDGES if c else []:
                pen.line([c[a], c[b]], fill=(255, 255, 0))
            axis = 0.5 * float(np.max(o.size))
        else:
            axis = 0.05
        tips = np.vstack([t, t + axis * np.asarray(o.R).T])
        ends = P(tips) if np.all(tips[:, 2] > 0) else []  # an axis reaching behind the camera has no line
        for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 128, 255)] if ends else []):
            pen.line([ends[0], ends[k + 1]], fill=colour, width=2)


def draw_views(views, target, size, text_width=110, names=None):
    """PIL image: the views side by side (2x), their objects (draw_objects), the target text
    underneath, and with `names` each view's name in its corner."""
    z = max(1, 256 // size)
    lines = textwrap.wrap(target or "(no target)", text_width)
    canvas = Image.new("RGB", (max(len(views) * size * z, 6 * text_width), size * z + 12 * len(lines) + 8))
    pen = ImageDraw.Draw(canvas)
    for i, v in enumerate(views):
        canvas.paste(Image.fromarray(v.lb.image).resize((size * z, size * z)), (i * size * z, 0))
        draw_objects(pen, v.objects, v.lb.K, z, i * size * z)
    for i, name in enumerate(names or []):
        pen.text((i * size * z + 4, 4), name, fill=(255, 255, 255))
    for k, line in enumerate(lines):
        pen.text((4, size * z + 4 + 12 * k), line, fill=(255, 255, 255))
    return canvas


def draw_image(rgb, K, objects, text=""):
    """PIL image: one (H, W, 3) uint8 image of any size, seen through its own K, with its objects
    (draw_objects, named at their boxes), enlarged z times so the short side is at least 256 px,
    and `text` underneath, wrapped to the image's width (ground.py's overlay of a user's image)."""
    H, W = rgb.shape[:2]
    z = max(1, -(-256 // min(H, W)))
    lines = textwrap.wrap(text, max(10, W * z // 6)) if text else []
    canvas = Image.new("RGB", (W * z, H * z + (12 * len(lines) + 8 if lines else 0)))
    canvas.paste(Image.fromarray(rgb).resize((W * z, H * z), Image.NEAREST), (0, 0))
    pen = ImageDraw.Draw(canvas)
    draw_objects(pen, objects, K, z, labels=True)
    for k, line in enumerate(lines):
        pen.text((4, H * z + 4 + 12 * k), line, fill=(255, 255, 255))
    return canvas


def decoded_objects(tuples):
    """DecodedTuples with a size -> ObjectPoses to draw, the anchor as the 2D box (a centre anchor
    draws as a point)."""
    return [ObjectPose(d.name, tuple(np.r_[d.anchor[:2], d.anchor[-2:]]), d.t, d.size, quat_to_matrix(d.quat))
            for d in tuples if d.size is not None]


def overlay(views, decoded, size, truth_title="ground truth", pred_title="prediction"):
    """GT boxes (top row) and predicted boxes (bottom row) of the same views."""
    pred_views = [replace(view, objects=decoded_objects(decoded.views[v])) for v, view in enumerate(views)]
    return stack([draw_views(views, truth_title, size), draw_views(pred_views, pred_title, size)])


def stack(images):
    """PIL images one under the other, left-aligned."""
    canvas = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)))
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height
    return canvas


def world_to_pixels(points, K, cam2world):
    """(N, 3) world points -> (N, 2) pixels and (N,) in-front mask."""
    pc = (np.asarray(points) - cam2world[:3, 3]) @ cam2world[:3, :3]            # (N, 3) camera frame
    uv = pc @ np.asarray(K).T
    return uv[:, :2] / np.maximum(uv[:, 2:3], 1e-9), pc[:, 2] > 1e-6


def draw_points(rgb, marks, zoom=3):
    """Upscaled frame with marks = list of ((u, v), colour) drawn as dots."""
    img = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.NEAREST)
    pen = ImageDraw.Draw(img)
    for (u, v), colour in marks:
        x, y = (u + 0.5) * zoom, (v + 0.5) * zoom
        pen.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
    return img


def save_gif(frames, path, hz):
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / hz), loop=0)
