"""Pose-VLA model: PaliGemma + a pi0-style flow-matching action expert with joint attention.

method.md §5 (paper Sec. III). Reading order:
  1. PoseVLAConfig and its two presets (`tiny` for CPU/tests, `paligemma-3b` for the paper).
  2. attention_mask(): who sees whom in [prefix | labels | state | actions].
  3. joint_layer(): one transformer layer over two streams (VLM tokens, expert tokens) that compute
     their own q/k/v, share ONE scaled_dot_product_attention, then apply their own o_proj/norms/MLP.
  4. PoseVLA: embeds views (+ geometry priors, fusion.py) and text, runs the joint stack, and gives
     - forward(): NTP loss on pose-tuple labels + flow-matching loss on actions,
     - sample_actions(): 10 Euler steps, prefix keys/values computed once,
     - generate(): greedy pose-text decoding with a KV cache.
  5. image_sensitivity(): how much the outputs change when samples swap their views (does the
     model use its images?), logged at every held-out evaluation (trainer.py).
  6. build_model / save / load.

The VLM is `transformers`' PaliGemmaForConditionalGeneration; we reuse its modules (SigLIP tower,
projector, Gemma layers, tied LM head) but run the Gemma layers ourselves so the expert can join
every layer's attention. With no expert tokens the computation is exactly PaliGemma's.
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm, GemmaRotaryEmbedding

from errors import load_json, read_file
from fusion import FusionConfig, GeometryFusion
from tokenizer import PoseBins, build_tiny_tokenizer, extend_tokenizer, value_token_groups


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class PoseVLAConfig:
    # Which of CONFIGS this config was built from, written at build time so a checkpoint names its
    # preset (learning rates follow it, trainer.default_rates). None: built by hand, or a checkpoint
    # from before the field (trainer.config_name then recognises the preset by its shapes).
    preset: str | None = None
    # The PaliGemma config as a plain dict (PaliGemmaConfig.to_dict()): the single source of truth
    # for the VLM's shape, so a checkpoint rebuilds exactly the network it was trained with.
    vlm: dict = field(default_factory=dict)
    # Action expert: same depth/heads/head_dim as the Gemma decoder (joint attention needs that),
    # a smaller width (pi0: 1024 next to Gemma's 2048) because actions carry far less information.
    expert_width: int = 128
    expert_mlp: int = 512
    n_views: int = 3          # RoboTwin: head + two wrist cameras
    max_dim: int = 32         # state/action vectors are zero-padded to this width (pi0)
    action_horizon: int = 16  # RoboTwin recipe: chunk of 16
    flow_steps: int = 10      # Euler steps at inference, dt = -1/flow_steps
    use_rays: bool = True
    use_depth: bool = True
    prior_dropout: float = 0.5  # each prior dropped per sample: works with RGB only or any subset
    # Token ids filled in by build_model from the text tokenizer.
    image_start_ids: list = field(default_factory=list)  # <image{i}>
    image_end_ids: list = field(default_factory=list)    # </image{i}>
    # [first, end) id ranges of the value tokens: <loc>, then each pose quantity's bins (decode_step).
    value_groups: list = field(default_factory=list)
    bos_id: int = 0
    eos_id: int = 1
    pad_id: int = 0

    @property
    def text(self):
        return self.vlm["text_config"]

    @property
    def vision(self):
        return self.vlm["vision_config"]

    @property
    def image_size(self):
        return self.vision["image_size"]

    @property
    def tokens_per_view(self):
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


def paligemma_dict(image_size, patch, v_width, v_depth, v_heads, v_mlp,
                   width, depth, heads, kv_heads, head_dim, mlp, vocab_size=257216, image_token=257152):
    """A PaliGemma config dict from the handful of numbers that define its shape."""
    vision = dict(model_type="siglip_vision_model", image_size=image_size, patch_size=patch,
                  hidden_size=v_width, num_hidden_layers=v_depth, num_attention_heads=v_heads,
                  intermediate_size=v_mlp, vision_use_head=False)
    text = dict(model_type="gemma", hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=mlp,
                vocab_size=vocab_size, hidden_act="gelu_pytorch_tanh")
    return PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=width, hidden_size=width,
                           vocab_size=vocab_size, image_token_index=image_token).to_dict()


def tiny_config(**overrides):
    """A few million parameters: 112 px views with patch 14 (64 tokens each), 4 Gemma layers."""
    vlm = paligemma_dict(image_size=112, patch=14, v_width=128, v_depth=2, v_heads=4, v_mlp=512,
                         width=256, depth=4, heads=4, kv_heads=1, head_dim=64, mlp=1024)
    cfg = PoseVLAConfig(preset="tiny", vlm=vlm, expert_width=128, expert_mlp=512)
    return _override(cfg, overrides)


def paligemma_3b_config(**overrides):
    """google/paligemma-3b-pt-224: SigLIP So400m/14 at 224 px, Gemma 2B; pi0's 300M expert."""
    vlm = paligemma_dict(image_size=224, patch=14, v_width=1152, v_depth=27, v_heads=16, v_mlp=4304,
                         width=2048, depth=18, heads=8, kv_heads=1, head_dim=256, mlp=16384)
    cfg = PoseVLAConfig(preset="paligemma-3b", vlm=vlm, expert_width=1024, expert_mlp=4096)
    return _override(cfg, overrides)


