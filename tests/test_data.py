"""Samples (data.py, waypoints.py, stats.py, loading.py): pseudo multi-view grounding, robot chunks
and waypoints, stats, mixing, collation, DataLoader workers, skipping bad samples and the CLI.
Fixtures from test_formats.py and test_robot_formats.py.

Catches: a crop whose K no longer reprojects the 3D box onto its 2D box, a box filter applied in
the wrong pixels, negatives that name a present class, waypoints in the world frame instead of the
camera's (or listed for the wrong arm), chunks that stride or pad wrongly, statistics without the
std floor, a mixture that is not n^0.43 or does not resume mid-epoch, and labels or padding that the
collator puts on the wrong side."""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_formats import corners, proj_box, write_bop, write_omni3d  # noqa: E402
from test_robot_formats import (CAM_POSES, CAMS, KV, ee16, look_at, robotwin_frame, write_lerobot,  # noqa: E402
                                write_robotwin)
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import data  # noqa: E402
import stats  # noqa: E402
from data import Collator, GroundingDataset, RobotDataset, ViewConfig, fit_bins, open_datasets  # noqa: E402
from loading import MixtureSampler, make_loader, mixture_weights  # noqa: E402
from stats import Stats  # noqa: E402
from tokenizer import PoseBins, PoseTokenizer, build_tiny_tokenizer, extend_tokenizer, quat_to_matrix  # noqa: E402
from waypoints import TrajectoryConfig  # noqa: E402

S = 112


@pytest.fixture
def omni(tmp_path):
    return write_omni3d(str(tmp_path / "omni"))


def tokenizer_for(path, size=S):
    return PoseTokenizer(fit_bins(path, n_bins=32), size)


def test_grounding_views_reproject_and_targets(omni):
    tok = tokenizer_for(omni)
    ds = GroundingDataset(omni, tok, S, neg_frac=0.0, seed=3)
    assert len(ds) == 3 and ds.classes == ["blue bowl", "green ball", "red cube"]  # underscores -> spaces
    listed = np.zeros(3, int)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            views, prompt, target = ds.build(i)
            name = ds.samples[i][1]
            assert prompt == f"detect the {name}" and target == tok.encode_objects([v.objects for v in views])
            for k, v in enumerate(views):
                x0, y0, x1, y1 = v.crop
                lo = np.array(v.lb.offset)
                hi = lo + v.lb.scale * np.array([x1 - x0, y1 - y0])
                for o in v.objects:  # the view's K reprojects the 3D corners onto the view's 2D box
                    assert o.name == name
                    box = proj_box(v.lb.K, corners(o.t, o.R, o.size), 1e9, 1e9)
                    np.testing.assert_allclose(o.box2d, np.clip(box, np.r_[lo, lo], np.r_[hi, hi]), atol=1e-6)
                listed[k] += len(v.objects)
    assert np.all(listed > 0)  # instances appear in the head and in both wrist views
    head = ds.build(ds.samples.index((0, "red cube")))[0][0]  # both instances in the near-full head view
    assert sorted(o.t[2] for o in head.objects) == [1.0, 1.5]
    item = ds[0]
    assert item["images"].shape == (3, 3, S, S) and item["images"].dtype == np.float32
    assert item["has_rays"].all() and item["has_depth"].all()
    d, m = item["depth"][0]
    assert np.allclose(d[m > 0], 1.5) and 0 < m.mean() < 1  # 1.5 m; letterbox padding invalid


def test_grounding_box_targets_carry_the_same_objects_without_poses(omni):
    """targets="boxes" (ablation.py's semantic baseline): same views, names and order, 2D boxes only."""
    tok = tokenizer_for(omni)
    poses = GroundingDataset(omni, tok, S, neg_frac=0.0, seed=3)
    boxes = GroundingDataset(omni, tok, S, neg_frac=0.0, seed=3, targets="boxes")
    for i in range(len(poses)):
        views, prompt, target = boxes.build(i)
        same_views, same_prompt, _ = poses.build(i)
        assert prompt == same_prompt
        assert [[(o.name, o.box2d) for o in v.objects] for v in views] == \
            [[(o.name, o.box2d) for o in v.objects] for v in same_views]
        assert target == tok.encode_boxes([v.objects for v in views]) and "<trans" not in target
        decoded = tok.decode(target, n_views=len(views))
        for v, d in zip(views, decoded.views):
            assert [t.name for t in d] == [o.name for o in sorted(v.objects, key=lambda o: o.t[2])]
            assert all(t.t is None and t.anchor.shape == (4,) for t in d)
    with pytest.raises(ValueError, match="targets"):
        GroundingDataset(omni, tok, S, targets="captions")


