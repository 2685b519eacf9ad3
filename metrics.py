"""Grounding metrics (method.md §8.1): exact oriented-box IoU, greedy matching, AP over 3D-IoU
thresholds, pose errors, and the 2D anchor-centre measure.

Reading order:
  1. Box: an oriented box in the camera frame (centre t, full extents `size` along its own axes,
     rotation R object -> camera), its corners and its 6 bounding planes.
  2. box_iou(): the *exact* volume of the intersection of two oriented boxes. The intersection of
     two convex polyhedra is convex; its vertices are (a) the corners of each box inside the other,
     (b) the points where an edge of one box crosses a face plane of the other and lies inside both.
     Every face of the intersection lies on one of the 12 box planes, so its area is that of the
     convex polygon formed by the vertices on that plane, and the volume is the cone sum
     V = sum_faces area * distance(interior point, face plane) / 3.
     **[ours]** the released code approximates this with axis-aligned boxes.
  3. match(): greedy one-to-one matching (predictions by descending score, each takes the unmatched
     ground truth of highest IoU at or above the threshold).
  4. average_precision(): COCO-style 101-point interpolated AP at one threshold; evaluate() sweeps
     the thresholds 0.05, 0.10, ..., 0.50 and reports AP, AP@0.25, AP@0.5 and pose errors.
  5. Pose errors of matched pairs: rotation geodesic angle (deg), translation / depth (z) / size
     (mean absolute per axis) errors in cm, and the 5deg-5cm / 10deg-5cm accuracies over all
     ground-truth objects (an unmatched one counts as a miss).
  6. centre_errors() / centre_summary(): the 2D grounding measure (decoded anchor centre vs true 2D
     box centre, by name) that pose tuples and the box-only baseline share.
  7. landings() / landing_summary(): which labelled object a written anchor sits on, the queried
     one or another: it tells a model that finds objects but confuses them from one that finds none.
Object symmetries are not modelled: a rotation error is measured against the one annotated R.
"""
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = tuple(np.round(np.arange(0.05, 0.501, 0.05), 2))  # method.md §8.1: 0.05 .. 0.50
EPS = 1e-9
CENTRE_HIT = 0.1  # 2D grounding: a decoded anchor within 10 % of the image size counts as found


@dataclass
class Box:
    t: np.ndarray        # (3,) centre, metres, camera frame
    size: np.ndarray     # (3,) full extents along the box's own axes, metres
    R: np.ndarray        # (3, 3) box -> camera
    name: str = ""       # category (matching is per category)
    score: float = 1.0   # confidence; predictions are ranked by it (ties keep their order)

    def __post_init__(self):
        self.t, self.size, self.R = (np.asarray(x, np.float64) for x in (self.t, self.size, self.R))
        if self.t.shape != (3,) or self.size.shape != (3,) or self.R.shape != (3, 3):
            raise ValueError(f"Box: expected t (3,), size (3,), R (3, 3); got {self.t.shape}, "
                             f"{self.size.shape}, {self.R.shape}")
        if np.any(self.size < 0) or not np.all(np.isfinite(self.size)):
            raise ValueError(f"Box: size must be finite and non-negative, got {self.size}")

    def corners(self):
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)
        return (signs * self.size / 2) @ self.R.T + self.t                         # (8, 3)

    def planes(self):
        """(6, 3) outward unit normals n and (6,) offsets d: inside is n . x <= d."""
        n = np.concatenate([self.R.T, -self.R.T])                                  # rows: +x, +y, +z, -x, -y, -z
        d = n @ self.t + np.tile(self.size / 2, 2)
        return n, d

    def contains(self, points, tol=1e-9):
        local = np.abs((np.asarray(points) - self.t) @ self.R)                      # (N, 3)
        return np.all(local <= self.size / 2 + tol, axis=-1)

    @property
    def volume(self):
        return float(np.prod(self.size))


# ----------------------------------------------------------------------------- exact IoU
EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]  # corner index bits = axes


def _crossings(a, b):
    """Points where an edge of box `a` crosses a face plane of box `b`."""
    c = a.corners()
    p, q = c[[e[0] for e in EDGES]], c[[e[1] for e in EDGES]]                      # (12, 3) edge ends
    n, d = b.planes()
    sp, sq = p @ n.T - d, q @ n.T - d                                              # (12, 6) signed distances
    cross = (sp * sq) < 0
    f = np.where(cross, sp / np.where(cross, sp - sq, 1.0), 0.0)                   # (12, 6) edge fraction
    pts = p[:, None] + f[..., None] * (q - p)[:, None]                             # (12, 6, 3)
    return pts[cross]


def _polygon_area(points, normal):
    """Area of the convex polygon through `points` (unordered, on a plane with unit `normal`)."""
    centre = points.mean(0)
    u = points[np.argmax(np.linalg.norm(points - centre, axis=1))] - centre
    u /= np.linalg.norm(u)
    w = np.cross(normal, u)
    rel = points - centre
    order = np.argsort(np.arctan2(rel @ w, rel @ u))
    ring = rel[order]
    return 0.5 * abs(float(np.sum(np.cross(ring, np.roll(ring, -1, axis=0)) @ normal)))


