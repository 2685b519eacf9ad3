"""vlm.py: the tiny VLM's dense vision targets and objective, and the learnability gate.

Catches: patch targets in the wrong (column-major) order or with the farther object winning an
overlap, a dense loss that rewards the wrong words, a recipe that no longer learns to localise
from the image, and the tiny VLM used as the start of a run that asked for something else."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from data import Collator, GroundingDataset, fit_bins, tensors
from model import build_model
from test_model import tiny_bins
from tokenizer import ObjectPose, PoseTokenizer


def obj(name, box, z):
    return ObjectPose(name, box, np.array([0.0, 0.0, z]), np.full(3, 0.05), np.eye(3))


def test_patch_targets_hand_computed():
    # 28 px image, 14 px patches: centres at 6.5 and 20.5. A far box over the left column and a near
    # box over the top row: the top-left patch belongs to the near one.
    far, near = obj("red cube", (0, 0, 10, 27), 2.0), obj("blue can", (0, 0, 27, 10), 1.0)
    cls, box = vlm.patch_targets([far, near], 28, 14)
    assert cls.tolist() == [2, 2, 1, 0]  # row-major: (0,0) near, (0,1) near, (1,0) far, (1,1) none
    np.testing.assert_allclose(box[:3], [[0, 0, 27 / 28, 10 / 28]] * 2 + [[0, 0, 10 / 28, 27 / 28]], atol=1e-6)
    assert not box[3].any()


def test_loc_rows_read_a_coordinate_from_any_slot():
    """A hidden state holding loc_code(x) in one slot (zeros elsewhere) scores the <loc> rows with
    its maximum at x's bin, whichever slot: the decoder writes a coordinate by copying one slot."""
    from tokenizer import N_LOC, loc_tokens
    bins = tiny_bins()
    model, tok = build_model("tiny", bins)
    vlm.init_loc_embeddings(model, tok)
    rows = model.vlm.get_input_embeddings().weight[tok.convert_tokens_to_ids(loc_tokens())].detach()
    W = rows.shape[1]
    for x in (0.1, 0.37, 0.8):
        for slot in range(vlm.LOC_SLOTS):
            h = torch.zeros(W)
            h.view(vlm.LOC_SLOTS, -1)[slot] = vlm.loc_code(torch.tensor(x), W)
            assert abs(int((rows @ h).argmax()) - x * (N_LOC - 1)) <= 2, (x, slot)


def test_patch_tokens_decode_back_to_their_objects():
    """The target tokens themselves read back as their own names and box centres (token_metrics);
    the same tokens scored against boxes swapped between the two objects do not. (The name part adds
    a little noise to the slots: a few pixels at 112 px.)"""
    torch.manual_seed(0)
    bins = tiny_bins()
    model, tok = build_model("tiny", bins)
    vlm.init_loc_embeddings(model, tok)
    words = sorted({i for n in ("red cube", "blue can") for i in tok(" " + n, add_special_tokens=False)["input_ids"]})
    word_ids, index = torch.tensor(words), {w: k for k, w in enumerate(words)}
    objects = [obj("red cube", (2, 30, 40, 60), 1.0), obj("blue can", (60, 10, 100, 50), 1.0)]
    cls, box = vlm.patch_targets(objects, 112, 14)
    bags = np.zeros((3, len(words)), np.float32)
    for k, o in enumerate(objects):
        bags[k + 1, [index[w] for w in tok(" " + o.name, add_special_tokens=False)["input_ids"]]] = 1.0
    w, b = torch.from_numpy(bags[cls])[None], torch.from_numpy(box)[None]      # (1, 64, nW), (1, 64, 4)
    no_object = tok.convert_tokens_to_ids("<no_object>")
    target = vlm.patch_tokens(model, word_ids, w, b, no_object)
    name_acc, centre_err = vlm.token_metrics(model, target, w, b, word_ids)
    assert name_acc == 1.0 and centre_err < 0.04, (name_acc, centre_err)
    swapped = torch.from_numpy(np.stack([np.zeros(4), box[cls == 2][0],
                                         box[cls == 1][0]])[cls].astype(np.float32))[None]
    assert vlm.token_metrics(model, target, w, swapped, word_ids)[1] > 0.3
    background = target[0, torch.from_numpy(cls == 0)]
    row = model.vlm.get_input_embeddings().weight[no_object].detach()
    assert torch.allclose(torch.nn.functional.cosine_similarity(background, row[None]),
                          torch.ones(len(background)), atol=1e-5)


