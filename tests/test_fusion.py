"""Tests for fusion.py: letterboxing and K, ray map, depth prior, and the additive prior fusion.

Catches: a letterbox K off by the half-pixel offset, blended depth at edges, rays that are not zero
in the padding, a missing prior that still adds something (or leaks NaN into gradients), dropout
at evaluation or per view instead of per sample, a prior that can outweigh the image features, a
gate that never learns, and patch order different from SigLIP's."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fusion import (FusionConfig, GeometryFusion, PriorEmbedder, depth_prior, image_to_tensor,  # noqa: E402
                    letterbox, ray_map)

K0 = np.array([[90.0, 0, 41.3], [0, 95.0, 28.7], [0, 0, 1]])


# ----------------------------------------------------------------------------------------------
# Letterbox, rays, depth (numpy)

@pytest.mark.parametrize("hw, size", [((60, 80), 56), ((97, 50), 64), ((30, 20), 84)])
def test_letterbox_K_projects_points_and_content_to_the_same_pixel(hw, size):
    H, W = hw
    rng = np.random.default_rng(0)
    K = K0 * [[W / 80], [H / 60], [1]]
    P = np.stack([rng.uniform(-0.5, 0.5, 50), rng.uniform(-0.4, 0.4, 50), rng.uniform(0.5, 3, 50)], 1)
    uv = (P @ K.T)[:, :2] / P[:, 2:]
    lb = letterbox(np.zeros((H, W, 3), np.uint8), K, size)
    ox, oy = lb.offset
    uv_lb = (P @ lb.K.T)[:, :2] / P[:, 2:]
    np.testing.assert_allclose(uv_lb, uv * lb.scale + [ox, oy], atol=1e-9)
    assert lb.image.shape == (size, size, 3) and lb.valid.shape == (size, size)

    # The pixels move where K says: a bright square's centroid lands on the mapped centre.
    img = np.zeros((H, W, 3), np.uint8)
    x0, y0 = W // 3, H // 3
    img[y0:y0 + 6, x0:x0 + 6] = 255
    out = letterbox(img, K, size).image[..., 0].astype(np.float64)
    vv, uu = np.mgrid[:size, :size]
    centroid = np.array([(uu * out).sum(), (vv * out).sum()]) / out.sum()
    np.testing.assert_allclose(centroid, np.array([x0 + 2.5, y0 + 2.5]) * lb.scale + [ox, oy], atol=0.15)


def test_letterbox_padding_and_nearest_depth():
    H, W, size = 97, 50, 64
    depth = (np.arange(H * W, dtype=np.float32) + 1).reshape(H, W)       # every pixel distinct
    lb = letterbox(np.full((H, W, 3), 200, np.uint8), K0, size, depth=depth)
    cols = np.flatnonzero(lb.valid.any(0))
    assert lb.valid.all(1).sum() == 0 and cols[0] > 0 and cols[-1] < size - 1     # padded left/right
    assert np.all(lb.image[~lb.valid] == 0) and np.all(lb.image[lb.valid] == 200)
    assert np.all(lb.depth[~lb.valid] == 0) and lb.depth.dtype == np.float32
    # Nearest neighbour: each output pixel centre maps back into the source pixel whose depth it has.
    r, c = np.nonzero(lb.valid)
    src = lb.depth[r, c].astype(np.int64) - 1
    sr, sc = src // W, src % W
    ox, oy = lb.offset
    assert np.all(np.abs((c - ox) / lb.scale - sc) <= 0.5 + 1e-9)
    assert np.all(np.abs((r - oy) / lb.scale - sr) <= 0.5 + 1e-9)
    with pytest.raises(ValueError, match="depth shape"):
        letterbox(np.zeros((H, W, 3), np.uint8), K0, size, depth=np.zeros((H, W + 1)))
    with pytest.raises(ValueError, match="uint8"):
        letterbox(np.zeros((H, W, 3), np.float32), K0, size)


def test_ray_map_principal_point_and_padding():
    H, W, size = 60, 80, 56
    # Choose K so that the letterboxed principal point falls on pixel (30, 25).
    s = size / W
    ox, oy = 0.5 * (s - 1), (size - round(H * s)) // 2 + 0.5 * (s - 1)
    K = np.array([[70.0, 0, (30 - ox) / s], [0, 72.0, (25 - oy) / s], [0, 0, 1]])
    lb = letterbox(np.zeros((H, W, 3), np.uint8), K, size)
    rays = ray_map(lb.K, lb.valid)
    assert rays.shape == (3, size, size) and rays.dtype == np.float32
    np.testing.assert_allclose(rays[:, 25, 30], [0, 0, 1], atol=1e-6)
    assert np.all(rays[:, ~lb.valid] == 0) and (~lb.valid).sum() == 2 * 7 * size
    v, u = 40, 3
    np.testing.assert_allclose(rays[:, v, u], [(u - lb.K[0, 2]) / lb.K[0, 0], (v - lb.K[1, 2]) / lb.K[1, 1], 1],
                               rtol=1e-6)


def test_depth_prior_invalid_values_and_image_to_tensor():
    d = np.array([[1.5, 0.0, -2.0], [np.nan, np.inf, 3.0]], np.float32)
    valid = np.array([[True, True, True], [True, True, False]])
    prior = depth_prior(d, valid)
    np.testing.assert_array_equal(prior[0], [[1.5, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(prior[1], [[1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(depth_prior(d)[1], [[1, 0, 0], [0, 0, 1]])
    assert prior.dtype == np.float32 and np.all(np.isfinite(prior))
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 1] = [255, 0, 128]
    t = image_to_tensor(img)
    assert t.shape == (3, 2, 2) and t.dtype == np.float32
    np.testing.assert_allclose(t[:, 0, 1], [1, -1, 128 / 127.5 - 1], atol=1e-6)
    assert np.all(t[:, 1, 1] == -1)


# ----------------------------------------------------------------------------------------------
# Fusion (torch)

def make_fusion(seed=0, S=42, p=14, width=16, open_gates=True):
    torch.manual_seed(seed)
    fusion = GeometryFusion(FusionConfig(patch_size=p, width=width))
    if open_gates:  # the default zero gate would make every prior add 0; give the test something to see
        with torch.no_grad():
            for emb in (fusion.rays, fusion.depth):
                emb.gate.fill_(0.5)
    N, P = 6, (S // p) ** 2
    feats = torch.randn(N, P, width)
    rays = torch.randn(N, 3, S, S)
    depth = torch.rand(N, 2, S, S)
    return fusion, feats, rays, depth


def test_absent_priors_add_exactly_nothing():
    fusion, feats, rays, depth = make_fusion()
    none = torch.zeros(len(feats), dtype=torch.bool)
    for train in (False, True):
        fusion.train(train)
        assert torch.equal(fusion(feats), feats)
        assert torch.equal(fusion(feats, rays, depth, none, none), feats)
    fusion.eval()
    with_all = fusion(feats, rays, depth)
    assert not torch.allclose(with_all, feats)
    # Mixed: samples 0 and 3 lack rays, sample 3 lacks depth too.
    has_r = torch.tensor([False, True, True, False, True, True])
    has_d = torch.tensor([True, True, True, False, True, True])
    out = fusion(feats, rays, depth, has_r, has_d)
    assert torch.equal(out[3], feats[3]) and torch.equal(out[1], with_all[1])
    assert torch.equal(out[0], fusion(feats, None, depth)[0])
    # NaN in an absent prior leaks into neither the output nor the gradients.
    bad = rays.clone()
    bad[0] = float("nan")
    fusion(feats, bad, depth, has_r, has_d).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters() if p.grad is not None)
    # Default zero gate: a fresh module leaves the pretrained features unchanged even with priors.
    fresh, feats, rays, depth = make_fusion(open_gates=False)
    for train in (False, True):
        fresh.train(train)
        assert torch.equal(fresh(feats, rays, depth), feats)


def test_modality_dropout_only_in_training_and_independent():
    fusion, feats, rays, depth = make_fusion(S=28)
    N = 64
    feats, rays, depth = feats[:1].expand(N, -1, -1), rays[:1].expand(N, -1, -1, -1), depth[:1].expand(N, -1, -1, -1)
    fusion.eval()
    combos = {(False, False): feats[0], (True, False): fusion(feats[:1], rays[:1])[0],
              (False, True): fusion(feats[:1], None, depth[:1])[0],
              (True, True): fusion(feats[:1], rays[:1], depth[:1])[0]}
    assert torch.equal(fusion(feats, rays, depth), combos[True, True][None].expand(N, -1, -1))
    fusion.train()
    torch.manual_seed(1)
    has_r = torch.arange(N) % 8 != 0                               # every 8th sample has no rays
    out = fusion(feats, rays, depth, has_r, None)
    seen = []
    for i in range(N):
        match = [k for k, v in combos.items() if torch.allclose(out[i], v, atol=1e-6)]
        assert len(match) == 1
        seen.append(match[0])
        assert has_r[i] or not match[0][0]                         # dropout never adds an absent prior
    assert set(seen) == set(combos)                                # all four combinations occur
    # views=4: rows are 16 samples x 4 views; every view of a sample keeps/drops priors together
    out = fusion(feats, rays, depth, None, None, views=4)
    kinds = [next(k for k, v in combos.items() if torch.allclose(out[i], v, atol=1e-6)) for i in range(N)]
    assert all(len(set(kinds[s * 4:(s + 1) * 4])) == 1 for s in range(N // 4))
    assert len(set(kinds)) > 1


def test_priors_stay_within_the_feature_norm():
    """However large the MLP's weights grow and however far the gate opens, each prior adds at most
    the RGB feature norm to a token, both together at most twice; a token with small features gets
    a small prior (the scale is per token, not per batch), and depth is measured against the RGB
    features, not RGB + rays."""
    fusion, feats, rays, depth = make_fusion()
    feats = feats * torch.logspace(-2, 1, feats.shape[1])[None, :, None]  # token norms over 3 decades
    with torch.no_grad():
        for emb in (fusion.rays, fusion.depth):
            for m in emb.mlp[::2]:
                m.weight.mul_(100)
                m.bias.mul_(100)
            emb.gate.fill_(20.0)
    fusion.eval()
    norm = feats.norm(dim=-1)                                           # (N, P)
    with_rays, with_both = fusion(feats, rays), fusion(feats, rays, depth)
    assert torch.all((with_both - feats).norm(dim=-1) <= 2 * norm * (1 + 1e-5))
    for added in (with_rays - feats, fusion(feats, None, depth) - feats, with_both - with_rays):
        torch.testing.assert_close(added.norm(dim=-1), norm, rtol=1e-4, atol=0)  # tanh(20) = 1: at the bound


def test_gate_and_mlp_learn_from_a_fresh_module():
    """At init the output is the features exactly, yet the gate gets gradient on the first backward;
    once one AdamW step has opened it, both MLP layers do (a zero last layer would keep all three
    at zero forever, since the gate's gradient is the normalised MLP output)."""
    fusion, feats, rays, depth = make_fusion(open_gates=False)
    fusion.eval()
    target = torch.randn_like(feats)
    opt = torch.optim.AdamW(fusion.parameters(), lr=1e-3)
    for step in range(2):
        out = fusion(feats, rays, depth)
        if step == 0:
            assert torch.equal(out, feats)
        opt.zero_grad()
        (out - target).pow(2).mean().backward()
        for emb in (fusion.rays, fusion.depth):
            assert emb.gate.grad.abs().item() > 0
            grads = [emb.mlp[0].weight.grad.abs().max().item(), emb.mlp[-1].weight.grad.abs().max().item()]
            assert all(g == 0 for g in grads) if step == 0 else all(g > 0 for g in grads), (step, grads)
        opt.step()


def test_feature_scale_is_detached():
    """The vision features get the residual's gradient and nothing more: how loud a prior is, is the
    gate's business, not a reason to rescale the features."""
    fusion, feats, rays, depth = make_fusion()
    fusion.eval()
    feats.requires_grad_(True)
    w = torch.randn_like(feats)
    (fusion(feats, rays, depth) * w).sum().backward()
    torch.testing.assert_close(feats.grad, w, rtol=0, atol=0)


def test_patch_order_matches_siglip():
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    S, p, r, c = 42, 14, 1, 2                                      # 3 x 3 patches; patch (1, 2) -> index 5
    fusion, feats, _, _ = make_fusion(S=S, p=p)
    fusion.eval()
    base = torch.zeros(1, 3, S, S)
    bump = base.clone()
    bump[0, :, r * p + 3, c * p + 7] = 1.0                         # one pixel inside patch (r, c)
    diff = (fusion(feats[:1], bump) - fusion(feats[:1], base))[0].abs().sum(-1)   # (P,)
    assert torch.nonzero(diff).flatten().tolist() == [r * (S // p) + c]
    siglip = SiglipVisionEmbeddings(SiglipVisionConfig(hidden_size=8, image_size=S, patch_size=p, num_channels=3))
    with torch.no_grad():
        sdiff = (siglip(bump) - siglip(base))[0].abs().sum(-1)
    assert torch.nonzero(sdiff).flatten().tolist() == [r * (S // p) + c]


def test_bad_shapes_raise():
    fusion, feats, rays, depth = make_fusion()
    with pytest.raises(ValueError, match="rays"):
        fusion(feats, rays[:, :2])
    with pytest.raises(ValueError, match="disagree"):
        fusion(feats, torch.zeros(len(feats), 3, 28, 28))
    with pytest.raises(ValueError, match="divisible"):
        PriorEmbedder(3, 14, 8)(torch.zeros(1, 3, 30, 30))