CONFIGS = {"tiny": tiny_config, "paligemma-3b": paligemma_3b_config}


def _override(cfg, overrides):
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown PoseVLAConfig field {k!r}")
        setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------
# Attention mask (method.md §5.3-5.4)

PREFIX, LABEL, STATE, ACTION = 0, 1, 2, 3


def attention_mask(kinds, valid):
    """Boolean (B, T, T) mask, True = query row may attend to key column.

    kinds: (B, T) long in {PREFIX, LABEL, STATE, ACTION}; valid: (B, T) bool (False = padding).
    - prefix (images + prompt) is bidirectional and sees only the prefix;
    - labels are causal among themselves and see the whole prefix;
    - the state token sees the prefix and itself; actions see prefix, state and all actions;
    - the suffix never sees labels (at inference there are none), the prefix never sees the suffix.
    Padding keys are never seen; a padding query sees itself only, so no softmax row is empty.
    """
    q, k = kinds[:, :, None], kinds[:, None, :]                                 # (B, T, 1), (B, 1, T)
    T = kinds.shape[1]
    idx = torch.arange(T, device=kinds.device)
    causal = idx[None, :, None] >= idx[None, None, :]                          # (1, T, T)
    allowed = k == PREFIX
    allowed = allowed | ((q == LABEL) & (k == LABEL) & causal)
    allowed = allowed | ((q >= STATE) & (k == STATE))
    allowed = allowed | ((q == ACTION) & (k == ACTION))
    allowed = allowed & valid[:, None, :] & valid[:, :, None]
    return allowed | torch.eye(T, dtype=torch.bool, device=kinds.device)[None]


def token_positions(kinds, valid):
    """(B, T) RoPE positions of the same sequence: a running count of the real tokens, where the
    suffix skips the labels (it never sees them, and at inference there are none), so a state or
    action token sits at the same position in training and in sampling."""
    text = valid.long().cumsum(1) - 1                                           # prefix and labels
    suffix = (valid & (kinds != LABEL)).long().cumsum(1) - 1                    # labels skipped
    return torch.where(kinds >= STATE, suffix, text).clamp(min=0)


# ----------------------------------------------------------------------------------------------
# One joint layer

