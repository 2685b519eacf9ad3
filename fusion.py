"""Geometry priors (camera rays, metric depth) and their additive fusion onto SigLIP features
(method.md §4; paper Sec. III-C).

Reading order:
  1. letterbox(): image (+ depth) -> the model's square size, aspect kept, zero padding, K updated;
     project() / box_corners(): camera-frame points -> pixels with that K, an oriented box's corners;
  2. image_to_tensor(), ray_map(), depth_prior(): the dense per-view inputs (numpy, data side);
  3. PriorEmbedder: pixel-unshuffle by the ViT patch size, an MLP, RMS-normalised per patch and
     times a learned gate tanh(g) (g = 0 at init) -> one vector per patch, RMS below 1;
  4. GeometryFusion: adds each embedded prior, scaled by the per-token RMS of the vision-tower
     output, so a prior adds at most the feature norm to any token (both together at most 2x)
     and exactly nothing at init; with modality dropout.

Pixel convention (OpenCV, and the one K uses): integer pixel coordinates are pixel *centres*, so
pixel u covers [u - 0.5, u + 0.5). Resizing by `scale` maps the continuous edge coordinate
u + 0.5 to (u + 0.5) * scale, i.e. the centre u to u * scale + 0.5 * (scale - 1); padding then
shifts by an integer number of pixels. Hence input pixel (u, v) lands on
(u * scale + ox, v * scale + oy) with (ox, oy) = Letterboxed.offset, and
K' = [[s, 0, ox], [0, s, oy], [0, 0, 1]] @ K projects every 3D point exactly there.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# ----------------------------------------------------------------------------------------------
# Letterboxing and dense priors (numpy)

@dataclass
class Letterboxed:
    image: np.ndarray          # (S, S, 3) uint8, zero padding
    K: np.ndarray              # (3, 3) float64, intrinsics of the letterboxed image
    depth: np.ndarray | None   # (S, S) float32 metres, 0 (invalid) in the padding
    valid: np.ndarray          # (S, S) bool, False in the padding
    scale: float
    offset: tuple              # (ox, oy): input pixel (u, v) -> (u * scale + ox, v * scale + oy)


def letterbox(image, K, size, depth=None) -> Letterboxed:
    """Resize `image` (H, W, 3) uint8 so its long side is `size`, pad to (size, size), centred.

    The resized content is exactly `scale` times the source (PIL resamples a source box of
    nw/scale x nh/scale pixels, which drops less than one output pixel at the far edge when
    H*scale or W*scale is not an integer), so the mapping in the module docstring is exact.
    Depth (H, W) metres is resized nearest-neighbour (never blends a foreground and a
    background depth into a value that exists nowhere).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"letterbox: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"letterbox: expected K of shape (3, 3), got {K.shape}")
    H, W = image.shape[:2]
    scale = size / max(H, W)
    nw = max(1, min(size, int(np.floor(W * scale + 1e-6))))
    nh = max(1, min(size, int(np.floor(H * scale + 1e-6))))
    px, py = (size - nw) // 2, (size - nh) // 2
    box = (0.0, 0.0, min(W, nw / scale), min(H, nh / scale))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[py:py + nh, px:px + nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR, box=box))
    valid = np.zeros((size, size), dtype=bool)
    valid[py:py + nh, px:px + nw] = True
    ox, oy = px + 0.5 * (scale - 1), py + 0.5 * (scale - 1)
    K_new = np.array([[scale, 0, ox], [0, scale, oy], [0, 0, 1]]) @ K

    depth_out = None
    if depth is not None:
        depth = np.asarray(depth, dtype=np.float32)
        if depth.shape != (H, W):
            raise ValueError(f"letterbox: depth shape {depth.shape} does not match the image's {(H, W)}")
        cols = np.minimum(np.floor((np.arange(nw) + 0.5) / scale).astype(int), W - 1)  # source pixel per output column
        rows = np.minimum(np.floor((np.arange(nh) + 0.5) / scale).astype(int), H - 1)
        depth_out = np.zeros((size, size), dtype=np.float32)
        depth_out[py:py + nh, px:px + nw] = depth[rows[:, None], cols[None, :]]
    return Letterboxed(out, K_new, depth_out, valid, float(scale), (float(ox), float(oy)))