def test_token_loss_wants_direction_norm_and_slots():
    cfg = vlm.VisionConfig()
    words = torch.tensor([[[1.0], [0.0]]])                                       # patch 0 object, 1 background
    box = torch.tensor([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.0, 0.0]]])
    code = vlm.loc_code(box[0, 0], 64).flatten()                                 # (64,): the four slots
    target = torch.stack([code, torch.ones(64)])[None]                         # (1, 2, 64)
    right = vlm.token_loss(target, target, words, box, cfg)
    assert vlm.token_loss(target / 3, target, words, box, cfg) > right + 0.5  # too small a token
    shifted = target.clone()
    shifted[0, 0] = vlm.loc_code(box[0, 0] + 0.2, 64).flatten()                  # every coordinate 20 % off
    assert vlm.token_loss(shifted, target, words, box, cfg) > right + 2
    wrong_bg = torch.stack([code, -torch.ones(64)])[None]                      # background reversed
    assert right < vlm.token_loss(wrong_bg, target, words, box, cfg) < vlm.token_loss(shifted, target, words, box, cfg)


def test_teacher_tokens_replace_only_the_marked_samples_and_match_their_views(tmp_path):
    """vlm.Teacher's items are its ground's own (negatives too) plus tokens that are the patch_tokens
    of the very crops the sample shows, and model.embed_views puts them in place of the tower's
    tokens for the marked samples only."""
    torch.manual_seed(0)
    root = write_square_scenes(str(tmp_path / "sq"), 4, 0)
    bins = fit_bins([root], n_bins=32)
    model, tok = build_model("tiny", bins, n_views=2)
    ground = GroundingDataset([root], PoseTokenizer(bins, S_GATE), S_GATE, n_views=2, neg_frac=0.0, targets="boxes")
    teach = pickle.loads(pickle.dumps(vlm.Teacher(ground, model, tok)))    # as DataLoader workers get it
    item = teach[(3, 5)]                                                       # epoch 3, sample 5
    ground.set_epoch(3)
    _, words, box = vlm.VisionTargets(ground, 14, tok)[5]
    want = vlm.patch_tokens(model, torch.tensor(teach.targets.words), words, box,
                            tok.convert_tokens_to_ids("<no_object>"))
    assert torch.allclose(torch.from_numpy(item["teacher_tokens"]), want, atol=1e-5)
    assert item["teacher_tokens"].shape == (2, 64, model.lm.config.hidden_size)
    ruby = write_square_scenes(str(tmp_path / "ruby"), 2, 1, squares={"ruby": SQUARES["red square"]})
    negatives = GroundingDataset([ruby, root], PoseTokenizer(bins, S_GATE), S_GATE, n_views=2, neg_frac=1.0,
                                 targets="boxes")                              # ruby scenes: "detect the ... square"
    for ds, index in ((ground, (3, 5)), (negatives, (0, 0)), (negatives, (0, 1))):
        got, want = vlm.Teacher(ds, model, tok)[index], ds[index]
        assert got.keys() - {"teacher_tokens"} == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want), index
    assert negatives[(0, 0)]["prompt"].endswith("square")
    batch = Collator(tok)([teach[(0, i)] for i in range(3)])
    plain, _ = model.embed_views(batch)
    mixed, _ = model.embed_views({**batch, "use_teacher": torch.tensor([False, True, False])})
    B, W = 3, plain.shape[-1]
    plain, mixed = plain.view(B, 2, 66, W), mixed.view(B, 2, 66, W)
    assert torch.equal(mixed[[0, 2]], plain[[0, 2]])                             # unmarked: the tower's
    assert torch.equal(mixed[1, :, 1:-1], batch["teacher_tokens"][1])           # marked: ideal patches
    assert torch.equal(mixed[1, :, [0, -1]], plain[1, :, [0, -1]])              # <image_i> marks kept