def rope(x, cos, sin):
    """Rotary embedding, Gemma's half-split layout. x: (B, H, T, hd); cos/sin: (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def joint_layer(layers, hiddens, cos, sin, mask, past_kv=None):
    """Run one layer over several token streams that share a single attention.

    layers: one GemmaDecoderLayer per stream; hiddens: per stream (B, T_s, W_s) or None (absent).
    cos/sin: (B, T, hd) for the concatenated present tokens; mask: (B, T, T_past + T) bool.
    past_kv: (k, v) each (B, KV, T_past, hd), already rotated (the cached prefix), or None.
    Returns the new hiddens and this layer's (k, v) over past + present tokens.
    """
    qs, ks, vs, lens = [], [], [], []
    for layer, h in zip(layers, hiddens):
        if h is None:
            continue
        attn, (B, T, _) = layer.self_attn, h.shape
        x = layer.input_layernorm(h)
        qs.append(attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2))  # (B, H, T, hd)
        ks.append(attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2))  # (B, KV, T, hd)
        vs.append(attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2))
        lens.append(T)
    q = rope(torch.cat(qs, dim=2), cos, sin)
    k = rope(torch.cat(ks, dim=2), cos, sin)
    v = torch.cat(vs, dim=2)
    if past_kv is not None:
        k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)  # (B, H, T, hd)
    out = out.transpose(1, 2).flatten(2)                                        # (B, T, H*hd)
    outs, pieces = [], iter(out.split(lens, dim=1))
    for layer, h in zip(layers, hiddens):
        if h is None:
            outs.append(None)
            continue
        h = h + layer.self_attn.o_proj(next(pieces))
        outs.append(h + layer.mlp(layer.post_attention_layernorm(h)))
    return outs, (k, v)


def time_embedding(t, dim, min_period=4e-3, max_period=4.0):
    """Sinusoidal embedding of the flow time t (B,) -> (B, dim), periods min_period..max_period."""
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    angle = (2 * math.pi / period)[None] * t.double()[:, None]                 # (B, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(t.dtype)


def last_index(valid):
    """Index of the last True per row of a (B, T) mask (missing views leave holes mid-sequence)."""
    T = valid.shape[1]
    return T - 1 - valid.flip(1).long().argmax(1)                               # (B,)


# ----------------------------------------------------------------------------------------------
# The model

class PoseVLA(nn.Module):
    def __init__(self, cfg: PoseVLAConfig, vlm: PaliGemmaForConditionalGeneration | None = None):
        super().__init__()
        self.cfg = cfg
        self.vlm = vlm if vlm is not None else PaliGemmaForConditionalGeneration(PaliGemmaConfig(**cfg.vlm))
        text = self.vlm.config.text_config
        self.fusion = GeometryFusion(FusionConfig(
            patch_size=cfg.vision["patch_size"], width=cfg.vision["hidden_size"],
            use_rays=cfg.use_rays, use_depth=cfg.use_depth, dropout=cfg.prior_dropout))
        # The expert is a Gemma stack of its own width, heads/head_dim shared with the VLM decoder.
        expert_cfg = GemmaConfig(hidden_size=cfg.expert_width, intermediate_size=cfg.expert_mlp,
                                 num_hidden_layers=text.num_hidden_layers,
                                 num_attention_heads=text.num_attention_heads,
                                 num_key_value_heads=text.num_key_value_heads, head_dim=text.head_dim,
                                 hidden_act=text.hidden_act, rms_norm_eps=text.rms_norm_eps)
        self.expert_layers = nn.ModuleList(GemmaDecoderLayer(expert_cfg, i) for i in range(text.num_hidden_layers))
        self.expert_norm = GemmaRMSNorm(cfg.expert_width, eps=text.rms_norm_eps)
        self._init_expert()
        W = cfg.expert_width
        self.state_proj = nn.Linear(cfg.max_dim, W)
        self.action_in_proj = nn.Linear(cfg.max_dim, W)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * W, W), nn.SiLU(), nn.Linear(W, W))
        self.action_out_proj = nn.Linear(W, cfg.max_dim)
        self.rotary = GemmaRotaryEmbedding(text)
        self.grad_checkpointing = False

    def _init_expert(self):
        std = self.vlm.config.text_config.initializer_range
        for m in self.expert_layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, GemmaRMSNorm):
                nn.init.zeros_(m.weight)  # Gemma's RMSNorm scales by (1 + w): zero = identity

    @property
    def lm(self):
        return self.vlm.model.language_model

    # --- embedding -----------------------------------------------------------------------------
    def embed_views(self, batch):
        """Views -> (B, V*(P+2), W) token embeddings with <image_i> ... </image_i> around each view."""
        images = batch["images"]                                                # (B, V, 3, S, S)
        B, V = images.shape[:2]
        feats = self.vlm.model.vision_tower(images.flatten(0, 1)).last_hidden_state  # (B*V, P, Dv)
        feats = self.fusion(feats,
                            batch["rays"].flatten(0, 1) if "rays" in batch else None,
                            batch["depth"].flatten(0, 1) if "depth" in batch else None,
                            batch["has_rays"].flatten() if "has_rays" in batch else None,
                            batch["has_depth"].flatten() if "has_depth" in batch else None, views=V)
        img = self.vlm.model.multi_modal_projector(feats).view(B, V, -1, self.lm.config.hidden_size)  # (B, V, P, W)
        if "use_teacher" in batch:  # the tiny VLM's decoder phase: ideal tokens for some samples (vlm.Teacher)
            img = torch.where(batch["use_teacher"][:, None, None, None], batch["teacher_tokens"].to(img.dtype), img)
        start = self.lm.embed_tokens(torch.tensor(self.cfg.image_start_ids[:V], device=images.device))  # (V, W)
        end = self.lm.embed_tokens(torch.tensor(self.cfg.image_end_ids[:V], device=images.device))
        tokens = torch.cat([start[None, :, None].expand(B, -1, -1, -1).to(img.dtype), img,
                            end[None, :, None].expand(B, -1, -1, -1).to(img.dtype)], dim=2)  # (B, V, P+2, W)
        valid = batch["view_mask"][:, :, None].expand(-1, -1, tokens.shape[2])  # (B, V, P+2)
        return tokens.flatten(1, 2), valid.flatten(1, 2)

    def embed_prefix(self, batch):
        """Images then prompt: (B, Tp, W) embeddings, (B, Tp) kinds (all PREFIX) and validity."""
        img, img_valid = self.embed_views(batch)
        prompt = self.lm.embed_tokens(batch["prompt_ids"]).to(img.dtype)
        valid = torch.cat([img_valid, batch["prompt_mask"]], dim=1)
        return torch.cat([img, prompt], dim=1), torch.full_like(valid, PREFIX, dtype=torch.long), valid

    def embed_suffix(self, state, x_t, t):
        """State token + H noisy-action tokens conditioned on flow time t: (B, 1+H, We) embeddings,
        (B, 1+H) kinds (STATE, then ACTION) and validity (all real)."""
        s = self.state_proj(state)[:, None]                                     # (B, 1, We)
        a = self.action_in_proj(x_t)                                            # (B, H, We)
        te = time_embedding(t, self.cfg.expert_width).to(a.dtype)[:, None].expand_as(a)  # (B, H, We)
        tokens = torch.cat([s, self.action_time_mlp(torch.cat([a, te], dim=-1))], dim=1)
        B, Ts = tokens.shape[:2]
        kinds = torch.tensor([STATE] + [ACTION] * (Ts - 1), device=tokens.device).expand(B, -1)
        return tokens, kinds, torch.ones(B, Ts, dtype=torch.bool, device=tokens.device)

    # --- the joint stack -----------------------------------------------------------------------
    def run_layers(self, vlm_h, exp_h, positions, mask, past=None):
        """All layers over the VLM stream and the expert stream. positions: (B, T_present).
        past: per-layer cached (k, v) or None. Returns final hiddens and per-layer (k, v)."""
        ref = vlm_h if vlm_h is not None else exp_h
        cos, sin = self.rotary(ref, positions)
        kvs = []
        for i, (lv, le) in enumerate(zip(self.lm.layers, self.expert_layers)):
            args = ((lv, le), (vlm_h, exp_h), cos, sin, mask, None if past is None else past[i])
            if self.grad_checkpointing and self.training:
                (vlm_h, exp_h), kv = torch.utils.checkpoint.checkpoint(joint_layer, *args, use_reentrant=False)
            else:
                (vlm_h, exp_h), kv = joint_layer(*args)
            kvs.append(kv)
        return vlm_h, exp_h, kvs

    # --- training ------------------------------------------------------------------------------
    def joint_forward(self, batch, suffix=None):
        """One pass over [prefix | labels (if any) | suffix (if given)] with the mask of method.md §5.4.
        suffix: embed_suffix's (tokens, kinds, validity) or None. Returns (vlm hiddens over
        prefix+labels, expert hiddens or None, prefix validity)."""
        prefix, p_kinds, p_valid = self.embed_prefix(batch)                     # (B, Tp, W), (B, Tp) x2
        streams, kinds, valid = [prefix], [p_kinds], [p_valid]
        if batch.get("label_ids") is not None:
            streams.append(self.lm.embed_tokens(batch["label_ids"]).to(prefix.dtype))  # (B, Tl, W)
            kinds.append(torch.full_like(batch["label_ids"], LABEL))
            valid.append(batch["label_mask"])
        if suffix is not None:
            kinds.append(suffix[1])
            valid.append(suffix[2])
        kinds, valid = torch.cat(kinds, 1), torch.cat(valid, 1)                 # (B, T)
        vlm_h, exp_h, _ = self.run_layers(torch.cat(streams, 1), None if suffix is None else suffix[0],
                                          token_positions(kinds, valid), attention_mask(kinds, valid))
        return vlm_h, exp_h, p_valid

    def forward(self, batch, action_weight=1.0, noise=None, time=None):
        """Losses for a batch. NTP on `label_ids` when present; flow matching when `actions` present.
        loss = ntp + action_weight * flow (stage 2 uses 10, method.md §6.3).
        Returns dict(loss, ntp_loss?, flow_loss?). noise/time may be given for reproducible tests."""
        suffix = None
        if "actions" in batch:
            actions = batch["actions"]                                          # (B, H, D)
            B = actions.shape[0]
            if noise is None:
                noise = torch.randn_like(actions)
            if time is None:
                beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
                time = (0.999 * beta.sample((B,)) + 0.001).to(actions)           # (B,), t=1 is pure noise
            x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
            suffix = self.embed_suffix(batch["state"], x_t, time)               # (tokens, kinds, validity)
        vlm_h, exp_h, p_valid = self.joint_forward(batch, suffix)
        out, total = {}, 0.0
        if batch.get("label_ids") is not None:
            out["ntp_loss"] = self.ntp_loss(vlm_h, p_valid, batch["label_ids"], batch["label_mask"])
            total = total + out["ntp_loss"]
        if suffix is not None:
            # All max_dim dims are regressed, as in pi0: padded dims carry x_t = t*eps, trivially predictable.
            err = (self.velocity(exp_h).float() - (noise - actions).float()).pow(2).mean(-1)  # (B, H)
            keep = ~batch["is_pad"] if "is_pad" in batch else torch.ones_like(err, dtype=torch.bool)
            out["flow_loss"] = (err * keep).sum() / keep.sum().clamp(min=1)
            total = total + action_weight * out["flow_loss"]
        out["loss"] = total
        return out

    def velocity(self, exp_h):
        """Expert hiddens (B, 1+H, We) -> predicted velocity (B, H, max_dim); token 0 is the state."""
        return self.action_out_proj(self.expert_norm(exp_h[:, 1:]))

    def ntp_loss(self, vlm_h, p_valid, label_ids, label_mask):
        """Cross-entropy of each label token given everything before it."""
        logits = self.label_logits(vlm_h, p_valid)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), label_ids.flatten(), reduction="none")
        m = label_mask.flatten().float()
        return (loss * m).sum() / m.sum().clamp(min=1)

    def label_logits(self, vlm_h, p_valid):
        """(B, Tl, V) logits where position k predicts label k (teacher forcing). The first label is
        predicted from the last real prefix token (prompts are right-padded)."""
        Tp = p_valid.shape[1]
        last = last_index(p_valid)                                              # (B,)
        h_first = vlm_h[torch.arange(len(last)), last][:, None]                 # (B, 1, W)
        return self.logits(torch.cat([h_first, vlm_h[:, Tp:-1]], dim=1))        # (B, Tl, V)

    def logits(self, h):
        return self.vlm.lm_head(self.lm.norm(h))

    # --- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prefix(self, batch):
        """Prefix keys/values for every layer, computed once. Returns (kv list, valid, last hidden)."""
        prefix, kinds, p_valid = self.embed_prefix(batch)
        vlm_h, _, kvs = self.run_layers(prefix, None, token_positions(kinds, p_valid), attention_mask(kinds, p_valid))
        return kvs, p_valid, vlm_h

    @torch.no_grad()
    def denoise_step(self, kvs, p_valid, state, x_t, t):
        """Velocity v(x_t, t) with the cached prefix. x_t: (B, H, D); t: (B,)."""
        suffix, s_kinds, s_valid = self.embed_suffix(state, x_t, t)             # (B, 1+H, We), (B, 1+H) x2
        Ts = suffix.shape[1]
        kinds = torch.cat([torch.full_like(p_valid, PREFIX, dtype=torch.long), s_kinds], 1)  # (B, Tp+Ts)
        valid = torch.cat([p_valid, s_valid], 1)
        mask = attention_mask(kinds, valid)[:, -Ts:]                            # (B, Ts, Tp+Ts)
        _, exp_h, _ = self.run_layers(None, suffix, token_positions(kinds, valid)[:, -Ts:], mask, past=kvs)
        return self.velocity(exp_h)

    @torch.no_grad()
    def sample_actions(self, batch, noise=None, use_cache=True):
        """Integrate the flow from noise (t=1) to actions (t=0): (B, H, max_dim).
        use_cache=False recomputes the prefix at every step (the slow reference, for tests/bench)."""
        B = batch["state"].shape[0]
        x = noise if noise is not None else torch.randn(B, self.cfg.action_horizon, self.cfg.max_dim,
                                                        device=batch["state"].device)
        if use_cache:
            kvs, p_valid, _ = self.encode_prefix(batch)
        dt = -1.0 / self.cfg.flow_steps
        for i in range(self.cfg.flow_steps):
            t = torch.full((B,), 1.0 + i * dt, device=x.device)
            if use_cache:
                v = self.denoise_step(kvs, p_valid, batch["state"], x, t)
            else:
                # Labels, if the batch has any, change nothing here: the suffix never sees them.
                v = self.velocity(self.joint_forward(batch, self.embed_suffix(batch["state"], x, t))[1])
            x = x + dt * v
        return x

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=256, return_scores=False):
        """Greedy pose-text decoding (decode_step) with a KV cache. Returns (B, N) token ids, eos-padded, and with
        return_scores also (B, N) log-probabilities of the chosen tokens (0 after eos), from which
        a caller can score each decoded tuple (e.g. to rank detections for AP)."""
        kvs, p_valid, vlm_h = self.encode_prefix(batch)
        B = p_valid.shape[0]
        logp = self.logits(vlm_h[torch.arange(B), last_index(p_valid)]).float().log_softmax(-1)  # (B, V)
        pos = p_valid.sum(1)                                                    # RoPE position of the next token
        key_valid = p_valid
        ids, scores = [], []
        done = torch.zeros(B, dtype=torch.bool, device=p_valid.device)
        for _ in range(max_new_tokens):
            tok = decode_step(logp, self.cfg.value_groups)                      # (B,)
            best = logp.gather(1, tok[:, None])[:, 0]
            ids.append(torch.where(done, torch.full_like(tok, self.cfg.eos_id), tok))
            scores.append(torch.where(done, torch.zeros_like(best), best))
            done = done | (ids[-1] == self.cfg.eos_id)
            if bool(done.all()):
                break
            h = self.lm.embed_tokens(ids[-1][:, None])                          # (B, 1, W)
            key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=h.device)], 1)
            h, _, kvs = self.run_layers(h, None, pos[:, None], key_valid[:, None, :], past=kvs)
            logp = self.logits(h[:, -1]).float().log_softmax(-1)
            pos = pos + 1
        ids = torch.stack(ids, dim=1)
        return (ids, torch.stack(scores, dim=1)) if return_scores else ids


def decode_step(logp, groups):
    """The next token from (B, V) log-probabilities, greedily, where each group of value tokens (a
    [first, end) id range: the 1024 <loc> bins, a pose quantity's bins) competes as one token with
    its total probability, and wins with its most likely member. Plain argmax would answer
    <no_object> (or any text token) whenever the location is spread over a few neighbouring bins,
    none of them alone as likely: a model that knows roughly where the object is would say it saw
    none (RESULTS.md §2)."""
    grouped = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
    for first, end in groups:
        grouped[first:end] = True
    best, tok = logp.masked_fill(grouped, float("-inf")).max(-1)                # (B,) the best other token
    for first, end in groups:
        part = logp[:, first:end]                                               # (B, n)
        mass = part.logsumexp(-1)                                               # (B,) the group as one token
        wins = mass > best
        best, tok = torch.where(wins, mass, best), torch.where(wins, first + part.argmax(-1), tok)
    return tok


# ----------------------------------------------------------------------------------------------
# Image sensitivity: does the model use its images at all?

VISUAL_KEYS = ("images", "view_mask", "rays", "has_rays", "depth", "has_depth")
SENSITIVITY_KEYS = ("img_tv", "img_tv_loc", "img_action_delta", "img_action_delta_first",
                    "prompt_action_delta", "prompt_action_delta_first")


def roll_samples(batch, keys):
    """The batch with `keys` rolled by one along dim 0 (sample i gets sample i-1's), the rest kept."""
    return {k: v.roll(1, dims=0) if k in keys else v for k, v in batch.items()}


@torch.no_grad()
def image_sensitivity(model, batch, loc_ids=None, seed=0):
    """How much the outputs change when every sample sees another sample's views (images, masks,
    ray and depth priors rolled by one over the batch; prompt, labels and state kept). Floats, NaN
    where the batch has no such part:
      img_tv: mean total-variation distance between the teacher-forced next-token distributions at
        the label positions with the true vs swapped views; img_tv_loc: the same over the positions
        whose target is a <loc> token (loc_ids: their token ids), the location stage 1 must learn;
      img_action_delta: mean L2 change of the sampled chunk (normalised units) for a fixed noise,
        over the chunk (_first: its first step); prompt_action_delta: the same when the prompts are
        swapped instead, the scale of a change the model does react to.
    Runs in eval mode (the previous mode is restored) and draws nothing from the global RNG, so a
    resumed training run stays exact."""
    B = batch["images"].shape[0]
    if B < 2:
        raise ValueError(f"image_sensitivity swaps views between samples: needs a batch of >= 2, got {B}")
    out = dict.fromkeys(SENSITIVITY_KEYS, float("nan"))
    swapped = roll_samples(batch, VISUAL_KEYS)
    was_training = model.training
    model.eval()
    try:
        if batch.get("label_ids") is not None:
            out.update(_label_tv(model, batch, swapped, loc_ids))
        if "actions" in batch:
            out.update(_action_deltas(model, batch, swapped, seed))
    finally:
        model.train(was_training)
    return out


def _label_tv(model, batch, swapped, loc_ids):
    mask = batch["label_mask"]                                                  # (B, Tl)
    probs = []
    for b in (batch, swapped):
        vlm_h, _, p_valid = model.joint_forward(b)
        probs.append(model.label_logits(vlm_h, p_valid)[mask].float().softmax(-1))  # (N, V)
    tv = 0.5 * (probs[0] - probs[1]).abs().sum(-1)                              # (N,)
    out = {"img_tv": tv.mean().item()}
    if loc_ids is not None:
        is_loc = torch.isin(batch["label_ids"][mask], torch.as_tensor(loc_ids, device=tv.device))
        if is_loc.any():
            out["img_tv_loc"] = tv[is_loc].mean().item()
    return out


def _action_deltas(model, batch, swapped, seed):
    actions = batch["actions"]                                                  # (B, H, D)
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(seed)).to(actions)
    # Only the dims the data fills: zero-padding up to max_dim (and constant dims) is 0 in every sample.
    dims = actions.flatten(0, 1).abs().amax(0) > 0                              # (D,)
    base = model.sample_actions(batch, noise=noise)[..., dims].float()          # (B, H, d)
    out = {}
    for name, other in (("img", swapped), ("prompt", roll_samples(batch, ("prompt_ids", "prompt_mask")))):
        step = (model.sample_actions(other, noise=noise)[..., dims].float() - base).norm(dim=-1)  # (B, H)
        out[f"{name}_action_delta"] = step.mean().item()
        out[f"{name}_action_delta_first"] = step[:, 0].mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# Building, saving, loading

def attach_tokenizer(cfg, text_tokenizer, bins):
    """Add the pose tokens to the text tokenizer and record the ids the model needs in cfg."""
    extend_tokenizer(text_tokenizer, bins, cfg.n_views)
    if "<image>" not in text_tokenizer.get_vocab():  # PaliGemma's image placeholder (tiny tokenizer lacks it)
        text_tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]},
                                          replace_extra_special_tokens=False)
    ids = text_tokenizer.convert_tokens_to_ids
    cfg.image_start_ids = [ids(f"<image{i}>") for i in range(cfg.n_views)]
    cfg.image_end_ids = [ids(f"</image{i}>") for i in range(cfg.n_views)]
    cfg.bos_id, cfg.eos_id = text_tokenizer.bos_token_id, text_tokenizer.eos_token_id
    cfg.pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else cfg.eos_id
    cfg.value_groups = value_group_ranges(text_tokenizer, bins)
    return text_tokenizer


