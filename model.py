"""Pose-VLA model: PaliGemma + a pi0-style flow-matching action expert with joint attention.

method.md §5 (paper Sec. III). The config and its presets are in config.py, the attention mask
and the joint layer in joint.py. Reading order:
  1. time_embedding(), last_index(): small helpers of the model.
  2. PoseVLA: embeds views (+ geometry priors, fusion.py) and text, runs the joint stack, and gives
     - forward(): NTP loss on pose-tuple labels + flow-matching loss on actions,
     - sample_actions(): 10 Euler steps (integrate), prefix keys/values computed once,
     - generate(): greedy pose-text decoding (decode_step) with a KV cache.
  3. build_model / save / load.
Whether a trained model uses its images is measured in sensitivity.py.

The VLM is `transformers`' PaliGemmaForConditionalGeneration; we reuse its modules (SigLIP tower,
projector, Gemma layers, tied LM head) but run the Gemma layers ourselves so the expert can join
every layer's attention. With no expert tokens the computation is exactly PaliGemma's.
"""
import json
import math
import os
import shutil
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm, GemmaRotaryEmbedding

from config import CONFIGS, PoseVLAConfig
from errors import load_json, read_file
from fusion import FusionConfig, GeometryFusion
from joint import ACTION, LABEL, PREFIX, STATE, attention_mask, joint_layer, token_positions
from tokenizer import PoseBins, build_tiny_tokenizer, extend_tokenizer, value_token_groups


# ----------------------------------------------------------------------------------------------
# Flow time, last real token

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
        B, state = batch["state"].shape[0], batch["state"]
        x = noise if noise is not None else torch.randn(B, self.cfg.action_horizon, self.cfg.max_dim,
                                                        device=state.device)
        if use_cache:
            kvs, p_valid, _ = self.encode_prefix(batch)
            return self.integrate(x, lambda x_t, t: self.denoise_step(kvs, p_valid, state, x_t, t))
        # Labels, if the batch has any, change nothing here: the suffix never sees them.
        return self.integrate(
            x, lambda x_t, t: self.velocity(self.joint_forward(batch, self.embed_suffix(state, x_t, t))[1]))

    def integrate(self, noise, velocity):
        """Euler-integrate the flow from noise (t=1) to actions (t=0): flow_steps steps of
        dt = -1/flow_steps. velocity(x_t, t) -> v, x_t (B, H, D), t (B,). Shared by sample_actions
        and fast.FastSampler (whose compiled graph unrolls the loop: the steps are Python constants)."""
        x, dt = noise, -1.0 / self.cfg.flow_steps
        for i in range(self.cfg.flow_steps):
            t = torch.full((x.shape[0],), 1.0 + i * dt, device=x.device)        # (B,)
            x = x + dt * velocity(x, t)                                         # (B, H, D)
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
