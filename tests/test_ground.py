"""Tests for ground.py: 3D grounding on a user's own RGB-D image.

A view of the built-in world (sim_export) is cropped to a non-square image, as a user's camera
gives one, and saved the way a user would: rgb.png, depth.png (16-bit mm) or depth.npy (metres),
K.json. The same files, listed in an Omni3D JSON, are what the training dataset reads.

Catches: an image resized instead of letterboxed, K not following the letterbox (ray map), depth
read in the wrong unit, a 2D anchor not mapped back through the letterbox (scale or padding
offset), 3D boxes projected with the letterboxed K instead of the image's own, a flipped axis in
the pose, a K JSON read transposed, and a CLI that crashes on malformed model output.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")
import ground  # noqa: E402
import model as model_mod  # noqa: E402
import sim_export  # noqa: E402
from data import GroundingDataset, ViewConfig, fit_bins  # noqa: E402
from draw import draw_image  # noqa: E402
from fusion import project  # noqa: E402
from metrics import rotation_error_deg  # noqa: E402
from model import build_model, save_checkpoint  # noqa: E402
from tokenizer import N_LOC, PoseTokenizer  # noqa: E402

CROP = (10, 40, 150, 136)  # x0, y0, x1, y1 of the 160 px render: a 140 x 96 image holding every object
SIZE = 112                 # the tiny model's input size


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The user's files (rgb.png, depth.png, depth.npy, K.json) and an Omni3D JSON listing them."""
    root = tmp_path_factory.mktemp("ground")
    doc = json.load(open(sim_export.write_grounding(str(root / "render"), 1, seed=3, image_size=160,
                                                    views_per_scene=1)))
    im = doc["images"][0]
    x0, y0, x1, y1 = CROP
    rgb = np.asarray(Image.open(root / "render" / im["file_path"]))[y0:y1, x0:x1]
    depth_mm = np.asarray(Image.open(root / "render" / im["depth_path"]))[y0:y1, x0:x1]
    K = np.array(im["K"])
    K[:2, 2] -= (x0, y0)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(depth_mm).save(root / "depth.png")
    np.save(root / "depth.npy", depth_mm.astype(np.float32) * np.float32(0.001))  # metres
    np.save(root / "depth_mm.npy", depth_mm)                                       # uint16 millimetres
    np.save(root / "depth_mm_float.npy", depth_mm.astype(np.float32))              # float millimetres
    with open(root / "K.json", "w") as f:
        json.dump({"fx": K[0, 0], "fy": K[1, 1], "cx": K[0, 2], "cy": K[1, 2]}, f)
    truth = []
    for a in doc["annotations"]:
        for key in ("bbox2D_tight", "bbox2D_proj", "bbox2D_trunc"):
            a[key] = (np.array(a[key]) - [x0, y0, x0, y0]).tolist()
        box = np.array(a["bbox2D_tight"])
        assert box.min() >= 0 and box[2] <= x1 - x0 and box[3] <= y1 - y0, "CROP must hold every object"
        W, H, L = a["dimensions"]
        truth.append({"name": a["category_name"], "t": np.array(a["center_cam"]), "R": np.array(a["R_cam"]),
                      "size": np.array([L, H, W]), "box": box})
    im.update(file_path="rgb.png", depth_path="depth.png", width=x1 - x0, height=y1 - y0, K=K.tolist())
    with open(root / "annotations.json", "w") as f:
        json.dump(doc, f)
    assert len(truth) >= 2
    return {"root": root, "rgb": rgb, "K": K, "json": str(root / "annotations.json"), "truth": truth}


@pytest.fixture(scope="module")
def bins(scene):
    return fit_bins(scene["json"], n_bins=64)


def head_dataset(scene, bins):
    """The training dataset's head view at crop scale 1: the whole image, letterboxed."""
    return GroundingDataset(scene["json"], PoseTokenizer(bins, SIZE), SIZE, n_views=1, neg_frac=0.0,
                            views=ViewConfig(head_scale=(1.0, 1.0)))