def value_group_ranges(text_tokenizer, bins):
    """[first, end) token-id range of each value-token group (tokenizer.value_token_groups)."""
    ids, out = text_tokenizer.convert_tokens_to_ids, []
    for group in value_token_groups(bins):
        first, last = ids(group[0]), ids(group[-1])
        if [ids(t) for t in group] != list(range(first, last + 1)):
            raise ValueError(f"tokens {group[0]}..{group[-1]} do not have consecutive ids in the text tokenizer")
        out.append([first, last + 1])
    return out


def init_new_tokens(vlm, first_new, n_tokens):
    """Give token ids first_new..n_tokens-1 (just added to the tokenizer) embedding rows equal to
    the mean of the rows of the original ids 0..first_new-1, growing the tied matrix if needed.
    PaliGemma's matrix has spare rows past its tokenizer (257216 vs ~257152), so some new ids land
    inside the old matrix: those rows are re-initialised too."""
    if n_tokens <= first_new:
        return
    mean = vlm.get_input_embeddings().weight.detach()[:first_new].mean(0)
    if n_tokens > vlm.get_input_embeddings().weight.shape[0]:
        vlm.resize_token_embeddings(n_tokens, mean_resizing=False)
        vlm.config.text_config.vocab_size = vlm.config.vocab_size = n_tokens
    with torch.no_grad():
        vlm.get_input_embeddings().weight[first_new:n_tokens] = mean
    if vlm.lm_head.weight.data_ptr() != vlm.get_input_embeddings().weight.data_ptr():
        vlm.tie_weights()


