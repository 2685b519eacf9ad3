"""Tests for tokenizer.py: pose text format, round trips, robustness, and the HF tokenizer side.

Catches: a changed Euler order or quaternion layout, bins that decode to an edge instead of the
midpoint, swapped tx/ty or x/y anchors, objects listed far to near, a decoder that raises on
malformed text or miscounts what it rejects, pose tokens that the HF tokenizer splits into pieces,
and names that split differently in the target than in the prompt."""
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer import (N_ROT, ObjectPose, PoseBins, PoseTokenizer, Waypoint, build_tiny_tokenizer,  # noqa: E402
                       euler_to_matrix, extend_tokenizer, matrix_to_euler, matrix_to_quat, pose_tokens,
                       quat_to_matrix)

S = 224


def random_rotations(rng, n):
    q = rng.normal(size=(n, 4))
    return quat_to_matrix(q / np.linalg.norm(q, axis=1, keepdims=True))


def geodesic_deg(Ra, Rb):
    cos = (np.trace(np.swapaxes(Ra, -1, -2) @ Rb, axis1=-2, axis2=-1) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def fitted_bins(rng, n_bins=256, n=4000):
    t = np.stack([rng.normal(0, 0.3, n), rng.normal(0, 0.2, n), rng.gamma(4, 0.3, n) + 0.2], 1)
    s = rng.lognormal(np.log(0.12), 0.5, (n, 3))
    return PoseBins.fit(t, s, n_bins), t, s


def assert_within_half_bin(bins, kind, true, decoded):
    """|decoded - true| <= half the width of the bin `true` falls in (values inside the fitted range)."""
    e, i = getattr(bins, kind), bins.encode(kind, true)
    inside = (true >= e[0]) & (true <= e[-1])
    assert inside.mean() > 0.9
    assert np.all(np.abs(decoded - true)[inside] <= (e[i + 1] - e[i])[inside] / 2 + 1e-12)


@pytest.fixture(scope="module")
def bins():
    return fitted_bins(np.random.default_rng(0))[0]


# ----------------------------------------------------------------------------------------------
# Rotation helpers

def test_rotation_helpers_round_trip_and_gimbal_lock():
    rng = np.random.default_rng(1)
    R = random_rotations(rng, 2000)
    np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(R)), R, atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(matrix_to_quat(R)), R, atol=1e-12)
    # Convention R = Rz(yaw) Ry(pitch) Rx(roll), written out for one case.
    Rz = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])            # yaw +90
    Ry = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0.0]])            # pitch +90
    Rx = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0.0]])            # roll +90
    np.testing.assert_allclose(euler_to_matrix([np.pi / 2] * 3), Rz @ Ry @ Rx, atol=1e-15)
    np.testing.assert_allclose(matrix_to_quat(Rz), [np.sqrt(0.5), 0, 0, np.sqrt(0.5)], atol=1e-15)
    np.testing.assert_allclose(matrix_to_quat(np.diag([1.0, -1, -1])), [0, 1, 0, 0], atol=1e-15)  # 180 deg
    # At and next to gimbal lock the angles are not unique but the matrix must be reproduced.
    e = np.array([[0.3, s * p, -1.2] for s in (1, -1) for p in (np.pi / 2, np.pi / 2 - 1e-7, np.pi / 2 - 1e-10)])
    Rl = euler_to_matrix(e)
    np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(Rl)), Rl, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Bins

