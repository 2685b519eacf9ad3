"""Grounding format readers (formats.py): fixtures written in each exact on-disk format, values
read back, and the decoders and format detection formats.py shares with the robot readers.

Catches: Omni3D's [W, H, L] dimensions read in the wrong order, BOP millimetres left unconverted or
its [x, y, w, h] boxes read as corners, the model-box centre offset dropped, OpenCV's BGR JPEGs
decoded with red and blue swapped, an unknown format that does not list the supported ones, and
errors that do not name the file and key.

The fixture writers and image helpers here are also used by test_robot_formats.py, test_data.py
and test_bad_input.py.
"""
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from formats import decode_image, detect_format, read_bop, read_omni3d  # noqa: E402
from tokenizer import euler_to_matrix  # noqa: E402

K0 = np.array([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]])  # 160 x 120 images
W0, H0 = 160, 120


def corners(t, R, size):
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    return (signs * np.asarray(size) / 2) @ np.asarray(R).T + t


def proj_box(K, pts, W, H):
    p = pts @ K.T
    uv = p[:, :2] / p[:, 2:]
    return np.clip(np.r_[uv.min(0), uv.max(0)], 0, [W, H, W, H])


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def cv2_jpeg(rgb):
    """What cv2.imencode('.jpg', rgb) stores: OpenCV reads the array as BGR, so a standard decoder
    returns the channels reversed. Emulated by encoding the channel-swapped array with PIL."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def two_tone(left, right, w=W0, h=H0):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2], img[:, w // 2:] = left, right
    return img


# ----------------------------------------------------------------------------- Omni3D
OMNI_OBJECTS = [  # (image, name, t, euler, size along object x, y, z)
    (0, "red cube", (0.0, 0.0, 1.0), (0.1, 0.2, 0.3), (0.2, 0.2, 0.2)),
    (0, "red cube", (0.35, 0.1, 1.5), (0.0, 0.0, 1.0), (0.15, 0.15, 0.15)),
    (0, "blue_bowl", (-0.3, -0.1, 1.2), (0.0, 0.5, 0.0), (0.3, 0.1, 0.2)),
    (1, "green ball", (0.0, 0.05, 0.8), (0.0, 0.0, 0.0), (0.15, 0.15, 0.15)),
    (1, "far thing", (0.0, 0.0, 12.0), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5)),  # beyond 10 m: filtered
]


def write_omni3d(root, depth_m=1.5):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(2):
        rgb = two_tone((200, 30, 30), (30, 30, 200))
        Image.fromarray(rgb).save(os.path.join(root, "images", f"{i:06d}.png"))
        depth = np.full((H0, W0), int(depth_m * 1000), np.uint16)
        depth[:10, :10] = 0  # invalid pixels
        Image.fromarray(depth).save(os.path.join(root, "images", f"{i:06d}_depth.png"))
        images.append({"id": i, "file_path": f"images/{i:06d}.png", "depth_path": f"images/{i:06d}_depth.png",
                       "width": W0, "height": H0, "K": K0.tolist()})
    for j, (im, name, t, e, size) in enumerate(OMNI_OBJECTS):
        R = euler_to_matrix(e)
        c = corners(np.array(t), R, size)
        box = proj_box(K0, c, W0, H0).tolist()
        tight = [-1, -1, -1, -1] if j == 1 else box  # missing tight box: falls back to proj
        anns.append({"id": j, "image_id": im, "category_name": name, "valid3D": True,
                     "bbox2D_tight": tight, "bbox2D_proj": box, "bbox2D_trunc": box,
                     "center_cam": list(t), "dimensions": [size[2], size[1], size[0]],  # [W, H, L]
                     "R_cam": R.tolist(), "bbox3D_cam": c.tolist(), "visibility": 1.0, "truncation": 0.0})
    anns.append(dict(anns[0], id=99, valid3D=False, category_name="ghost"))
    d = {"images": images, "annotations": anns,
         "categories": [{"id": k, "name": n} for k, n in enumerate(sorted({o[1] for o in OMNI_OBJECTS}))]}
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(d, f)
    return path


def test_omni3d_reads_metres_sizes_and_filters(tmp_path):
    scenes = read_omni3d(write_omni3d(str(tmp_path)))
    assert [len(s.objects) for s in scenes] == [3, 1]  # invalid3D and the 12 m object dropped
    ann = json.load(open(tmp_path / "train.json"))["annotations"]
    for obj, a in zip(scenes[0].objects, ann):
        np.testing.assert_allclose(obj.t, a["center_cam"])
        # size along object axes reproduces the stored corners (Cube R-CNN [W, H, L] convention)
        got = corners(obj.t, obj.R, obj.size)
        np.testing.assert_allclose(np.sort(got, 0), np.sort(np.array(a["bbox3D_cam"]), 0), atol=1e-9)
    np.testing.assert_allclose(scenes[0].objects[1].box2d, ann[1]["bbox2D_proj"])  # tight is -1: proj instead
    np.testing.assert_allclose(scenes[0].K, K0)
    assert scenes[0].depth_path.endswith("000000_depth.png") and scenes[0].depth_scale == 0.001


def test_omni3d_bad_input(tmp_path):
    path = write_omni3d(str(tmp_path))
    d = json.load(open(path))
    nan = json.loads(json.dumps(d))
    nan["annotations"][2]["center_cam"][2] = float("nan")
    json.dump(nan, open(path, "w"))
    with pytest.raises(ValueError, match=r"annotations\[2\].*center_cam.*NaN"):
        read_omni3d(path)
    noK = json.loads(json.dumps(d))
    del noK["images"][1]["K"]
    json.dump(noK, open(path, "w"))
    with pytest.raises(ValueError, match=r"train.json: images\[1\].*missing intrinsics 'K'"):
        read_omni3d(path)
    gone = json.loads(json.dumps(d))
    gone["images"][0]["file_path"] = "images/missing.png"
    json.dump(gone, open(path, "w"))
    with pytest.raises(FileNotFoundError, match="images/missing.png"):
        read_omni3d(path)


# ----------------------------------------------------------------------------- BOP
def write_bop(root, names=True):
    scene = os.path.join(root, "train_pbr", "000000")
    os.makedirs(os.path.join(scene, "rgb"))
    os.makedirs(os.path.join(scene, "depth"))
    os.makedirs(os.path.join(root, "models"))
    models = {"1": {"diameter": 80.0, "min_x": -10.0, "min_y": -20.0, "min_z": -30.0,
                    "size_x": 50.0, "size_y": 40.0, "size_z": 60.0},  # box centre offset (15, 0, 0) mm
              "2": {"diameter": 50.0, "min_x": -20.0, "min_y": -20.0, "min_z": -20.0,
                    "size_x": 40.0, "size_y": 40.0, "size_z": 40.0}}
    json.dump(models, open(os.path.join(root, "models", "models_info.json"), "w"))
    if names:
        json.dump({"1": "power drill", "2": "duck"}, open(os.path.join(root, "names.json"), "w"))
    R = euler_to_matrix([0.2, -0.1, 0.5])
    gt = {"1": [{"obj_id": 1, "cam_R_m2c": R.ravel().tolist(), "cam_t_m2c": [50.0, -20.0, 900.0]},
                {"obj_id": 2, "cam_R_m2c": np.eye(3).ravel().tolist(), "cam_t_m2c": [0.0, 0.0, 700.0]},
                {"obj_id": 2, "cam_R_m2c": np.eye(3).ravel().tolist(), "cam_t_m2c": [5000.0, 0.0, 700.0]}]}
    info = {"1": [{"bbox_obj": [70, 40, 30, 35], "bbox_visib": [72, 42, 25, 30], "visib_fract": 0.9},
                  {"bbox_obj": [60, 50, 20, 20], "bbox_visib": [60, 50, 5, 20], "visib_fract": 0.2},
                  {"bbox_obj": [-1, -1, -1, -1], "bbox_visib": [-1, -1, -1, -1], "visib_fract": 0.0}]}
    cam = {"1": {"cam_K": K0.ravel().tolist(), "depth_scale": 0.1}}
    for name, d in (("scene_gt", gt), ("scene_gt_info", info), ("scene_camera", cam)):
        json.dump(d, open(os.path.join(scene, f"{name}.json"), "w"))
    Image.fromarray(two_tone((200, 30, 30), (30, 30, 200))).save(os.path.join(scene, "rgb", "000001.jpg"))
    Image.fromarray(np.full((H0, W0), 9000, np.uint16)).save(os.path.join(scene, "depth", "000001.png"))
    return root, R


def test_bop_reads_mm_to_m_and_filters(tmp_path):
    root, R = write_bop(str(tmp_path))
    assert detect_format(root) == "bop"
    scenes = read_bop(root)
    assert len(scenes) == 1 and len(scenes[0].objects) == 1  # visib_fract 0.2 and bbox -1 dropped
    o = scenes[0].objects[0]
    assert o.name == "power drill"
    np.testing.assert_allclose(o.size, [0.05, 0.04, 0.06])
    np.testing.assert_allclose(o.t, np.array([0.05, -0.02, 0.9]) + R @ [0.015, 0.0, 0.0])
    np.testing.assert_allclose(o.box2d, [72, 42, 97, 72])  # [x, y, w, h] -> x1 y1 x2 y2
    assert scenes[0].image_path.endswith("rgb/000001.jpg")
    assert scenes[0].depth_scale == pytest.approx(0.1 / 1000)  # raw 9000 -> 0.9 m


def test_bop_bad_input(tmp_path):
    root, _ = write_bop(str(tmp_path), names=False)
    with pytest.raises(FileNotFoundError, match="names.json"):
        read_bop(root)
    assert read_bop(root, names={1: "drill", 2: "duck"})[0].objects[0].name == "drill"
    os.remove(os.path.join(root, "train_pbr", "000000", "scene_gt_info.json"))
    with pytest.raises(FileNotFoundError, match="scene_gt_info.json"):
        read_bop(root, names={1: "drill", 2: "duck"})


def test_pil_swaps_opencv_jpeg_and_reader_fixes_it():
    rgb = two_tone((220, 20, 20), (20, 20, 220), 32, 16)
    naive = decode_image(cv2_jpeg(rgb), "x")
    assert naive[8, 4, 2] > 180 and naive[8, 4, 0] < 60  # PIL alone: red comes back blue
    fixed = decode_image(cv2_jpeg(rgb), "x", bgr=True)
    assert fixed[8, 4, 0] > 180 and fixed[8, 4, 2] < 60


def test_unknown_format_lists_supported(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"(?s)unknown dataset format; supported:.*omni3d.*bop.*lerobot.*robotwin"):
        detect_format(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        detect_format(str(tmp_path / "nowhere"))