def test_held_rows_do_not_move_others_do():
    bins = tiny_bins()
    model, tok = build_model("tiny", bins)
    words = tok(" red cube", add_special_tokens=False)["input_ids"]
    held = vlm.held_rows(tok, words)
    assert (set(words) <= set(held) and tok.convert_tokens_to_ids("<no_object>") in held
            and len(held) == len(set(words)) + 1025)
    vlm.hold_rows(model, held)
    emb = model.vlm.get_input_embeddings().weight
    before = emb.detach().clone()
    opt = torch.optim.AdamW([emb], lr=1e-2, weight_decay=0.0)  # the trainer's 1e-10 is below fp32's resolution
    (emb ** 2).sum().backward()
    opt.step()
    moved, others = (emb.detach() != before).any(1), before.ne(0).any(1)     # the padding row is all zeros
    others[held] = False
    assert not moved[held].any() and moved[others].all()


def test_vision_phase_refuses_a_non_finite_step(tmp_path):
    """A diverging vision phase stops before applying the bad step: the tower stays finite."""
    root = write_square_scenes(str(tmp_path / "sq"), 4, 0)
    bins = fit_bins([root], n_bins=32)
    model, tok = build_model("tiny", bins, n_views=1)
    ground = GroundingDataset([root], PoseTokenizer(bins, S_GATE), S_GATE, n_views=1, neg_frac=0.0, targets="boxes")
    with pytest.raises(ValueError, match="vision step 2: .* not finite"):
        vlm.pretrain_vision(model, ground, tok, vlm.VisionConfig(steps=5, batch_size=2, lr=1e30, warmup=1),
                            log=lambda s: None)
    assert all(torch.isfinite(p).all() for p in model.vlm.model.vision_tower.parameters())


def test_teacher_share_falls_linearly_to_zero():
    assert [vlm.teacher_share(s, 100) for s in (0, 50, 100, 500)] == [1.0, 0.5, 0.0, 0.0]
    assert vlm.teacher_share(0, 0) == 0.0


# ----------------------------------------------------------------------------- learnability gate
S_GATE = 112
GATE_VISION_STEPS = 600
GATE_STEPS = 900
GATE_SCENES = 200
GATE_TEACHER_STEPS = 450


SQUARES = {"red square": (220, 30, 30), "green square": (30, 200, 30), "blue square": (30, 60, 230)}