def test_bins_fit_edges_duplicates_small_n_and_clamping(tmp_path):
    t = np.zeros((50, 3))
    t[:40, 2] = 1.0                                     # most tz identical -> repeated percentiles
    t[40:, 2] = np.linspace(1.5, 3.0, 10)
    for bins in (PoseBins.fit(t, np.full((50, 3), 0.1), 64), PoseBins.fit(t[:1], None, 16)):
        for kind in PoseBins.KINDS:
            e = getattr(bins, kind)
            assert len(e) == bins.n_bins + 1 and np.all(np.diff(e) > 0)
    bins = PoseBins.fit(t, np.full((50, 3), 0.1), 64)
    assert bins.decode("z", bins.encode("z", 1.0)) == pytest.approx(1.0, abs=1e-8)
    assert bins.encode("z", -5.0) == 0 and bins.encode("z", 99.0) == 63    # clamp to the end bins
    assert bins.decode("xy", 0) == (bins.xy[0] + bins.xy[1]) / 2           # midpoint
    with pytest.raises(ValueError, match="NaN"):
        PoseBins.fit(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        PoseBins.fit(np.zeros((3, 2)))


def test_bins_save_load_identical(tmp_path, bins):
    path = tmp_path / "bins.json"
    bins.save(path)
    again = PoseBins.load(path)
    assert again.n_bins == bins.n_bins == 256
    for kind in PoseBins.KINDS:
        assert getattr(again, kind).tobytes() == getattr(bins, kind).tobytes()   # bit-identical floats
    with pytest.raises(FileNotFoundError, match="missing.json"):
        PoseBins.load(tmp_path / "missing.json")
    json.dump({"xy": [0, 1], "z": [0, 1]}, open(tmp_path / "bad.json", "w"))
    with pytest.raises(ValueError, match="size"):
        PoseBins.load(tmp_path / "bad.json")
    json.dump({"xy": [0, 1], "z": [0, 1], "size": [1, 0]}, open(tmp_path / "bad.json", "w"))
    with pytest.raises(ValueError, match="increasing"):
        PoseBins.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------
# Text format

def test_exact_text_format_both_anchor_modes():
    bins = PoseBins(np.array([-2.0, -1, 0, 1, 2]), np.array([0.0, 1, 2, 3, 4]), np.array([0.0, 0.1, 0.2, 0.3, 0.4]))
    obj = ObjectPose("red  mug", (10, 20, 30, 40), np.array([0.5, -1.5, 2.5]), np.array([0.05, 0.15, 0.35]),
                     euler_to_matrix([0.0, 0.0, math.radians(90.3)]))
    body = "<transXY0002><transXY0000><transZ0002><size0000><size0001><size0003><rot180><rot180><rot270>;"
    center = PoseTokenizer(bins, 100).encode_objects([[obj], []])
    assert center == f"<image0> red mug<loc0204><loc0307>{body}</image0><image1></image1>"
    box = PoseTokenizer(bins, 100, anchor="box").encode_objects([[obj]])
    assert box == f"<image0> red mug<loc0102><loc0204><loc0307><loc0409>{body}</image0>"
    assert PoseTokenizer(bins, 100, anchor="box").decode(box).views[0][0].anchor.shape == (4,)
    # Decoding reads either anchor whatever the writing mode (the <loc> count says which); 3 or 1 <loc>s are garbage.
    for text, n_loc in ((box, 4), (center, 2)):
        (got,) = PoseTokenizer(bins, 100, anchor="center" if n_loc == 4 else "box").decode(text).views[0]
        assert got.anchor.shape == (n_loc,) and np.allclose(got.t, PoseTokenizer(bins, 100).decode(center).views[0][0].t)
    assert np.allclose(PoseTokenizer(bins, 100).decode(box).views[0][0].anchor, obj.box2d, atol=0.1)
    for bad in ("<loc0102><loc0204><loc0307>", "<loc0102>"):
        assert PoseTokenizer(bins, 100).decode(f"<image0> red mug{bad}{body}</image0>").n_rejected == 1
    with pytest.raises(ValueError, match="name"):
        PoseTokenizer(bins, 100).encode_objects([[ObjectPose("a;b", obj.box2d, obj.t, obj.size, obj.R)]])
    # The semantic baseline's text: the same name and box as <loc> tokens, no pose.
    far = ObjectPose("cup", (50, 50, 60, 70), np.array([0.0, 0.0, 3.0]), obj.size, obj.R)
    boxes = PoseTokenizer(bins, 100).encode_boxes([[far, obj]])
    assert boxes == ("<image0> red mug<loc0102><loc0204><loc0307><loc0409>; "
                     "cup<loc0512><loc0512><loc0614><loc0716>;</image0>")
    for anchor in ("center", "box"):
        dec = PoseTokenizer(bins, 100, anchor=anchor).decode(boxes + f"<image1>{body} x<loc0001><loc0002>;</image1>")
        (mug, cup), = dec.views[:1]
        assert (mug.name, cup.name) == ("red mug", "cup") and mug.t is None and mug.size is None and mug.quat is None
        np.testing.assert_allclose(mug.anchor, np.array([102, 204, 307, 409]) * 100 / 1024 + 50 / 1024)
        assert dec.n_rejected == 2  # the pose run without a name, and the 2-loc fragment without a pose


@pytest.mark.parametrize("anchor", ["center", "box"])
def test_object_round_trip_within_half_a_bin(bins, anchor):
    rng = np.random.default_rng(2)
    _, t, s = fitted_bins(rng)                          # fresh samples from the fitted distribution
    R = random_rotations(rng, len(t))
    x1y1 = rng.uniform(0, S - 40, (len(t), 2))
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(2, 40, (len(t), 2))], 1)
    tok = PoseTokenizer(bins, S, anchor=anchor)
    got = []
    for i in range(len(t)):
        dec = tok.decode(tok.encode_objects([[ObjectPose(f"obj {i}", boxes[i], t[i], s[i], R[i])]]))
        assert dec.n_rejected == 0 and len(dec.views) == 1 and len(dec.views[0]) == 1
        got.append(dec.views[0][0])

    dt = np.stack([d.t for d in got])
    assert_within_half_bin(bins, "xy", t[:, :2], dt[:, :2])
    assert_within_half_bin(bins, "z", t[:, 2], dt[:, 2])
    assert_within_half_bin(bins, "size", s, np.stack([d.size for d in got]))
    anchors = np.stack([d.anchor for d in got])
    want = boxes if anchor == "box" else (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.all(np.abs(anchors - want) <= S / 2048 + 1e-9)
    # Rotations: each Euler angle within half a 1-degree bin away from pitch = +-90 deg. The
    # geodesic error is then <= 0.5 deg * sqrt(3 + 2|sin pitch|): <= 1 deg for |pitch| <= 30 deg.
    euler, quat = matrix_to_euler(R), np.stack([d.quat for d in got])
    away = np.abs(euler[:, 1]) < math.radians(89)
    err = np.degrees(np.abs(wrap(np.stack([d.euler for d in got]) - euler)))
    assert np.all(err[away] <= 0.5 + 1e-9)
    geo = geodesic_deg(R, quat_to_matrix(quat))
    assert np.all(geo[np.abs(euler[:, 1]) <= math.radians(30)] <= 1.0)
    assert np.all(geo[away] <= 0.5 * math.sqrt(5) + 1e-6)


def test_near_to_far_ordering_and_negatives(bins):
    rng = np.random.default_rng(3)
    z = rng.permutation(np.linspace(0.4, 3.0, 7))
    objs = [ObjectPose(f"thing {i}", (0, 0, 10, 10), np.array([0.0, 0.0, zi]), np.full(3, 0.1), np.eye(3))
            for i, zi in enumerate(z)]
    tok = PoseTokenizer(bins, S)
    dec = tok.decode(tok.encode_objects([objs, objs[::-1]]))
    order = [f"thing {i}" for i in np.argsort(z)]
    assert [d.name for d in dec.views[0]] == order == [d.name for d in dec.views[1]]
    assert np.all(np.diff([d.t[2] for d in dec.views[0]]) > 0)

    neg = tok.encode_negative("blue bowl", 3)
    assert neg == "".join(f"<image{i}> blue bowl<no_object></image{i}>" for i in range(3))
    dec = tok.decode(neg)
    assert dec.negative == [True] * 3 and dec.views == [[], [], []] and dec.n_rejected == 0
    assert tok.decode(tok.encode_objects([objs[:1], []])).negative == [False, False]


def test_trajectory_encode_decode(bins):
    rng = np.random.default_rng(4)
    names = [f"{arm} arm {k}" for arm in ("left", "right") for k in range(5)]
    wps = [Waypoint(n, rng.uniform(0, S, 2), np.array([rng.normal(0, .2), rng.normal(0, .2), 1 + rng.uniform()]),
                    euler_to_matrix(rng.uniform(-1, 1, 3))) for n in names]
    views = [wps, wps[:5], wps[5:]]                     # head: both arms; wrists: their own arm
    tok = PoseTokenizer(bins, S)                        # trajectory tuples use (u, v) in both modes
    text = tok.encode_trajectory(views)
    assert text.startswith("<image0> left arm 0<loc") and "<size" not in text
    for mode in ("center", "box"):
        dec = PoseTokenizer(bins, S, anchor=mode).decode(text)
        assert dec.n_rejected == 0
        assert [[d.name for d in v] for v in dec.views] == [names, names[:5], names[5:]]
        for d, w in zip(dec.views[0], wps):
            assert d.size is None and d.anchor.shape == (2,)
            assert np.all(np.abs(d.anchor - w.uv) <= S / 2048 + 1e-9)
            assert np.all(np.abs(wrap(d.euler - matrix_to_euler(w.R))) <= math.radians(0.5) + 1e-9)
        dt = np.stack([d.t for d in dec.views[0]])
        gt = np.stack([w.t for w in wps])
        assert_within_half_bin(bins, "xy", gt[:, :2], dt[:, :2])
        assert_within_half_bin(bins, "z", gt[:, 2], dt[:, 2])


# ----------------------------------------------------------------------------------------------
# Malformed text

def valid_scene_text(bins):
    rng = np.random.default_rng(5)
    objs = [ObjectPose(n, (5, 6, 50, 70), rng.normal(0, .2, 3) + [0, 0, 1.5], np.full(3, .1),
                       euler_to_matrix(rng.uniform(-1, 1, 3))) for n in ("red mug", "blue bowl", "green cube")]
    return PoseTokenizer(bins, S).encode_objects([objs, objs[:1], []])


def test_malformed_text_fixed_cases(bins):
    tok = PoseTokenizer(bins, S)
    cases = {  # text -> (tuples per view, n_rejected)
        "": ([], 0),
        "<image0> red mug<loc0001>;</image0>": ([0], 1),
        "garbage; more<image0></image0>": ([0], 2),
        "<image0> a<loc0001><loc0002><transXY9999><transXY0001><transZ0001><size0001><size0001>"
        "<size0001><rot001><rot001><rot001>;</image0>": ([0], 1),             # bin index out of range
        "<image0> a<loc001><loc0002><transXY0001><transXY0001><transZ0001><size0001><size0001>"
        "<size0001><rot001><rot001><rot001>;</image0>": ([0], 1),             # wrong digit count
        "<image0><no_object></image1>": ([0], 2),                            # nameless negative, wrong close
        "<image999> x;</image999>": ([], 2),
    }
    for text, (counts, rejected) in cases.items():
        dec = tok.decode(text)
        assert [len(v) for v in dec.views] == counts and dec.n_rejected == rejected, text
    valid = valid_scene_text(bins)
    dec = tok.decode(valid.replace(";</image0>", "</image0>"))  # last tuple lacks its ';': still parses
    assert [len(v) for v in dec.views] == [3, 1, 0] and dec.n_rejected == 0
    assert tok.decode(None).views == [] and tok.decode(valid, n_views=2).n_rejected == 1  # view 2 dropped
    assert len(tok.decode("<image0></image0>", n_views=3).views) == 3


def test_malformed_text_fuzz_never_raises(bins):
    tok = PoseTokenizer(bins, S)
    valid = valid_scene_text(bins)
    full = tok.decode(valid)
    assert [len(v) for v in full.views] == [3, 1, 0]
    key = lambda d: (d.name, d.anchor.tobytes(), d.t.tobytes(), d.euler.tobytes())
    for cut in range(len(valid)):        # truncation keeps a prefix of each view's tuples
        dec = tok.decode(valid[:cut])
        for v, ref in zip(dec.views, full.views):
            assert [key(d) for d in v] == [key(d) for d in ref[:len(v)]]
    rng = np.random.default_rng(6)
    pieces = ["<", ">", "/", ";", " ", "image", "0", "1", "loc", "transXY", "transZ", "size", "rot",
              "no_object", "<loc0001>", "<rot359>", "<image0>", "</image0>", "red", "\n", "é", "\x00"]
    for _ in range(400):
        garbage = "".join(rng.choice(pieces, rng.integers(0, 60)))
        chars = list(valid)
        for _ in range(rng.integers(1, 8)):              # random deletions / insertions / swaps
            i = int(rng.integers(0, len(chars)))
            op = rng.integers(0, 3)
            if op == 0:
                del chars[i]
            elif op == 1:
                chars.insert(i, str(rng.choice(pieces)))
            else:
                j = int(rng.integers(0, len(chars)))
                chars[i], chars[j] = chars[j], chars[i]
        for text in (garbage, "".join(chars)):
            dec = tok.decode(text)  # the rejection counts are pinned by the fixed cases above
            assert len(dec.views) == len(dec.negative)
            for d in (d for v in dec.views for d in v):  # whatever parses decodes to bin values
                assert d.t.shape == (3,) and d.quat.shape == (4,)
                assert bins.xy[0] <= d.t[:2].min() and d.t[:2].max() <= bins.xy[-1]
                assert bins.z[0] <= d.t[2] <= bins.z[-1] and np.linalg.norm(d.quat) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizers

def test_tiny_tokenizer_and_hf_round_trip(tmp_path, bins):
    from transformers import AutoTokenizer

    build_tiny_tokenizer(tmp_path / "tok")
    assert os.path.isfile(tmp_path / "tok" / "tokenizer.json")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert [hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id] == [0, 1, 2, 3]
    assert 1500 < len(hf) < 5000 and hf.convert_tokens_to_ids("<loc1023>") == len(hf) - 1
    n_new = len(pose_tokens(bins, 3))
    assert n_new == 2 * 3 + 1 + 3 * bins.n_bins + N_ROT
    assert extend_tokenizer(hf, bins, 3) == n_new and extend_tokenizer(hf, bins, 3) == 0

    tok = PoseTokenizer(bins, S)
    rng = np.random.default_rng(7)
    wps = [Waypoint(f"left arm {k}", rng.uniform(0, S, 2), np.array([0.1, -0.1, 1.0 + k / 10]), np.eye(3))
           for k in range(3)]
    targets = [valid_scene_text(bins), tok.encode_negative("red mug", 3), tok.encode_trajectory([wps, wps, []])]
    for text in targets:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert hf.decode(ids) == text
        assert hf.decode(ids + [hf.eos_token_id, hf.pad_token_id], skip_special_tokens=True) == text
        pieces = hf.convert_ids_to_tokens(ids)
        assert all(p in pieces for p in ("<image0>", "</image0>"))   # pose tokens stay single ids
    hf.save_pretrained(tmp_path / "extended")                      # what a checkpoint stores
    again = AutoTokenizer.from_pretrained(tmp_path / "extended")
    assert len(again) == len(hf) and again(targets[0])["input_ids"] == hf(targets[0])["input_ids"]
    # Names split exactly as in the prompt (the reason for the space before every name).
    name_pieces = hf.tokenize(" red mug")
    assert name_pieces == hf.tokenize("detect the red mug")[-2:]
    ids = hf(targets[1], add_special_tokens=False)["input_ids"]
    assert hf.convert_ids_to_tokens(ids)[:4] == ["<image0>"] + name_pieces + ["<no_object>"]