# ----------------------------------------------------------------------------- inputs
def test_read_K_accepts_the_three_spellings_and_refuses_garbage(scene, tmp_path):
    K = scene["K"]
    assert np.array_equal(ground.read_K(str(scene["root"] / "K.json")), K)
    assert np.array_equal(ground.read_K(",".join(repr(float(x)) for x in K[[0, 1, 0, 1], [0, 1, 2, 2]])), K)
    assert np.array_equal(ground.read_K("100,90,30.5,20"), [[100, 0, 30.5], [0, 90, 20], [0, 0, 1]])
    skewed = K.copy()
    skewed[0, 1], skewed[1, 1] = 1.5, K[1, 1] + 3  # fx != fy and a skew: a transposed read differs
    with open(tmp_path / "K3.json", "w") as f:
        json.dump({"K": skewed.tolist()}, f)
    assert np.array_equal(ground.read_K(str(tmp_path / "K3.json")), skewed)
    for bad in ("1,2,3", "a,b,c,d", "-5,5,1,1"):
        with pytest.raises(ValueError, match="--K"):
            ground.read_K(bad)
    with open(tmp_path / "bad.json", "w") as f:
        json.dump({"focal": 3}, f)
    with pytest.raises(ValueError, match="bad.json"):
        ground.read_K(str(tmp_path / "bad.json"))


def test_prepared_input_equals_the_training_datasets_view(scene, bins):
    """Pixels, ray map and depth prior of the command's input are the training dataset's tensors
    for the same image (its head view at crop scale 1), read from the user's own files."""
    root = scene["root"]
    rgb = ground.decode_image(str(root / "rgb.png"), "rgb.png")
    K = ground.read_K(str(root / "K.json"))
    ds = head_dataset(scene, bins)
    want = ds[0]
    ds_view = ds.build(0)[0][0]
    assert want["images"].shape == (1, 3, SIZE, SIZE)
    for depth_file, scale in (("depth.png", None), ("depth.png", 0.001), ("depth.npy", None), ("depth_mm.npy", None),
                              ("depth_mm_float.npy", 0.001)):
        depth = ground.read_depth(str(root / depth_file), scale, rgb.shape[:2])
        view, got = ground.prepare(rgb, K, SIZE, depth)
        np.testing.assert_allclose(view.lb.K, ds_view.lb.K, rtol=0, atol=1e-12)
        for key in ("images", "view_mask", "rays", "has_rays", "depth", "has_depth"):
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=f"{depth_file}: {key}")
    assert want["has_rays"].all() and want["has_depth"].all()
    assert not want["depth"][0, 1].all(), "a non-square image is padded: the padding has no depth"
    _, no_rays = ground.prepare(rgb, K, SIZE, None, use_rays=False)
    assert not no_rays["has_rays"].any() and not no_rays["has_depth"].any() and not no_rays["rays"].any()
    with pytest.raises(ValueError, match="expected the image's"):
        ground.read_depth(str(root / "depth.png"), None, (rgb.shape[0] + 1, rgb.shape[1]))