def write_square_scenes(root, n, seed, squares=SQUARES):
    """Omni3D scenes of squares (14-22 px, not overlapping; by default a red, a green and a blue one)
    at random places on grey noise, 1 m away."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    K = np.array([[100.0, 0, (S_GATE - 1) / 2], [0, 100.0, (S_GATE - 1) / 2], [0, 0, 1]])
    images, anns = [], []
    for i in range(n):
        img = rng.integers(60, 200, (S_GATE, S_GATE, 1)).repeat(3, 2).astype(np.uint8)
        placed = []
        for name, colour in squares.items():
            side = int(rng.integers(14, 23))
            while True:
                x0, y0 = (int(v) for v in rng.integers(0, S_GATE - side, 2))
                if all(x0 + side < a or c < x0 or y0 + side < b or d < y0 for a, b, c, d in placed):
                    break
            placed.append((x0, y0, x0 + side, y0 + side))
            img[y0:y0 + side, x0:x0 + side] = colour
            box = [x0 - 0.5, y0 - 0.5, x0 + side - 0.5, y0 + side - 0.5]
            t = [((box[0] + box[2]) / 2 - K[0, 2]) / 100, ((box[1] + box[3]) / 2 - K[1, 2]) / 100, 1.0]
            size = [side / 100, side / 100, 0.01]
            corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * np.array(size) / 2 + t
            anns.append({"id": len(anns), "image_id": i, "category_name": name, "valid3D": True,
                         "bbox2D_tight": box, "bbox2D_proj": box, "bbox2D_trunc": box, "center_cam": t,
                         "dimensions": [size[2], size[1], size[0]], "R_cam": np.eye(3).tolist(),
                         "bbox3D_cam": corners.tolist(), "visibility": 1.0, "truncation": 0.0})
        Image.fromarray(img).save(os.path.join(root, "images", f"{i:04d}.png"))
        images.append({"id": i, "file_path": f"images/{i:04d}.png", "width": S_GATE, "height": S_GATE, "K": K.tolist()})
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": k, "name": name} for k, name in enumerate(squares)]}, f)
    return root


def centre_error(model, tok, pose_tok, ds, collate, n):
    """Greedy 2D boxes on n held-out samples -> per-sample pixel error of the box centre nearest the
    queried square's (inf when none is decoded), and the truths."""
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


def train_gate(tmp_path, squares):
    """pretrain.py --stage vlm's recipe on squares on noise: the vision phase, then the decoder with
    the tower frozen, the rows the tower aims at held (vlm.hold_rows) and ideal tokens for a share of
    each batch that falls to 0 over GATE_TEACHER_STEPS (vlm.Teacher). Returns the held-out greedy
    centre errors of the queried square and the errors of always answering the median centre."""
    torch.manual_seed(0)
    train_dir = write_square_scenes(str(tmp_path / "train"), GATE_SCENES, 0, squares)
    val_dir = write_square_scenes(str(tmp_path / "val"), 24, 1, squares)
    bins = fit_bins([train_dir], n_bins=32)
    model, tok = build_model("tiny", bins, n_views=1)
    vlm.init_loc_embeddings(model, tok)
    pose_tok = PoseTokenizer(bins, S_GATE)
    kw = dict(n_views=1, neg_frac=0.0, targets="boxes")
    train, val = (GroundingDataset([train_dir], pose_tok, S_GATE, **kw),
                  GroundingDataset([val_dir], pose_tok, S_GATE, **kw))
    vlm.pretrain_vision(model, train, tok, vlm.VisionConfig(steps=GATE_VISION_STEPS, batch_size=8, log_every=10 ** 6),
                        log=lambda s: None)
    model.vlm.model.vision_tower.requires_grad_(False)
    teach = vlm.Teacher(train, model, tok)
    vlm.hold_rows(model, vlm.held_rows(tok, teach.targets.words))
    collate = Collator(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    model.train()
    for step in range(GATE_STEPS):  # on one square, it starts to localise after 300-600 steps (a sudden drop)
        teach.set_epoch(step)
        batch = collate([teach[int(i)] for i in rng.integers(len(teach), size=8)])
        batch["use_teacher"] = torch.rand(8) < vlm.teacher_share(step, GATE_TEACHER_STEPS)
        loss = model(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    errors, truths = centre_error(model, tok, pose_tok, val, collate, len(val))
    return errors, np.linalg.norm(truths - np.median(truths, 0), axis=1)


def test_learnability_gate(tmp_path):
    """The tiny VLM's recipe learns to *see*: on one red square on noise, its held-out centre error
    must be at most half the error of always answering the median centre; a model that ignores its
    image cannot get there. (With three squares, query one, the recipe passes on one seed of three
    within 1800 steps: too unreliable for a test, RESULTS.md §2.2.)"""
    errors, baseline = train_gate(tmp_path, {"red square": SQUARES["red square"]})
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