def build_model(config="tiny", bins=None, vlm_path=None, tokenizer_dir=None, **overrides):
    """A fresh PoseVLA and its text tokenizer.

    config: "tiny" | "paligemma-3b". vlm_path: a local PaliGemma directory (`save_pretrained`
    layout): its config, weights and tokenizer are used. Without it, `tiny` builds an offline
    tokenizer (tokenizer.py) and random weights; the full config needs a tokenizer directory.
    bins: PoseBins defining the pose vocabulary (fitted from data, data.py).
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {sorted(CONFIGS)}")
    if bins is None:
        raise ValueError("build_model needs PoseBins (fit them from the training data: data.py fit-bins)")
    cfg = CONFIGS[config](**overrides)
    if vlm_path is not None:
        if not os.path.isfile(os.path.join(vlm_path, "config.json")):
            raise FileNotFoundError(f"{vlm_path}: no config.json; expected a PaliGemma directory written by "
                                    "save_pretrained")
        vlm = PaliGemmaForConditionalGeneration.from_pretrained(vlm_path, dtype=torch.float32)
        cfg.vlm = vlm.config.to_dict()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir or vlm_path)
    else:
        vlm = None
        if tokenizer_dir is not None:
            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        elif config == "tiny":
            tok = build_tiny_tokenizer()
        else:
            raise ValueError("the paligemma-3b config needs --vlm DIR (or a tokenizer directory): "
                             "PaliGemma's tokenizer cannot be built offline")
    n_original = len(tok)
    attach_tokenizer(cfg, tok, bins)
    if vlm is None:
        n = max(len(tok), cfg.vlm["text_config"]["vocab_size"]) if config != "tiny" else len(tok)
        cfg.vlm["text_config"]["vocab_size"] = cfg.vlm["vocab_size"] = n
        if config == "tiny":
            cfg.vlm["image_token_index"] = tok.convert_tokens_to_ids("<image>")
        model = PoseVLA(cfg)
    else:
        init_new_tokens(vlm, n_original, len(tok))
        cfg.vlm = vlm.config.to_dict()
        model = PoseVLA(cfg, vlm)
    return model, tok


def save_checkpoint(path, model, text_tokenizer, bins, extra=None):
    """Write weights (safetensors), config JSON, tokenizer, bin edges and `extra` to `path`
    atomically: everything goes to `path.tmp` first, then one rename. `extra`: file name -> a JSON
    object, or a function that writes that file given its path (checkpoint.save: train_state.pt)."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "vlm.lm_head.weight"}
    save_file(state, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(asdict(model.cfg), f, indent=1)
    text_tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    bins.save(os.path.join(tmp, "bins.json"))
    for name, obj in (extra or {}).items():
        if callable(obj):
            obj(os.path.join(tmp, name))
            continue
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=1)
    if os.path.exists(path):
        old = path.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