def test_grounding_negatives_and_determinism(omni):
    tok = tokenizer_for(omni)
    ds = GroundingDataset(omni, tok, S, neg_frac=1.0, seed=0)
    i = [k for k, (_, n) in enumerate(ds.samples) if n == "red cube"][0]
    views, prompt, target = ds.build(i)  # image holds red cube + blue bowl: only green ball shares no word
    assert prompt == "detect the green ball" and target == tok.encode_negative("green ball", 3)
    dense, *text = ds.build(i, every_object=True)  # the same crops, prompt and target; every object listed
    assert text == [prompt, target] and [v.crop for v in dense] == [v.crop for v in views]
    assert {o.name for v in dense for o in v.objects} == {"red cube", "blue bowl"}
    ds = GroundingDataset(omni, tok, S, seed=5)
    a, b = ds[1], ds[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    crops = [v.crop for v in ds.build(1)[0]]
    again = GroundingDataset(omni, tok, S, seed=5)
    assert [v.crop for v in again.build(1)[0]] == crops
    again.set_epoch(1)
    assert [v.crop for v in again.build(1)[0]] != crops
    with pytest.raises(ValueError, match="image_size 64 must equal the dataset image_size 112"):
        GroundingDataset(omni, tokenizer_for(omni, 64), S)


def test_grounding_box_filter_in_view_pixels(omni):
    """method.md §7.3's box filter (longer side >= 10 px, shorter side >= 3 px) holds in the letterboxed view
    the model sees and in source pixels."""
    def sides(size, min_px, min_side_px):  # (n, [longer, shorter], [view, source]) over 3 epochs
        ds = GroundingDataset(omni, tokenizer_for(omni, size), size, neg_frac=0.0, seed=1,
                              views=ViewConfig(min_box_px=min_px, min_side_px=min_side_px))
        out = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                for v in ds.build(i)[0]:
                    for o in v.objects:
                        wh = sorted((o.box2d[2] - o.box2d[0], o.box2d[3] - o.box2d[1]), reverse=True)
                        out.append(np.outer(wh, [1, 1 / v.lb.scale]))
        return np.array(out).reshape(-1, 2, 2)
    for size in (32, 448):  # the 160x120 source shrunk ~5x, and enlarged ~3x
        s = sides(size, 10.0, 3.0)
        assert len(s) > 0 and np.all(s[:, 0] >= 10.0 - 1e-6) and np.all(s[:, 1] >= 3.0 - 1e-6), size
    s = sides(448, 10.0, 3.0)  # a thin box the model still sees is kept
    assert np.any(s[:, 1] < 10.0)
    s = sides(32, 0.0, 0.0)  # boxes a source-pixel filter alone would keep are too small in the view
    assert np.any((s[:, 0, 1] >= 10) & (s[:, 0, 0] < 10))


def test_grounding_bop(tmp_path):
    root, _ = write_bop(str(tmp_path / "bop"))
    ds = GroundingDataset(root, tokenizer_for(root), S, neg_frac=0.0)
    views, prompt, _ = ds.build(0)
    assert prompt == "detect the power drill" and len(views[0].objects) == 1
    d, m = ds[0]["depth"][0]
    assert np.allclose(d[m > 0], 0.9)


def test_grounding_skip_bad(omni):
    open(os.path.join(os.path.dirname(omni), "images", "000001.png"), "wb").write(b"\x89PNG broken")
    ds = GroundingDataset(omni, tokenizer_for(omni), S)
    bad = [k for k, (s, _) in enumerate(ds.samples) if s == 1][0]
    with pytest.raises(ValueError, match=r"images/000001.png: cannot decode image"):
        ds[bad]
    ds = GroundingDataset(omni, tokenizer_for(omni), S, skip_bad=True)
    with pytest.warns(UserWarning, match="000001.png"):
        item = ds[bad]
    assert item["skipped"] == 1 and item["images"].shape[0] == 3  # the next sample, one skipped to reach it
    os.remove(os.path.join(os.path.dirname(omni), "images", "000000_depth.png"))
    with pytest.raises(FileNotFoundError, match=r"images/000000_depth.png: file not found"):
        ds.scenes[0].load()


@pytest.fixture
def lerobot(tmp_path):
    return write_lerobot(str(tmp_path / "lr"), "v3.0", "image", lengths=(12, 5), extras=True)


def test_robot_chunk_padding_and_waypoints(lerobot):
    tok = PoseTokenizer(PoseBins.fit(np.random.default_rng(0).normal(size=(50, 3))), 64)
    traj = TrajectoryConfig(every=2, count=3)
    ds = RobotDataset(lerobot, 64, chunk=4, stride=3, pose_tokenizer=tok, trajectory=True, traj=traj)
    i = ds.index.index((0, 0, 7))
    views, prompt, target, state, actions, is_pad = ds.build(i)
    acts = np.stack([ee16(0, t + 1) for t in range(12)])
    np.testing.assert_allclose(state, ee16(0, 7), atol=1e-6)
    np.testing.assert_allclose(actions, acts[[7, 10, 11, 11]], atol=1e-6)  # padded with the last action
    assert is_pad.tolist() == [False, False, True, True] and prompt == "pick up the red cube"
    steps = [8, 10, 11]  # t + every*(k+1) - 1, clamped to the episode end
    for v, cam in zip(views, CAMS):
        R, c = CAM_POSES[cam][:3, :3], CAM_POSES[cam][:3, 3]
        expected = []
        for arm, pos, quat in (("left", slice(0, 3), slice(3, 7)), ("right", slice(8, 11), slice(11, 15))):
            if arm not in cam and cam != "head":
                continue
            for k, s in enumerate(steps):
                p = R.T @ (acts[s, pos] - c)
                uv = (KV @ p)[:2] / p[2] + [0, 8]  # 64x48 letterboxed to 64: scale 1, 8 px top padding
                expected.append((f"{arm} arm {k}", uv, p, R.T @ quat_to_matrix(acts[s, quat])))
        assert [w.name for w in v.objects] == [e[0] for e in expected]
        for w, (_, uv, p, Rc) in zip(v.objects, expected):
            np.testing.assert_allclose(w.uv, uv, atol=1e-6)
            np.testing.assert_allclose(w.t, p, atol=1e-6)
            np.testing.assert_allclose(w.R, Rc, atol=1e-6)
    assert target == tok.encode_trajectory([v.objects for v in views])
    # the head view drops an arm whose first waypoint is outside its image
    ds.sources[0].episodes[0].key["extra"]["observation.extrinsics.head"][:] = \
        look_at(np.array([0.9, -0.6, 0.6]), [1.2, 0.5, 0.2]).ravel()
    assert ds.build(i)[0][0].objects == []
    item = ds[i]
    assert item["state"].shape == (16,) and item["actions"].shape == (4, 16) and item["has_depth"].all()


def follow_hands(root):
    """Rewrite the fixture's wrist extrinsics so each wrist camera moves with its hand: the left one
    sits 4.5 cm ahead of the hand looking back (-x) while the hand moves +x, so later waypoints pass
    behind it; the right one looks down at its hand from behind."""
    path = os.path.join(root, "data", "chunk-000", "file-000.parquet")
    table = pq.read_table(path)
    act = np.array(table.column("action").to_pylist())
    poses = {"left_wrist": [look_at(a[:3] + [0.045, 0, 0], a[:3] + [-1, 0, 0]) for a in act],
             "right_wrist": [look_at(a[8:11] + [0, -0.1, 0.1], a[8:11] + [0, 0.1, -0.1]) for a in act]}
    for cam, T in poses.items():
        key = f"observation.extrinsics.{cam}"
        col = pa.array([m.ravel().tolist() for m in T], pa.list_(pa.float32()))
        table = table.set_column(table.column_names.index(key), key, col)
    pq.write_table(table, path, row_group_size=4)


def test_wrist_waypoints_follow_the_camera_and_bins_fit_the_targets(lerobot):
    follow_hands(lerobot)
    traj = TrajectoryConfig(every=2, count=3)
    tok = PoseTokenizer(PoseBins.fit(np.random.default_rng(0).normal(size=(50, 3))), 64)
    ds = RobotDataset(lerobot, 64, pose_tokenizer=tok, trajectory=True, traj=traj)
    listed, names = {1: [], 3: []}, set()
    for i, (_, ei, t) in enumerate(ds.index):
        views = ds.build(i)[0]
        for v in views:
            for w in v.objects:  # in front of the camera, anchored at its own projection
                assert w.t[2] >= traj.min_depth
                np.testing.assert_allclose(w.uv, (KV @ w.t)[:2] / w.t[2] + [0, 8], atol=1e-5)
        names.add(tuple(w.name for w in views[1].objects))
        for step in listed:
            if t % step == 0:
                listed[step] += [w.t for v in views for w in v.objects]
    # behind the left wrist camera: dropped, the others keep their index k
    assert ("left arm 0", "left arm 1") in names and ("left arm 0", "left arm 1", "left arm 2") in names
    for step, trans in listed.items():  # the bins are percentiles of exactly the listed translations
        got, want = fit_bins(lerobot, n_bins=16, traj=traj, frame_step=step), PoseBins.fit(np.array(trans), n_bins=16)
        for kind in PoseBins.KINDS:
            np.testing.assert_allclose(getattr(got, kind), getattr(want, kind), atol=1e-6)


def test_fit_bins_reads_opened_sources_as_they_are(lerobot):
    """posttrain fits bins on the sources it has opened (its first --episodes): an opened source gives
    the bins its path gives, and a cut one only those of its episodes."""
    from robot_formats import open_source
    whole, first = fit_bins(open_source(lerobot), n_bins=16), fit_bins(open_source(lerobot, episodes=1), n_bins=16)
    want = fit_bins(lerobot, n_bins=16)
    for kind in PoseBins.KINDS:
        np.testing.assert_array_equal(getattr(whole, kind), getattr(want, kind))
    assert not np.allclose(first.xy, want.xy)


def test_robot_first_n_episodes(lerobot):
    """episodes=N keeps the first N episodes (few-demonstration runs); more than the dataset holds is an error."""
    full = RobotDataset(lerobot, S, chunk=4, stride=1, cameras=("head",))
    first = RobotDataset(lerobot, S, chunk=4, stride=1, cameras=("head",), episodes=1)
    assert len(full) == 12 + 5 and len(first) == 12 and all(ei == 0 for _, ei, _ in first.index)
    np.testing.assert_array_equal(first[3]["actions"], full[3]["actions"])
    with pytest.raises(ValueError, match="first 3 episodes.*holds 2"):
        RobotDataset(lerobot, S, cameras=("head",), episodes=3)


def test_robot_missing_intrinsics_for_trajectory(lerobot):
    info_path = os.path.join(lerobot, "meta", "info.json")
    info = json.load(open(info_path))
    del info["features"]["observation.intrinsics.left_wrist"]
    json.dump(info, open(info_path, "w"))
    tok = PoseTokenizer(PoseBins.fit(np.zeros((4, 3)) + np.arange(4)[:, None]), 64)
    with pytest.raises(ValueError, match=r"camera 'left_wrist' has no intrinsics.*observation.intrinsics.left_wrist"):
        RobotDataset(lerobot, 64, pose_tokenizer=tok, trajectory=True)
    RobotDataset(lerobot, 64)[0]  # without trajectory targets the intrinsics are optional


def test_robotwin_samples_colours_and_depth(tmp_path):
    root, states = write_robotwin(str(tmp_path / "rt"), "release", T=8)
    ds = RobotDataset(root, 64, chunk=16, stride=3)
    item = ds[ds.index.index((0, 0, 2))]
    np.testing.assert_allclose(item["actions"][:2], states[[3, 6]], atol=1e-6)
    assert item["is_pad"].tolist() == [False] * 2 + [True] * 14 and item["prompt"] == "stack the cubes"
    rgb = (item["images"][0].transpose(1, 2, 0) + 1) * 127.5
    np.testing.assert_allclose(rgb[20:40, 4:20].reshape(-1, 3).mean(0), robotwin_frame(2, 0)[0, 0], atol=8)
    d, m = item["depth"][0]
    assert m[8:12, 0:4].sum() == 0 and m[20, 20] == 1 and d[20, 20] == pytest.approx(0.75)


def test_stats_cached_and_round_trip(tmp_path, lerobot):
    ds = RobotDataset(lerobot, 64, stats="auto")
    cached = [f for f in os.listdir(lerobot) if f.startswith("posevla_stats_")]
    assert len(cached) == 1
    st = ds.stats[0]
    states = np.stack([ee16(e, t) for e, n in ((0, 12), (1, 5)) for t in range(n)])
    np.testing.assert_allclose(st.state["mean"], states.mean(0), atol=1e-6)
    np.testing.assert_allclose(st.state["q99"], np.quantile(states, 0.99, axis=0), atol=1e-6)
    x = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32)
    np.testing.assert_allclose(st.unnormalize(st.normalize(x, "action"), "action"), x, atol=1e-6)
    i = ds.index.index((0, 1, 3))  # the dataset's items use the floored std (a quaternion dim has std 1.5e-3)
    std = np.maximum(st.state["std"], stats.STD_FLOOR)
    want = np.clip((ee16(1, 3) - st.state["mean"]) / std, -stats.STATE_CLIP, stats.STATE_CLIP)
    np.testing.assert_allclose(ds[i]["state"], want, atol=1e-5)
    with pytest.raises(ValueError, match="state has width 14; the statistics expect 16"):
        st.normalize(x[:, :14], "state")
    path = os.path.join(lerobot, cached[0])  # reused: a second dataset reads the cache file
    d = json.load(open(path))
    d["state"]["mean"][0] = 123.0
    json.dump(d, open(path, "w"))
    assert RobotDataset(lerobot, 64, stats="auto").stats[0].state["mean"][0] == 123.0
    st.save(str(tmp_path / "s.json"))
    assert Stats.load(str(tmp_path / "s.json")) == st


