"""Everything the project draws, in one place, so training, evaluation and the data CLI share it
and training does not import evaluation.

  - draw_views(): letterboxed views side by side with 2D boxes, projected 3D boxes, object and
    waypoint axes and the target text (`data.py show`, the overlays below);
  - overlay() / stack(): ground truth over prediction for a grounding sample (pretrain.py's
    held-out report, eval_sim.py's grounding overlays);
  - world_to_pixels() / draw_points() / save_gif(): the closed-loop GIFs of eval_sim.py.
"""
import textwrap
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from fusion import box_corners, project
from tokenizer import ObjectPose, quat_to_matrix


def draw_views(views, target, size, text_width=110, names=None):
    """PIL image: the views side by side (2x), 2D boxes (green), projected 3D boxes (yellow),
    object/waypoint axes (x red, y green, z blue), the target text underneath, and with `names`
    each view's name in its corner."""
    z = max(1, 256 // size)
    lines = textwrap.wrap(target or "(no target)", text_width)
    canvas = Image.new("RGB", (max(len(views) * size * z, 6 * text_width), size * z + 12 * len(lines) + 8))
    pen = ImageDraw.Draw(canvas)
    edges = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]
    for i, v in enumerate(views):
        canvas.paste(Image.fromarray(v.lb.image).resize((size * z, size * z)), (i * size * z, 0))
        P = lambda pts: [(float(x) * z + i * size * z, float(y) * z) for x, y in project(v.lb.K, pts)]
        for o in v.objects:
            t = np.asarray(o.t)
            if t[2] <= 0:
                continue
            if isinstance(o, ObjectPose):
                x1, y1, x2, y2 = (float(b) * z for b in o.box2d)
                pen.rectangle([x1 + i * size * z, y1, x2 + i * size * z, y2], outline=(0, 255, 0))
                corners = box_corners(t, o.R, o.size)
                c = P(corners) if np.all(corners[:, 2] > 0) else []
                for a, b in edges if c else []:
                    pen.line([c[a], c[b]], fill=(255, 255, 0))
                axis = 0.5 * float(np.max(o.size))
            else:
                axis = 0.05
            ends = P(np.vstack([t, t + axis * np.asarray(o.R).T]))
            for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 128, 255)]):
                pen.line([ends[0], ends[k + 1]], fill=colour, width=2)
    for i, name in enumerate(names or []):
        pen.text((i * size * z + 4, 4), name, fill=(255, 255, 255))
    for k, line in enumerate(lines):
        pen.text((4, size * z + 4 + 12 * k), line, fill=(255, 255, 255))
    return canvas


def overlay(views, decoded, size, truth_title="ground truth", pred_title="prediction"):
    """GT boxes (top row) and predicted boxes (bottom row) of the same views."""
    pred_views = []
    for v, view in enumerate(views):
        objs = [ObjectPose(d.name, tuple(np.r_[d.anchor[:2], d.anchor[-2:]]), d.t, d.size, quat_to_matrix(d.quat))
                for d in decoded.views[v] if d.size is not None]
        pred_views.append(replace(view, objects=objs))
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