def _merge(points, tol):
    """Drop points within `tol` of an earlier one (a corner found both as a corner and a crossing)."""
    kept = [points[0]]
    for p in points[1:]:
        if np.min(np.linalg.norm(np.asarray(kept) - p, axis=1)) > tol:
            kept.append(p)
    return np.asarray(kept)


def intersection_volume(a: Box, b: Box):
    """Exact volume of the intersection of two oriented boxes (m^3)."""
    if np.linalg.norm(a.t - b.t) > (np.linalg.norm(a.size) + np.linalg.norm(b.size)) / 2:
        return 0.0  # bounding spheres apart
    scale = max(a.size.max(), b.size.max(), EPS)
    tol = 1e-9 * scale
    pts = np.concatenate([a.corners()[b.contains(a.corners(), tol)], b.corners()[a.contains(b.corners(), tol)],
                          _crossings(a, b), _crossings(b, a)])
    pts = pts[a.contains(pts, 1e-7 * scale) & b.contains(pts, 1e-7 * scale)]
    if len(pts) < 4:
        return 0.0
    pts = _merge(pts, 1e-7 * scale)
    inside = pts.mean(0)
    na, da = a.planes()
    nb, db = b.planes()
    planes = []
    for n, d in zip(np.concatenate([na, nb]), np.concatenate([da, db])):
        if any(np.dot(n, m) > 1 - 1e-9 and abs(d - e) < 1e-7 * scale for m, e in planes):
            continue  # a face plane shared by both boxes is one face of the intersection
        planes.append((n, d))
    volume = 0.0
    for n, d in planes:
        on = pts[np.abs(pts @ n - d) < 1e-7 * scale]
        if len(on) >= 3:
            volume += _polygon_area(on, n) * (d - inside @ n) / 3
    return max(volume, 0.0)


def box_iou(a: Box, b: Box):
    inter = intersection_volume(a, b)
    union = a.volume + b.volume - inter
    return inter / union if union > EPS ** 3 else 0.0


# ----------------------------------------------------------------------------- matching and AP
def match(preds, gts, threshold):
    """Greedy one-to-one matching within one image. Returns a list over preds of the matched gt
    index or -1; predictions are visited by descending score, names must agree."""
    order = sorted(range(len(preds)), key=lambda i: -preds[i].score)
    taken, out = set(), [-1] * len(preds)
    for i in order:
        ious = [box_iou(preds[i], g) if j not in taken and g.name == preds[i].name else -1.0
                for j, g in enumerate(gts)]
        if ious and max(ious) > 0 and max(ious) >= threshold:
            out[i] = int(np.argmax(ious))
            taken.add(out[i])
    return out


def average_precision(images, threshold):
    """images: list of (preds, gts). COCO-style 101-point interpolated AP at one IoU threshold
    (predictions of all images ranked together by score; ties are one operating point, so with
    the unscored decoder output AP is the interpolated precision at the single recall reached)."""
    scored, n_gt = [], 0
    for preds, gts in images:
        n_gt += len(gts)
        m = match(preds, gts, threshold)
        scored += [(p.score, j >= 0) for p, j in zip(preds, m)]
    if n_gt == 0:
        return float("nan")
    scored.sort(key=lambda s: -s[0])
    tp = np.cumsum([s[1] for s in scored]) if scored else np.zeros(0)
    precision = tp / np.arange(1, len(scored) + 1)
    recall = tp / n_gt
    # equal scores form one operating point (the curve must not depend on their order)
    ends = [i for i in range(len(scored)) if i + 1 == len(scored) or scored[i + 1][0] != scored[i][0]]
    precision, recall = precision[ends], recall[ends]
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    ap = 0.0
    for r in np.linspace(0, 1, 101):
        above = np.flatnonzero(recall >= r - 1e-12)
        ap += envelope[above[0]] if len(above) else 0.0
    return ap / 101


# ----------------------------------------------------------------------------- pose errors
def nearest_pairs(truth, pred):
    """Greedy one-to-one pairs (truth ObjectPose, predicted DecodedTuple) without a threshold: same
    name, nearest translation first come first served (stage 1's monitor: errors of what was found)."""
    pairs, free = [], list(pred)
    for o in truth:
        same = [p for p in free if p.name == o.name and p.t is not None]
        if same:
            best = min(same, key=lambda p: np.linalg.norm(p.t - o.t))
            free.remove(best)
            pairs.append((o, best))
    return pairs