def stats_with_a_still_dim():
    """Stats whose dim 1 barely moves (std ~1e-5, like a hand quaternion component of the tabletop
    demos) and whose dim 2 is exactly constant; dims 0 and 3 vary ordinarily."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0.3, 0.1, 200), 0.7 + rng.normal(0, 1e-5, 200), np.full(200, 0.5),
                  rng.normal(-1.0, 2.0, 200)], 1)
    return Stats.compute(x, x), x.mean(0), x.std(0)


def test_stats_floor_the_std_and_clip_the_state():
    """A closed-loop tilt in a dim the demos barely moved stays a few normalised units (plain
    z-scoring gives 0.05 / 1e-5 = 5e3); ordinary dims are plain z-scores."""
    st, mean, std = stats_with_a_still_dim()
    assert 5e-6 < std[1] < 2e-5 and std[2] == 0
    x = mean + np.array([[0.5 * std[0], 0.02, 0.0, -1.5 * std[3]],  # two floored units
                         [-2.0 * std[0], 0.05, 0.0, 4.0 * std[3]],  # a closed-loop tilt: at the clip
                         [0.0, -0.5, 0.3, 0.0]])  # far off: clipped
    z = st.normalize(x, "state")
    np.testing.assert_allclose(z[:, [0, 3]], (x[:, [0, 3]] - mean[[0, 3]]) / std[[0, 3]], rtol=1e-6)
    np.testing.assert_allclose(z[:, 1], [0.02 / stats.STD_FLOOR, 0.05 / stats.STD_FLOOR, -stats.STATE_CLIP], rtol=1e-4)
    assert z[2, 2] == stats.STATE_CLIP and np.all(np.abs(z) <= stats.STATE_CLIP)


def test_stats_unnormalize_floored_actions():
    """Unit sampling noise moves a constant action dim by at most STD_FLOOR (not by one raw unit);
    actions are not clipped, so normalize -> unnormalize is exact in every dim, far values too."""
    st, mean, std = stats_with_a_still_dim()
    noise = np.array([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])
    moved = np.abs(st.unnormalize(noise, "action") - mean)
    assert np.all(moved[:, [1, 2]] <= stats.STD_FLOOR * (1 + 1e-5))
    np.testing.assert_allclose(moved[:, [0, 3]], np.tile(std[[0, 3]], (2, 1)), rtol=1e-5)
    x = mean + np.array([[8.0 * std[0], 0.3, -0.2, -9.0 * std[3]], [-0.1, 1e-5, 0.0, 0.5]])
    assert np.abs(st.normalize(x, "action")).max() > stats.STATE_CLIP
    np.testing.assert_allclose(st.unnormalize(st.normalize(x, "action"), "action"), x, rtol=1e-6, atol=1e-6)


def test_mixture_weights_and_resumable_sampler():
    sizes = [100, 10000]
    w = mixture_weights(sizes)
    np.testing.assert_allclose(w, np.array([100 ** 0.43, 10000 ** 0.43]) / (100 ** 0.43 + 10000 ** 0.43))
    s = MixtureSampler(sizes, num_samples=20000, seed=1)
    idx = s.indices(0)
    assert np.array_equal(idx, MixtureSampler(sizes, num_samples=20000, seed=1).indices(0))
    assert not np.array_equal(idx, s.indices(1))
    assert abs((idx < 100).mean() - w[0]) < 0.01
    counts = np.bincount(idx[idx < 100], minlength=100)
    assert counts.max() - counts.min() <= 1  # each part is drawn without replacement, cycling
    s.load_state_dict(s.state_dict(50) | {"epoch": 1})
    assert list(s) == s.indices(1)[50:].tolist() and len(list(s)) == 20000  # resumes once, then full


def test_collator_batch(omni, lerobot):
    text = build_tiny_tokenizer()
    tok = tokenizer_for(omni, 64)
    extend_tokenizer(text, tok.bins, 3)
    g = GroundingDataset(omni, tok, 64, neg_frac=0.0)
    batch = Collator(text)([g[0], g[2]])
    assert batch["images"].shape == (2, 3, 3, 64, 64) and batch["view_mask"].all()
    for b, i in enumerate((0, 2)):
        ids = batch["prompt_ids"][b][batch["prompt_mask"][b]].tolist()
        assert ids[0] == text.bos_token_id and text.decode(ids[1:]) == g[i]["prompt"] + "\n"
        lab = batch["label_ids"][b][batch["label_mask"][b]].tolist()
        assert lab[-1] == text.eos_token_id and text.decode(lab[:-1]) == g[i]["target"]
    assert not batch["prompt_mask"][:, 0].logical_not().any()  # right padding
    assert "state" not in batch
    r = RobotDataset(lerobot, 64, chunk=4)
    batch = Collator(text, max_dim=32)([r[0], r[15]])
    assert batch["state"].shape == (2, 32) and batch["actions"].shape == (2, 4, 32)
    assert batch["state"][:, 16:].abs().sum() == 0 and batch["is_pad"].dtype == torch.bool
    assert batch["is_pad"][1].tolist() == [False, True, True, True]  # frame 3 of a 5-frame episode
    assert "label_ids" not in batch and "label_mask" not in batch  # no target requested: no NTP at all
    item = {k: v for k, v in r[0].items() if k not in ("actions", "is_pad")}  # what the policy sees
    batch = Collator(text)([item])
    assert batch["state"].shape == (1, 32) and "actions" not in batch and "label_ids" not in batch
    batch = Collator(text)([g[0], {**g[2], "target": ""}])  # mixed: the empty target is all padding
    assert batch["label_mask"][0].any() and not batch["label_mask"][1].any()


def test_dataloader_workers_open_files_lazily(tmp_path):
    rt, _ = write_robotwin(str(tmp_path / "rt"), "current", T=6)
    lr = write_lerobot(str(tmp_path / "lr"), "v2.1", "video", lengths=(5, 4))
    ds = open_datasets([rt, lr], image_size=32, chunk=2, stride=1)
    assert isinstance(ds, RobotDataset) and ds.sizes == [6, 9]
    ds[0], ds[7]  # opens an h5py file and a video container in this process
    rt_src = ds.sources[0]
    assert len(rt_src.handles()) == 1 and len(pickle.loads(pickle.dumps(rt_src)).handles()) == 0
    rt_src._pid = -1  # what a forked worker sees: a different pid, so it opens its own handles
    assert len(rt_src.handles()) == 0
    sampler = MixtureSampler(ds.sizes, num_samples=12, seed=0)
    # spawned (this process holds open FFmpeg/HDF5 handles, so forking could deadlock), persistent
    loader = make_loader(ds, 4, Collator(build_tiny_tokenizer()), sampler=sampler, workers=2)
    want = torch.stack([torch.from_numpy(ds[i]["images"]) for i in sampler.indices(0)])
    for _ in range(2):  # the second pass reuses the same worker processes
        assert torch.equal(torch.cat([b["images"] for b in loader]), want)


def test_open_datasets_rejects_mixed_kinds(omni, lerobot):
    assert isinstance(open_datasets(omni, pose_tokenizer=tokenizer_for(omni, 32), image_size=32), GroundingDataset)
    with pytest.raises(ValueError, match="cannot mix formats"):
        open_datasets([omni, lerobot], image_size=32)


def test_cli_fit_bins_show_bench(tmp_path, omni, lerobot, capsys):
    bins = str(tmp_path / "bins.json")
    data.main(["fit-bins", "--data", omni, "--out", bins, "--n-bins", "16"])
    assert PoseBins.load(bins).n_bins == 16
    out = str(tmp_path / "show.png")
    data.main(["show", "--data", omni, "--bins", bins, "--out", out, "--image-size", "64"])
    from PIL import Image
    assert Image.open(out).size[0] >= 3 * 64
    data.main(["show", "--data", lerobot, "--out", out, "--image-size", "64", "--n-bins", "8"])
    data.main(["bench", "--data", lerobot, "--image-size", "32", "--batches", "2", "--batch-size", "2",
               "--n-bins", "8"])
    assert "samples/s" in capsys.readouterr().out