def box_corners(t, R, size):
    """(8, 3) corners of an oriented box in the camera frame."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    return (signs * np.asarray(size) / 2) @ np.asarray(R).T + np.asarray(t)


def project(K, points):
    """(N, 3) camera-frame points -> (N, 2) pixels."""
    p = np.asarray(points) @ np.asarray(K).T
    return p[:, :2] / p[:, 2:3]


def image_to_tensor(image):
    """(S, S, 3) uint8 -> (3, S, S) float32 in [-1, 1] (SigLIP's normalisation)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_to_tensor: expected an (S, S, 3) uint8 image, got {image.shape} {image.dtype}")
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def ray_map(K, valid):
    """(3, H, W) float32: K^-1 [u, v, 1] = ((u - cx)/fx, (v - cy)/fy, 1) at pixel centres
    (a skew term, if any, is included), zero where `valid` (H, W) is False."""
    K = np.asarray(K, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if K.shape != (3, 3) or valid.ndim != 2:
        raise ValueError(f"ray_map: expected K (3, 3) and valid (H, W), got {K.shape} and {valid.shape}")
    H, W = valid.shape
    y = (np.arange(H, dtype=np.float64)[:, None] - K[1, 2]) / K[1, 1]                 # (H, 1)
    x = (np.arange(W, dtype=np.float64)[None, :] - K[0, 2] - K[0, 1] * y) / K[0, 0]    # (H, W)
    rays = np.stack(np.broadcast_arrays(x, y, np.ones((H, W))))                        # (3, H, W)
    return (rays * valid).astype(np.float32)


def depth_prior(depth, valid=None):
    """(2, H, W) float32: metric depth with invalid pixels set to 0, and the validity mask.
    Invalid: 0, negative, NaN, inf, and wherever `valid` (e.g. the letterbox padding) is False."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth_prior: expected depth (H, W), got {depth.shape}")
    ok = np.isfinite(depth) & (depth > 0)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != depth.shape:
            raise ValueError(f"depth_prior: valid shape {valid.shape} does not match depth's {depth.shape}")
        ok &= valid
    return np.stack([np.where(ok, depth, 0.0), ok]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Fusion (torch)

@dataclass
class FusionConfig:
    patch_size: int = 14      # SigLIP /14: one prior vector per ViT patch token
    width: int = 1152         # Dv, the vision-tower output width (So400m: 1152)
    dropout: float = 0.5      # paper: each prior dropped independently per sample, p = 0.5 (train only)
    use_rays: bool = True     # build the ray-map embedder
    use_depth: bool = True    # build the depth embedder


class PriorEmbedder(nn.Module):
    """(N, C, S, S) dense prior -> (N, P, Dv), P = (S/p)^2 in row-major patch order (SigLIP's order:
    its patch Conv2d output flattened over (rows, cols)). Each vector is the MLP output normalised
    to RMS 1, times tanh(gate): the MLP chooses the direction, the gate alone the size (|.| < 1)."""

    def __init__(self, in_channels, patch_size, width):
        super().__init__()
        self.patch_size = patch_size
        self.mlp = nn.Sequential(nn.Linear(in_channels * patch_size ** 2, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        # tanh(0) = 0: at step 0 the prior adds exactly 0, so a fine-tune from PaliGemma starts from
        # the pretrained vision features unchanged (ControlNet-style). The gate's gradient is the
        # normalised MLP output, so the last layer keeps its random init (zeroed, nothing would
        # train); the MLP gets gradient once the first step has moved the gate off 0. Shape (1,),
        # not a scalar: FSDP's fully_shard refuses 0-dim parameters.
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        p = self.patch_size
        if x.ndim != 4 or x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"PriorEmbedder: expected (N, C, S, S) with S divisible by {p}, got {tuple(x.shape)}")
        patches = F.pixel_unshuffle(x, p)              # (N, C*p*p, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)   # (N, P, C*p*p), row-major patches
        e = self.mlp(patches).float()                  # (N, P, Dv)
        e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMS 1 per patch, whatever the weights' size
        return torch.tanh(self.gate.float()) * e       # (N, P, Dv)


class GeometryFusion(nn.Module):
    """feats (N, P, Dv) + r * (embed(rays) + embed(depth)), each prior only for the samples that have
    it; r (N, P, 1) is the per-token RMS of feats, so each prior adds at most |feats| per token (the
    unnormalised MLP outputs had grown to ~7x the RGB features, drowning the image content)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.rays = PriorEmbedder(3, cfg.patch_size, cfg.width) if cfg.use_rays else None
        self.depth = PriorEmbedder(2, cfg.patch_size, cfg.width) if cfg.use_depth else None

    def forward(self, feats, rays=None, depth=None, has_rays=None, has_depth=None, views=1):
        """rays (N, 3, S, S), depth (N, 2, S, S), has_* (N,) bool; None = absent for every sample.
        views: N = samples * views, consecutive rows being one sample's views; dropout decides per
        sample (method.md §4.4), so all views of a sample keep or lose a prior together."""
        # Detached: the RMS measures the RGB features, and the gate alone decides how loud a prior
        # is; with gradient through it the vision tower would also be pushed to rescale its
        # features just to make a prior louder or quieter. Taken before either prior is added, so
        # depth is bounded by the RGB features, not by RGB + rays.
        scale = feats.detach().float().pow(2).mean(-1, keepdim=True).sqrt()  # (N, P, 1)
        feats = self._add(feats, scale, self.rays, rays, has_rays, "rays", 3, views)
        return self._add(feats, scale, self.depth, depth, has_depth, "depth", 2, views)

    def _add(self, feats, scale, embedder, prior, has, what, channels, views):
        if embedder is None or prior is None:
            return feats
        N = feats.shape[0]
        if prior.ndim != 4 or prior.shape[:2] != (N, channels):
            raise ValueError(f"GeometryFusion: {what} must be ({N}, {channels}, S, S), got {tuple(prior.shape)}")
        keep = torch.ones(N, dtype=torch.bool, device=feats.device) if has is None else has.to(feats.device, torch.bool)
        if self.training and self.cfg.dropout > 0:
            drawn = torch.rand(N // views, device=feats.device) >= self.cfg.dropout  # (samples,), per prior
            keep = keep & drawn.repeat_interleave(views)                        # (N,)
        # Dropped samples feed zeros, so garbage (NaN) in an absent prior cannot reach the gradients.
        prior = torch.where(keep[:, None, None, None], prior, torch.zeros((), dtype=prior.dtype, device=prior.device))
        emb = embedder(prior.to(embedder.mlp[0].weight.dtype))  # (N, P, Dv)
        if emb.shape != feats.shape:
            raise ValueError(f"GeometryFusion: {what} gives {tuple(emb.shape)} patch features but the vision "
                             f"tower gave {tuple(feats.shape)}; image size / patch size / width disagree")
        return torch.where(keep[:, None, None], feats + (scale * emb).to(feats.dtype), feats)  # (N, P, Dv)