# ----------------------------------------------------------------------------- poses
def test_decoded_truth_is_the_truth_pose_in_the_original_image(scene, bins):
    """The dataset's target text for the image (the truth, encoded by the tokenizer), decoded
    through ground.detections, gives each object's metric pose in the original camera frame within
    bin tolerance; its anchor, projected centre and 2D box land on the object in the original
    pixels, and so do the overlay's 3D wireframes."""
    ds = head_dataset(scene, bins)
    pose_tok = PoseTokenizer(bins, SIZE)
    rgb, K = scene["rgb"], scene["K"]
    view, _ = ground.prepare(rgb, K, SIZE)
    assert view.lb.offset[1] > 5, "the crop must be letterboxed with padding for this test to bite"
    dets = []
    for i in range(len(ds)):  # one sample per class, as one query per name
        decoded = pose_tok.decode(ds.build(i)[2], n_views=1)
        found, skipped = ground.detections(decoded.views[0], [0.0] * len(decoded.views[0]), "q", view, K, rgb.shape)
        dets += found
        assert skipped == 0
    assert sorted(d.name for d in dets) == sorted(o["name"] for o in scene["truth"])
    for d in dets:
        (o,) = [o for o in scene["truth"] if o["name"] == d.name]
        for kind, got, true in (("xy", d.t[:2], o["t"][:2]), ("z", d.t[2:], o["t"][2:]), ("size", d.size, o["size"])):
            edges, i = getattr(bins, kind), bins.encode(kind, true)
            assert np.all(np.abs(got - true) <= edges[i + 1] - edges[i] + 1e-9), (d.name, kind, got, true)
        assert rotation_error_deg(d.R, o["R"]) < 1.0
        centre = (o["box"][:2] + o["box"][2:]) / 2
        px = SIZE / N_LOC / view.lb.scale  # one <loc> bin in original pixels
        assert np.all(np.abs(d.anchor - centre) <= px + 1e-6), (d.name, d.anchor, centre)
        x1, y1, x2, y2 = o["box"]
        assert x1 <= d.centre_px[0] <= x2 and y1 <= d.centre_px[1] <= y2, (d.name, d.centre_px, o["box"])
        assert np.linalg.norm(d.centre_px - project(K, o["t"][None])[0]) < 4  # a translation bin: <= 3.4 px here
        b = d.box2d
        inter = max(0, min(b[2], x2) - max(b[0], x1)) * max(0, min(b[3], y2) - max(b[1], y1))
        union = (b[2] - b[0]) * (b[3] - b[1]) + (x2 - x1) * (y2 - y1) - inter
        assert inter / union > 0.4, (d.name, b, o["box"])
    # The overlay: yellow wireframe pixels lie on the objects (their boxes, a few pixels around)
    img = np.asarray(draw_image(rgb, K, [d.as_object() for d in dets]))
    z = img.shape[1] // rgb.shape[1]
    yellow = np.all(img == (255, 255, 0), axis=-1)  # draw_objects' wireframe colour
    near = np.zeros_like(yellow)
    for o in scene["truth"]:
        x1, y1, x2, y2 = (np.array(o["box"]) + [-4, -4, 4, 4]) * z
        near[max(0, int(y1)):int(y2) + 1, max(0, int(x1)):int(x2) + 1] = True
    assert yellow.sum() > 50 and (yellow & near).sum() / yellow.sum() > 0.95


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def ckpt(bins, tmp_path_factory):
    """A tiny randomly initialised stage-1 checkpoint."""
    torch.manual_seed(0)
    model, tok = build_model("tiny", bins)
    path = str(tmp_path_factory.mktemp("ckpt") / "stage1")
    save_checkpoint(path, model, tok, bins)
    return path


