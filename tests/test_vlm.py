"""vlm.py: the tiny VLM's dense vision targets and objective, and the learnability gate.

Catches: patch targets in the wrong (column-major) order or with the farther object winning an
overlap, a dense loss that rewards the wrong words, a recipe that no longer learns to localise
from the image, and the tiny VLM used as the start of a run that asked for something else."""
import json
import os

import numpy as np
import torch
from PIL import Image

import vlm
from data import Collator, GroundingDataset, fit_bins, tensors
from model import build_model
from tokenizer import ObjectPose, PoseTokenizer


def obj(name, box, z):
    return ObjectPose(name, box, np.array([0.0, 0.0, z]), np.full(3, 0.05), np.eye(3))


def test_patch_targets_hand_computed():
    # 28 px image, 14 px patches: centres at 6.5 and 20.5. A far box over the left column and a near
    # box over the top row: the top-left patch belongs to the near one.
    far, near = obj("red cube", (0, 0, 10, 27), 2.0), obj("blue can", (0, 0, 27, 10), 1.0)
    cls, centre, log_depth = vlm.patch_targets([far, near], 28, 14)
    assert cls.tolist() == [2, 2, 1, 0]  # row-major: (0,0) near, (0,1) near, (1,0) far, (1,1) none
    np.testing.assert_allclose(centre[:3], [[13.5 / 28, 5 / 28], [13.5 / 28, 5 / 28], [5 / 28, 13.5 / 28]], atol=1e-6)
    np.testing.assert_allclose(log_depth, [0.0, 0.0, np.log(2.0), 0.0], atol=1e-6)
    assert not centre[3].any()