def rotation_error_deg(R1, R2):
    c = (np.trace(np.asarray(R1).T @ np.asarray(R2)) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def pose_errors(pred: Box, gt: Box):
    return {"rot_deg": rotation_error_deg(pred.R, gt.R),
            "trans_cm": 100 * float(np.linalg.norm(pred.t - gt.t)),
            "depth_cm": 100 * float(abs(pred.t[2] - gt.t[2])),
            "size_cm": 100 * float(np.mean(np.abs(pred.size - gt.size)))}


def evaluate(images, thresholds=IOU_THRESHOLDS):
    """All grounding metrics over a list of (preds, gts) per image. Pose errors use the greedy
    matching at IoU > 0; accuracies divide by the number of ground-truth objects."""
    aps = {float(t): average_precision(images, t) for t in thresholds}
    errors, n_gt = [], 0
    for preds, gts in images:
        n_gt += len(gts)
        for p, j in zip(preds, match(preds, gts, 0.0)):
            if j >= 0:
                errors.append(pose_errors(p, gts[j]))
    out = {"n_images": len(images), "n_gt": n_gt, "n_pred": sum(len(p) for p, _ in images),
           "n_matched": len(errors), "AP": float(np.nanmean(list(aps.values()))) if n_gt else float("nan"),
           "AP@0.25": aps.get(0.25, float("nan")), "AP@0.5": aps.get(0.5, float("nan")),
           "AP_per_threshold": aps}
    for key in ("rot_deg", "trans_cm", "depth_cm", "size_cm"):
        out[key] = float(np.mean([e[key] for e in errors])) if errors else float("nan")
    for deg in (5, 10):
        hits = sum(e["rot_deg"] <= deg + 1e-9 and e["trans_cm"] <= 5 + 1e-9 for e in errors)
        out[f"{deg}deg5cm"] = hits / n_gt if n_gt else float("nan")
    return out


def grounding_pairs(decoded, views, scores=None):
    """Per view of a decoded sample: (predicted Boxes, ground-truth Boxes), the input of evaluate.
    scores: per view, one confidence per decoded tuple (eval_sim.scored_decode); without them every
    prediction ranks equally. Tuples without a size (2D boxes only) are not 3D predictions."""
    from tokenizer import quat_to_matrix
    pairs = []
    for v, view in enumerate(views):
        conf = scores[v] if scores is not None else [1.0] * len(decoded.views[v])
        preds = [Box(d.t, d.size, quat_to_matrix(d.quat), d.name, score=c)
                 for d, c in zip(decoded.views[v], conf) if d.size is not None]
        gts = [Box(o.t, o.size, o.R, o.name) for o in view.objects]
        pairs.append((preds, gts))
    return pairs


# ----------------------------------------------------------------------------------------------
# 2D grounding: anchor centres vs true 2D box centres

def centre_errors(decoded, views):
    """Per true object, the pixel distance from its 2D box centre to the nearest same-name decoded
    anchor (a centre, or a 2D box's centre); inf when there is none. The grounding measure that
    pose tuples and the box-only baseline (ablation.py) share."""
    errors = []
    for v, view in enumerate(views):
        for o in view.objects:
            dists = [np.linalg.norm(anchor_centre(d) - box_centre(o.box2d))
                     for d in decoded.views[v] if d.name == o.name]
            errors.append(float(min(dists, default=np.inf)))
    return errors


def box_centre(box):
    """(2,) centre of an x1, y1, x2, y2 box."""
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def anchor_centre(d):
    """(2,) the 2D point a decoded tuple names: its anchor (u, v), or its 2D box's centre."""
    return (np.asarray(d.anchor[:2]) + np.asarray(d.anchor[-2:])) / 2


def centre_summary(errors, size):
    """centre_errors over many views -> median pixel error of the objects found (any same-name
    anchor) and 2D recall (an anchor within CENTRE_HIT of the image size); NaN without objects."""
    errors = np.asarray(errors, np.float64)
    found = errors[np.isfinite(errors)]
    return {"centre_px": float(np.median(found)) if len(found) else float("nan"),
            "recall_2d": float(np.mean(errors < CENTRE_HIT * size)) if len(errors) else float("nan")}


def landings(decoded, views, query, size):
    """Per decoded tuple named `query`: "queried" when its anchor centre is within CENTRE_HIT of the
    image size of a labelled object's 2D box centre and the nearest such object is a `query`,
    "other" when the nearest is another labelled object, "none" when no object is that near.
    views must list every labelled object (data.GroundingDataset.build(..., every_object=True))."""
    out = []
    for v, view in enumerate(views):
        for d in (d for d in decoded.views[v] if d.name == query):
            dists = [np.linalg.norm(anchor_centre(d) - box_centre(o.box2d)) for o in view.objects]
            if not dists or min(dists) > CENTRE_HIT * size:
                out.append("none")
            else:
                out.append("queried" if view.objects[int(np.argmin(dists))].name == query else "other")
    return out


def landing_summary(kinds):
    """landings over many views -> the share of written anchors on the queried object, on another
    labelled object and on none (NaN when nothing was written)."""
    n = len(kinds)
    return {f"landed_{k}": kinds.count(k) / n if n else float("nan") for k in ("queried", "other", "none")}