def non_finite(state):
    """Names of the floating-point tensors of a state dict that hold NaN/inf: a checkpoint with any
    is neither written (checkpoint.save) nor loaded."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def load_checkpoint(path, map_location="cpu"):
    """Inverse of save_checkpoint: returns (model, text_tokenizer, bins). Every file is read through
    errors.read_file; weights that do not fit config.json, or hold NaN/inf, are refused."""
    for name in ("config.json", "model.safetensors", "bins.json", "tokenizer"):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: missing {name}; not a Pose-VLA checkpoint directory")
    cfg = read_file(os.path.join(path, "config.json"), "a PoseVLAConfig (model.save_checkpoint)",
                    lambda p: PoseVLAConfig(**load_json(p)))
    model = PoseVLA(cfg)
    weights = os.path.join(path, "model.safetensors")
    state = read_file(weights, "safetensors weights", lambda p: load_file(p, device=str(map_location)))
    bad = non_finite(state)
    if bad:
        raise ValueError(f"{weights}: {len(bad)} tensors hold NaN/inf (e.g. {bad[:3]}); not a usable checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ from config.json's
        raise ValueError(f"{weights} does not match config.json: {str(e).splitlines()[-1].strip()}") from e
    missing = [k for k in missing if k != "vlm.lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match config.json: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.vlm.tie_weights()
    tok = read_file(os.path.join(path, "tokenizer"), "a text tokenizer folder (save_pretrained)",
                    AutoTokenizer.from_pretrained)
    bins = PoseBins.load(os.path.join(path, "bins.json"))
    cfg.value_groups = cfg.value_groups or value_group_ranges(tok, bins)  # checkpoints from before the field
    return model, tok, bins


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