def test_cli_runs_end_to_end_with_a_random_checkpoint(scene, ckpt, tmp_path):
    root, out = scene["root"], str(tmp_path / "o" / "overlay.png")
    cmd = [sys.executable, os.path.join(ROOT, "ground.py"), "--ckpt", ckpt, "--image", str(root / "rgb.png"),
           "--depth", str(root / "depth.png"), "--depth-scale", "0.001", "--K", str(root / "K.json"),
           "--names", "green cube", "yellow_cube", "--out", out, "--max-new-tokens", "24", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path),
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "detect the green cube:" in r.stdout and "detect the yellow cube:" in r.stdout, r.stdout
    assert f"wrote {out}" in r.stdout
    H, W = scene["rgb"].shape[:2]
    with Image.open(out) as im:
        assert im.width >= W and im.height >= H
    bad = subprocess.run(cmd[:-6] + ["--K", "1,2,3", "--out", out], capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --K"), bad.stderr


# What the faked model writes per name: one good tuple among malformed ones, <no_object> answers, junk.
GOOD = " green cube<loc0500><loc0400><transXY0030><transXY0031><transZ0032><size0010><size0011><size0012>" \
       "<rot180><rot181><rot182>;"
GARBAGE = {
    "green cube": f"<image0>{GOOD} junk<loc9999>; red<rot999><size0001>; left arm 0<loc0001><loc0002>"
                  "<transXY0001><transXY0002><transZ0003><rot001><rot002><rot003>;;</image0><image7> x;</image3>"
                  "</image0>",
    "yellow cube": "<image0> yellow cube<no_object></image0><image1> yellow cube<no_object></image1>",
    "blue cube": "<<<>>> <image0 ;;; <loc>",
}


def fake_generation(monkeypatch, ckpt, texts):
    """PoseVLA.generate answers texts[name] for each name, in the order of `texts`."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(ckpt, "tokenizer"))

    def fake_generate(self, batch, max_new_tokens=256, return_scores=False):
        rows = [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for text in texts.values()]
        ids = torch.full((len(rows), max(map(len, rows))), tok.eos_token_id)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, torch.full(ids.shape, -0.5)
    monkeypatch.setattr(model_mod.PoseVLA, "generate", fake_generate)


def test_garbage_generation_is_reported_not_raised(scene, ckpt, bins, tmp_path, monkeypatch, capsys):
    """The model writes one good tuple among malformed ones: the good one is printed in the original
    frame and drawn, the rest are counted; a <no_object> answer and a tuple behind the camera do
    not crash the report or the drawing."""
    fake_generation(monkeypatch, ckpt, GARBAGE)
    root, out = scene["root"], str(tmp_path / "g.png")
    found = ground.main(["--ckpt", ckpt, "--image", str(root / "rgb.png"), "--K", str(root / "K.json"),
                         "--names", *GARBAGE, "--out", out, "--device", "cpu"])
    text = capsys.readouterr().out
    assert len(found) == 1 and found[0].name == "green cube" and found[0].query == "green cube"
    lines = text.splitlines()
    head = lines.index(next(s for s in lines if s.startswith("detect the green cube:")))
    assert "1 found" in lines[head] and "malformed fragments rejected" in lines[head] \
        and "1 non-object tuples skipped" in lines[head]
    assert lines[head + 1].split()[:2] == ["green", "cube"]
    assert any(s.startswith("detect the yellow cube: 0 found (answered <no_object>)") for s in lines)
    assert any(s.startswith("detect the blue cube: 0 found") for s in lines)
    # The printed pose is the tuple's, in the original frame: bins' midpoints, the anchor un-letterboxed
    d, view = found[0], ground.prepare(scene["rgb"], scene["K"], SIZE)[0]
    np.testing.assert_allclose(d.t, [bins.decode("xy", 30), bins.decode("xy", 31), bins.decode("z", 32)])
    lb_px = (np.array([500, 400]) + 0.5) / N_LOC * SIZE
    np.testing.assert_allclose(d.anchor, (lb_px - view.lb.offset) / view.lb.scale)
    assert "xyz m (" + ", ".join(f"{x:+.3f}" for x in d.t) + ")" in lines[head + 1]
    # The overlay draws it with the image's own K: its yellow wireframe spans the projected 3D box
    img = np.asarray(Image.open(out).convert("RGB"))
    z = img.shape[1] // scene["rgb"].shape[1]
    v, u = np.nonzero(np.all(img == (255, 255, 0), axis=-1))
    np.testing.assert_allclose([u.min(), v.min(), u.max(), v.max()], d.box2d * z, atol=2 * z)
    check_poses_behind_the_camera(scene, view)


def check_poses_behind_the_camera(scene, view):
    """A pose behind the camera (or straddling it) is still reported, without a projection, and drawn safely."""
    from tokenizer import DecodedTuple
    q = np.array([1.0, 0, 0, 0])
    odd = [DecodedTuple("q", np.array([50.0, 50]), np.array([0.0, 0, -0.5]), np.full(3, 0.1), q, np.zeros(3)),
           DecodedTuple("q", np.array([50.0, 50]), np.array([0.0, 0, 0.02]), np.full(3, 0.3), q, np.zeros(3))]
    dets, skipped = ground.detections(odd, [0.0, 0.0], "q", view, scene["K"], scene["rgb"].shape)
    assert skipped == 0 and dets[0].centre_px is None and dets[0].box2d is None and dets[1].box2d is None
    draw_image(scene["rgb"], scene["K"], [d.as_object() for d in dets])
