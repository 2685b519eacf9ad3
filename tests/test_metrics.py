"""Tests for metrics.py: exact oriented-box IoU against hand-computed cases, matching, AP, errors.

Catches: an axis-aligned approximation of the IoU (the 45-degree and random boxes), a missed
intersection vertex, matching across classes or two predictions on one truth, AP that ignores the
score order, unmatched truths left out of the accuracies, and errors in the wrong units."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import Box, average_precision, box_iou, evaluate, intersection_volume, match  # noqa: E402
from tokenizer import euler_to_matrix  # noqa: E402

I3 = np.eye(3)


def rot(roll=0.0, pitch=0.0, yaw=0.0):
    return euler_to_matrix([roll, pitch, yaw])


def test_identical_boxes_have_iou_one():
    b = Box([0.1, -0.2, 1.5], [0.3, 0.2, 0.1], rot(0.3, -0.2, 1.0))
    assert box_iou(b, b) == pytest.approx(1.0, abs=1e-9)


def test_disjoint_boxes_have_iou_zero():
    assert box_iou(Box([0, 0, 1], [1, 1, 1], I3), Box([1.2, 0, 1], [1, 1, 1], rot(yaw=0.3))) == 0.0


def test_cube_rotated_90_degrees_about_a_symmetric_axis_is_the_same_box():
    a = Box([0, 0, 2], [0.4, 0.4, 0.4], I3)
    for r in (rot(yaw=np.pi / 2), rot(roll=np.pi / 2), rot(pitch=-np.pi / 2)):
        assert box_iou(a, Box([0, 0, 2], [0.4, 0.4, 0.4], r)) == pytest.approx(1.0, abs=1e-9)
    # a 0.2 x 0.4 x 0.4 box rotated 90 degrees about x (its own symmetric axis) also coincides
    b = Box([0, 0, 2], [0.2, 0.4, 0.4], I3)
    assert box_iou(b, Box([0, 0, 2], [0.2, 0.4, 0.4], rot(roll=np.pi / 2))) == pytest.approx(1.0, abs=1e-9)


def test_half_shifted_box_has_iou_one_third():
    # overlap is half of each box: 0.5 / (1 + 1 - 0.5) = 1/3, along any of the box's own axes
    R = rot(0.4, 0.1, -0.7)
    a = Box([0, 0, 1], [1, 2, 3], R)
    for axis in range(3):
        shift = R[:, axis] * [1, 2, 3][axis] / 2
        assert box_iou(a, Box(a.t + shift, a.size, R)) == pytest.approx(1 / 3, abs=1e-9)


def test_45_degree_rotated_square_prism_matches_the_octagon_area():
    # unit square vs the same square turned 45 degrees: the overlap is a regular octagon of area
    # 2 (sqrt 2 - 1); with equal heights IoU = A / (2 - A) = 1 / sqrt 2
    a, b = Box([0, 0, 0], [1, 1, 2], I3), Box([0, 0, 0], [1, 1, 2], rot(yaw=np.pi / 4))
    octagon = 2 * (np.sqrt(2) - 1)
    assert intersection_volume(a, b) == pytest.approx(2 * octagon, rel=1e-7)
    assert box_iou(a, b) == pytest.approx(1 / np.sqrt(2), rel=1e-7)
    # and a prism of half the height inside it: intersection = octagon * 1
    c = Box([0, 0, 0], [1, 1, 1], rot(yaw=np.pi / 4))
    assert intersection_volume(a, c) == pytest.approx(octagon, rel=1e-7)


def test_contained_box_and_monte_carlo_for_random_boxes():
    outer, inner = Box([0, 0, 1], [1, 1, 1], rot(yaw=0.5)), Box([0.05, 0, 1], [0.2, 0.3, 0.1], rot(0.3, 0.2, 0.1))
    assert box_iou(outer, inner) == pytest.approx(inner.volume / outer.volume, rel=1e-9)
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.6, 0.6, (300_000, 3))
    for _ in range(3):
        a = Box(rng.normal(0, 0.05, 3), rng.uniform(0.3, 0.6, 3), rot(*rng.uniform(-3, 3, 3)))
        b = Box(a.t + rng.normal(0, 0.1, 3), rng.uniform(0.3, 0.6, 3), rot(*rng.uniform(-3, 3, 3)))
        mc = (a.contains(pts) & b.contains(pts)).mean() * 1.2 ** 3
        assert intersection_volume(a, b) == pytest.approx(mc, rel=0.03)
        assert intersection_volume(a, b) == pytest.approx(intersection_volume(b, a), rel=1e-9)


def test_greedy_matching_is_one_to_one_and_per_class():
    g = [Box([0, 0, 1], [1, 1, 1], I3, "cube"), Box([3, 0, 1], [1, 1, 1], I3, "cube")]
    p = [Box([0.1, 0, 1], [1, 1, 1], I3, "cube", 0.5), Box([0, 0, 1], [1, 1, 1], I3, "cube", 0.9),
         Box([3, 0, 1], [1, 1, 1], I3, "ball", 1.0)]
    # the higher-scored exact prediction takes gt 0; the shifted one finds nothing left; names must agree
    assert match(p, g, 0.25) == [-1, 0, -1]


def test_average_precision_on_a_toy_set():
    cube = lambda x, score=1.0: Box([x, 0, 1], [1, 1, 1], I3, "cube", score)
    images = [([cube(0, 0.9), cube(10, 0.8)], [cube(0), cube(5)]),   # TP, FP, one gt missed
              ([cube(0, 0.7)], [cube(0)])]                             # TP
    # ranked: TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3; interpolated precision is
    # 1 for recall 0..0.33 (34 points) and 2/3 for 0.34..0.66 (33 points), 0 above
    assert average_precision(images, 0.5) == pytest.approx((34 + 33 * 2 / 3) / 101)
    # without scores the three predictions are one operating point: precision 2/3 up to recall 2/3
    tied = [([cube(0), cube(10)], [cube(0), cube(5)]), ([cube(0)], [cube(0)])]
    assert average_precision(tied, 0.5) == pytest.approx(67 * 2 / 3 / 101)
    assert average_precision(tied[::-1], 0.5) == average_precision(tied, 0.5)
    # a half-shifted prediction (IoU 1/3) is a true positive at 0.25 and a false positive at 0.5
    shifted = [([cube(0.5)], [cube(0)])]
    assert average_precision(shifted, 0.25) == pytest.approx(1.0)
    assert average_precision(shifted, 0.5) == 0.0
    m = evaluate(shifted)
    assert m["AP@0.25"] == pytest.approx(1.0) and m["AP@0.5"] == 0.0
    assert m["AP"] == pytest.approx(6 / 10)  # thresholds 0.05 .. 0.30 of 0.05 .. 0.50


def test_pose_errors_and_accuracies():
    gt = Box([0, 0, 1], [0.1, 0.1, 0.1], I3, "cube")
    near = Box([0.03, 0, 1.04], [0.12, 0.1, 0.1], rot(yaw=np.radians(4)), "cube")   # 5 cm, 4 deg (at the edge)
    far = Box([0.0, 0, 1.06], [0.1, 0.1, 0.1], rot(yaw=np.radians(8)), "cube")      # 6 cm, 8 deg
    m = evaluate([([near], [gt])])
    assert m["trans_cm"] == pytest.approx(5.0, abs=1e-9) and m["depth_cm"] == pytest.approx(4.0)
    assert m["rot_deg"] == pytest.approx(4.0) and m["size_cm"] == pytest.approx(2 / 3)
    assert m["5deg5cm"] == 1.0 and m["10deg5cm"] == 1.0
    m = evaluate([([far], [gt]), ([], [gt])])  # second gt unmatched: counts as a miss
    assert m["n_matched"] == 1 and m["5deg5cm"] == 0.0 and m["10deg5cm"] == 0.0


def test_bad_box_is_rejected():
    with pytest.raises(ValueError, match="size"):
        Box([0, 0, 1], [1, -1, 1], I3)
    with pytest.raises(ValueError, match="R"):
        Box([0, 0, 1], [1, 1, 1], np.eye(2))