def test_dense_loss_rewards_the_right_words():
    cfg = vlm.VisionConfig()
    words = torch.zeros(1, 2, 3)
    words[0, 0, [0, 2]] = 1.0                                                    # patch 0: words 0 and 2
    feats = torch.eye(2)[None]                                                   # (1, 2, 2) one-hot patches
    head = torch.nn.Linear(2, 3 + 3, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[[0, 2], 0] = 9.0                                             # patch 0 -> words 0, 2
        head.weight[:3, 1] = -9.0                                                # patch 1 -> no word
    zeros = torch.zeros(1, 2, 2), torch.zeros(1, 2)
    good, recall, false_bg = vlm.dense_loss(head, feats, words, *zeros, cfg)
    assert recall.item() == 1.0 and false_bg.item() == 0.0
    with torch.no_grad():
        head.weight[[0, 2], 0] = -9.0                                            # now wrong on patch 0
    bad, recall, _ = vlm.dense_loss(head, feats, words, *zeros, cfg)
    assert recall.item() == 0.0 and bad.item() > good.item() + 5


# ----------------------------------------------------------------------------- learnability gate
S_GATE = 112


def write_square_scenes(root, n, seed):
    """Omni3D scenes of one red square (14-22 px) at a random place on grey noise, 1 m away."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    K = np.array([[100.0, 0, (S_GATE - 1) / 2], [0, 100.0, (S_GATE - 1) / 2], [0, 0, 1]])
    images, anns = [], []
    for i in range(n):
        img = rng.integers(60, 200, (S_GATE, S_GATE, 1)).repeat(3, 2).astype(np.uint8)
        side = int(rng.integers(14, 23))
        x0, y0 = (int(v) for v in rng.integers(0, S_GATE - side, 2))
        img[y0:y0 + side, x0:x0 + side] = (220, 30, 30)
        Image.fromarray(img).save(os.path.join(root, "images", f"{i:04d}.png"))
        images.append({"id": i, "file_path": f"images/{i:04d}.png", "width": S_GATE, "height": S_GATE, "K": K.tolist()})
        box = [x0 - 0.5, y0 - 0.5, x0 + side - 0.5, y0 + side - 0.5]
        t = [((box[0] + box[2]) / 2 - K[0, 2]) / 100, ((box[1] + box[3]) / 2 - K[1, 2]) / 100, 1.0]
        size = [side / 100, side / 100, 0.01]
        R = np.eye(3)
        c = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * np.array(size) / 2 + t
        anns.append({"id": i, "image_id": i, "category_name": "red square", "valid3D": True,
                     "bbox2D_tight": box, "bbox2D_proj": box, "bbox2D_trunc": box, "center_cam": t,
                     "dimensions": [size[2], size[1], size[0]], "R_cam": R.tolist(), "bbox3D_cam": c.tolist(),
                     "visibility": 1.0, "truncation": 0.0})
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 0, "name": "red square"}]}, f)
    return root


def centre_error(model, tok, pose_tok, ds, collate, n):
    """Greedy 2D boxes on n held-out samples -> per-sample pixel error of the box centre (inf when
    none is decoded), and the truths."""
    ds.set_epoch(0)
    built = [ds.build(i) for i in range(n)]
    batch = collate([{**tensors(v, S_GATE), "prompt": p, "target": ""} for v, p, _ in built])
    errors, truths = [], []
    with torch.no_grad():
        ids = model.eval().generate(batch, max_new_tokens=12)
    for (views, _, _), text in zip(built, tok.batch_decode(ids, skip_special_tokens=True)):
        o = views[0].objects[0]
        truth = np.array([(o.box2d[0] + o.box2d[2]) / 2, (o.box2d[1] + o.box2d[3]) / 2])
        found = [d for d in pose_tok.decode(text, n_views=1).views[0]]
        errors.append(min((np.linalg.norm((d.anchor[:2] + d.anchor[-2:]) / 2 - truth) for d in found), default=np.inf))
        truths.append(truth)
    return np.array(errors), np.array(truths)


def test_learnability_gate(tmp_path):
    """The tiny VLM's recipe learns to *see*: vision tower first (vlm.pretrain_vision), then the
    decoder alone writes 2D boxes by next-token prediction (pretrain.py --stage vlm's two phases),
    on one red square on noise. Its held-out centre error must be at most half the error of always
    answering the median centre: a model that ignores its image cannot get there."""
    torch.manual_seed(0)
    train_dir = write_square_scenes(str(tmp_path / "train"), 96, 0)
    val_dir = write_square_scenes(str(tmp_path / "val"), 24, 1)
    bins = fit_bins([train_dir], n_bins=32)
    model, tok = build_model("tiny", bins, n_views=1)
    vlm.init_loc_embeddings(model, tok)
    pose_tok = PoseTokenizer(bins, S_GATE)
    kw = dict(n_views=1, neg_frac=0.0, targets="boxes")
    train, val = GroundingDataset([train_dir], pose_tok, S_GATE, **kw), GroundingDataset([val_dir], pose_tok, S_GATE, **kw)
    vlm.pretrain_vision(model, train, tok, vlm.VisionConfig(steps=150, batch_size=8, log_every=1000), log=lambda s: None)
    model.vlm.model.vision_tower.requires_grad_(False)
    collate = Collator(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    model.train()
    for step in range(900):  # it starts to localise after 300-600 steps (a sudden drop), then reaches ~5 px
        train.set_epoch(step)
        loss = model(collate([train[int(i)] for i in rng.integers(len(train), size=8)]))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    errors, truths = centre_error(model, tok, pose_tok, val, collate, 24)
    baseline = np.linalg.norm(truths - np.median(truths, 0), axis=1)
    assert np.median(errors) <= 0.5 * np.median(baseline), (np.median(errors), np.median(baseline))


def test_default_init_is_the_tiny_vlm_only_for_tiny_runs_on_builtin_data(monkeypatch, tmp_path):
    import argparse
    monkeypatch.setattr(vlm, "tiny_vlm", lambda cache, d: os.path.join(cache, "tiny_vlm"))
    base = dict(init=None, resume=None, vlm=None, data=None, scratch=False, config=None, cache=str(tmp_path))
    assert vlm.default_init(argparse.Namespace(**base), None) == os.path.join(str(tmp_path), "tiny_vlm")
    assert vlm.default_init(argparse.Namespace(**{**base, "config": "tiny"}), None) is not None
    for key, value in (("init", "ckpt"), ("resume", "run"), ("vlm", "paligemma"), ("data", "my.json"),
                       ("scratch", True), ("config", "paligemma-3b")):
        assert vlm.default_init(argparse.Namespace(**{**base, key: value}), None) is None, key
