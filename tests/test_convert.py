"""convert.py on the tiny configuration: released pi0 / Pose-VLA state dicts, built here from random
tensors in their exact key layouts, mapped onto PoseVLA.

Catches: a tensor that lands on the wrong module (q/k/v/o, gate/up/down, the two norms, the time
MLP's two layers, state vs action projections, the two prior embedders, fc1 vs fc2), a transpose
that should not be there, a norm weight shifted by one ((1 + w) stored as w in both), embedding
rows not copied or new rows not mean-initialised, an untied LM head, a source tensor silently left
out, and errors that do not name the missing key, the unexpected key or both shapes."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import checkpoint
import convert
from config import tiny_config
from joint import attention_mask, joint_layer
from model import load_checkpoint, time_embedding
from test_model import make_batch, tiny_bins
from tokenizer import build_tiny_tokenizer

N_BASE = len(build_tiny_tokenizer())  # the base text vocabulary the tiny config extends
TEXT = {"new": "paligemma_with_expert.paligemma.model.language_model.",
        "old": "paligemma_with_expert.paligemma.language_model.model."}
VISION = {"new": "paligemma_with_expert.paligemma.model.vision_tower.vision_model.",
          "old": "paligemma_with_expert.paligemma.vision_tower.vision_model."}
PROJ = {"new": "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.",
        "old": "paligemma_with_expert.paligemma.multi_modal_projector.linear."}
HEAD = {"new": "paligemma_with_expert.paligemma.lm_head.weight",
        "old": "paligemma_with_expert.paligemma.language_model.lm_head.weight"}
EXPERT = "paligemma_with_expert.gemma_expert.model."
# name: (key prefix, transformers names, prior embedders, extra vocabulary rows, which tied matrix is
# stored). openpi's and lerobot's new checkpoints keep only the LM head (openpi issue #669, lerobot
# issue #2151), lerobot's JAX conversion wrote both.
LAYOUTS = {
    "openpi": ("", "new", False, 0, "head"),
    "lerobot": ("model.", "new", False, 0, "head"),
    "lerobot-old": ("model.", "old", False, 0, "both"),
    "posevla": ("model.", "old", True, 40, "embed"),
}


def source_state(layout, seed=0):
    """A random state dict in one released layout, at the tiny config's sizes."""
    prefix, names, priors, extra_rows, matrices = LAYOUTS[layout]
    cfg = tiny_config()
    W, We, Dv, p = cfg.text["hidden_size"], cfg.expert_width, cfg.vision["hidden_size"], cfg.vision["patch_size"]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)  # noqa: E731
    norm = lambda n: (torch.randn(n, generator=g) * 0.3).to(torch.bfloat16)  # noqa: E731 (nonzero: 1 + w matters)
    sd = {}
    embed = r(N_BASE + extra_rows, W)
    if matrices in ("embed", "both"):
        sd[TEXT[names] + "embed_tokens.weight"] = embed
    if matrices in ("head", "both"):
        sd[HEAD[names]] = embed.clone()
    sd.update(gemma_layers(cfg, TEXT[names], W, cfg.text["intermediate_size"], r, norm))
    sd.update(gemma_layers(cfg, EXPERT, We, cfg.expert_mlp, r, norm))
    # The expert's unused vocabulary: openpi keeps its LM head (embed_tokens is set to None), lerobot's
    # JAX conversion stores zeros for both.
    sd["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(N_BASE, We)
    if prefix == "model.":
        sd["paligemma_with_expert.gemma_expert.model.embed_tokens.weight"] = torch.zeros(N_BASE, We)
    sd.update(vision_tower(cfg, VISION[names], r))
    sd.update({PROJ[names] + "weight": r(W, Dv), PROJ[names] + "bias": r(W)})
    D = cfg.max_dim
    sd.update({"state_proj.weight": r(We, D), "state_proj.bias": r(We), "action_in_proj.weight": r(We, D),
               "action_in_proj.bias": r(We), "action_time_mlp_in.weight": r(We, 2 * We),
               "action_time_mlp_in.bias": r(We), "action_time_mlp_out.weight": r(We, We),
               "action_time_mlp_out.bias": r(We), "action_out_proj.weight": r(D, We), "action_out_proj.bias": r(D)})
    if priors:
        for what, c in (("rays", 3), ("depth", 2)):
            k = f"paligemma_with_expert.PatchEmbedDust3R_Mlp_{what}.proj.2."
            sd.update({k + "fc1.weight": r(4 * Dv, c * p * p), k + "fc1.bias": r(4 * Dv),
                       k + "fc2.weight": r(Dv, 4 * Dv), k + "fc2.bias": r(Dv)})
    return {(prefix + k if not k.startswith("model.") else k): val for k, val in sd.items()}


def gemma_layers(cfg, base, width, mlp, r, norm):
    """The decoder layers and final norm of one Gemma (the VLM's or the expert's) under `base`;
    `r`, `norm`: the random weight and norm makers of source_state."""
    t, sd = cfg.text, {}
    H, KV, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    for i in range(t["num_hidden_layers"]):
        k = f"{base}layers.{i}."
        sd.update({k + "self_attn.q_proj.weight": r(H * hd, width), k + "self_attn.k_proj.weight": r(KV * hd, width),
                   k + "self_attn.v_proj.weight": r(KV * hd, width), k + "self_attn.o_proj.weight": r(width, H * hd),
                   k + "mlp.gate_proj.weight": r(mlp, width), k + "mlp.up_proj.weight": r(mlp, width),
                   k + "mlp.down_proj.weight": r(width, mlp),
                   k + "input_layernorm.weight": norm(width), k + "post_attention_layernorm.weight": norm(width)})
    sd[base + "norm.weight"] = norm(width)
    return sd


def vision_tower(cfg, vb, r):
    """The SigLIP tower's weights under `vb` (patch and position embeddings, layers, final norm)."""
    v = cfg.vision
    Dv, p, S, M = v["hidden_size"], v["patch_size"], v["image_size"], v["intermediate_size"]
    sd = {vb + "embeddings.patch_embedding.weight": r(Dv, 3, p, p), vb + "embeddings.patch_embedding.bias": r(Dv),
          vb + "embeddings.position_embedding.weight": r((S // p) ** 2, Dv),
          vb + "post_layernorm.weight": 1 + r(Dv), vb + "post_layernorm.bias": r(Dv)}
    for i in range(v["num_hidden_layers"]):
        k = f"{vb}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd.update({k + f"self_attn.{n}.weight": r(Dv, Dv), k + f"self_attn.{n}.bias": r(Dv)})
        sd.update({k + "mlp.fc1.weight": r(M, Dv), k + "mlp.fc1.bias": r(M),
                   k + "mlp.fc2.weight": r(Dv, M), k + "mlp.fc2.bias": r(Dv)})
        for n in ("layer_norm1", "layer_norm2"):
            sd.update({k + f"{n}.weight": 1 + r(Dv), k + f"{n}.bias": r(Dv)})
    return sd


# Pose-VLA's save_pretrained folder holds its tokenizer: PaliGemma's plus its own added tokens, here
# some of its pose tokens first (names we do not have) and then its view markers, in another order
# than ours, so rows matched by position instead of by name would come out wrong.
THEIR_ADDED = [f"<their_xy_{i}>" for i in range(7)] + [f"{s}image{i}>" for i in (2, 1, 0) for s in ("</", "<")]


def write_source(sd, folder, tokenizer=False):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    if tokenizer:
        tok = build_tiny_tokenizer()
        tok.add_tokens(THEIR_ADDED)
        tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """layout -> (source state dict, converted model, tokenizer, report); built once per layout."""
    cache = {}

    def get(layout):
        if layout not in cache:
            sd = source_state(layout)
            src = write_source(sd, str(tmp_path_factory.mktemp(layout)), tokenizer=layout == "posevla")
            model, tok, report = convert.convert(src, "tiny", tiny_bins())
            cache[layout] = (sd, model.eval(), tok, report)
        return cache[layout]
    return get


def f32(t):
    return t.float()


def rms(x, w):
    """Gemma's RMSNorm written out: x / rms(x) * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + f32(w))


def hand_layer(sd, base, i, h, cos, sin, heads, kv, hd):
    """One Gemma decoder layer over one stream with full attention, from the source tensors."""
    w = lambda n: f32(sd[f"{base}layers.{i}.{n}.weight"])  # noqa: E731
    B, T, _ = h.shape
    n = rms(h, w("input_layernorm"))
    q = (n @ w("self_attn.q_proj").T).view(B, T, heads, hd).transpose(1, 2)
    k = (n @ w("self_attn.k_proj").T).view(B, T, kv, hd).transpose(1, 2)
    v = (n @ w("self_attn.v_proj").T).view(B, T, kv, hd).transpose(1, 2)

    def rot(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]
    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v           # (B, H, T, hd)
    h = h + att.transpose(1, 2).reshape(B, T, -1) @ w("self_attn.o_proj").T
    m = rms(h, w("post_attention_layernorm"))
    gate = F.gelu(m @ w("mlp.gate_proj").T, approximate="tanh")
    return h + (gate * (m @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T


@pytest.mark.parametrize("layout", ["openpi", "posevla"])
def test_a_decoder_layer_of_each_stream_matches_a_hand_computation_from_the_source(converted, layout):
    sd, model, _, _ = converted(layout)
    prefix, names = LAYOUTS[layout][:2]
    t = model.cfg.text
    g = torch.Generator().manual_seed(1)
    for stream, base, width in ((0, prefix + TEXT[names], t["hidden_size"]),
                                (1, prefix + EXPERT, model.cfg.expert_width)):
        h = torch.randn(2, 6, width, generator=g)
        pos = torch.arange(6).expand(2, -1)
        cos, sin = model.rotary(h, pos)
        hiddens = [h, None] if stream == 0 else [None, h]
        mask = attention_mask(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.bool))
        with torch.no_grad():
            out = joint_layer((model.lm.layers[2], model.expert_layers[2]), hiddens, cos, sin, mask)[0][stream]
        want = hand_layer(sd, base, 2, h, cos, sin, t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"])
        assert torch.allclose(out, want, atol=1e-4), (layout, stream, (out - want).abs().max())


def test_state_action_time_mlp_and_output_heads_match_hand_computations(converted):
    sd, model, _, _ = converted("lerobot-old")
    P = "model."
    w, b = (lambda n: f32(sd[P + n + ".weight"])), (lambda n: f32(sd[P + n + ".bias"]))
    g = torch.Generator().manual_seed(2)
    D, We, Hz = model.cfg.max_dim, model.cfg.expert_width, model.cfg.action_horizon
    state, x_t, t = torch.randn(2, D, generator=g), torch.randn(2, Hz, D, generator=g), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        tokens, _, _ = model.embed_suffix(state, x_t, t)
    a = x_t @ w("action_in_proj").T + b("action_in_proj")
    te = time_embedding(t, We)[:, None].expand_as(a)
    mlp = F.silu(torch.cat([a, te], -1) @ w("action_time_mlp_in").T + b("action_time_mlp_in"))
    want = torch.cat([(state @ w("state_proj").T + b("state_proj"))[:, None],
                      mlp @ w("action_time_mlp_out").T + b("action_time_mlp_out")], 1)
    assert torch.allclose(tokens, want, atol=1e-5)
    exp_h = torch.randn(2, 1 + Hz, We, generator=g)
    with torch.no_grad():
        vel = model.velocity(exp_h)
    want = rms(exp_h[:, 1:], sd[P + EXPERT + "norm.weight"]) @ w("action_out_proj").T + b("action_out_proj")
    assert torch.allclose(vel, want, atol=1e-5)


def test_prior_embedders_take_the_released_mlps_and_start_with_the_gate_at_zero(converted):
    sd, model, _, report = converted("posevla")
    p = model.cfg.vision["patch_size"]
    g = torch.Generator().manual_seed(3)
    for what, c in (("rays", 3), ("depth", 2)):
        emb = getattr(model.fusion, what)
        assert float(emb.gate.detach()) == 0.0 and f"fusion.{what}.gate" in report["kept_fresh"]
        k = f"model.paligemma_with_expert.PatchEmbedDust3R_Mlp_{what}.proj.2."
        x = torch.randn(2, c, 2 * p, 3 * p, generator=g)
        # The released module: pixel-unshuffle, channels last, Mlp (fc1, GELU, fc2), back, flatten.
        y = F.pixel_unshuffle(x, p).permute(0, 2, 3, 1)
        y = F.gelu(y @ f32(sd[k + "fc1.weight"]).T + f32(sd[k + "fc1.bias"])) @ f32(sd[k + "fc2.weight"]).T
        y = (y + f32(sd[k + "fc2.bias"])).permute(0, 3, 1, 2).flatten(2).transpose(1, 2)   # (N, P, Dv)
        with torch.no_grad():
            emb.gate.fill_(0.7)
            ours = emb(x)
            emb.gate.zero_()
        want = math.tanh(0.7) * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)   # fusion.py's rule
        assert torch.allclose(ours, want, atol=1e-5)


def test_vision_tower_projector_and_tied_embedding(converted):
    sd, model, tok, report = converted("posevla")
    vb, P = "model." + VISION["old"], "model." + PROJ["old"]
    tower = model.vlm.model.vision_tower
    assert torch.equal(tower.embeddings.patch_embedding.weight, f32(sd[vb + "embeddings.patch_embedding.weight"]))
    assert torch.equal(tower.encoder.layers[1].self_attn.k_proj.weight,
                       f32(sd[vb + "encoder.layers.1.self_attn.k_proj.weight"]))
    assert torch.equal(tower.encoder.layers[1].self_attn.q_proj.weight,
                       f32(sd[vb + "encoder.layers.1.self_attn.q_proj.weight"]))
    feats = torch.randn(2, 5, model.cfg.vision["hidden_size"])
    with torch.no_grad():
        proj = model.vlm.model.multi_modal_projector(feats)
    assert torch.allclose(proj, feats @ f32(sd[P + "weight"]).T + f32(sd[P + "bias"]), atol=1e-5)
    E = model.lm.embed_tokens.weight
    src = f32(sd["model." + TEXT["old"] + "embed_tokens.weight"])
    assert torch.equal(E[:N_BASE], src[:N_BASE])
    named = {tok.convert_tokens_to_ids(t): N_BASE + j for j, t in enumerate(THEIR_ADDED) if "image" in t}
    for ours, theirs in named.items():  # <image_i> / </image_i>: the source's trained rows, found by name
        assert torch.equal(E[ours], src[theirs])
    rest = [i for i in range(N_BASE, len(tok)) if i not in named]
    assert torch.allclose(E[rest], src[:N_BASE].mean(0).expand(len(rest), -1), atol=1e-6)
    assert model.vlm.lm_head.weight.data_ptr() == E.data_ptr()
    assert report["embedding_rows"] == {"copied": N_BASE, "copied_by_name": 6, "mean_initialised": len(rest),
                                        "source_rows_dropped": 34,
                                        "from": "model." + TEXT["old"] + "embed_tokens.weight"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_source_tensor_lands_once_or_is_reported_dropped(converted, layout):
    sd, model, _, report = converted(layout)
    ours = {k: v for k, v in model.state_dict().items() if k != "vlm.lm_head.weight"}
    dropped = sum(e["count"] for e in report["dropped"].values())
    matrices = [k for k in sd if k.endswith(("embed_tokens.weight", "lm_head.weight")) and "gemma_expert" not in k]
    used = 0
    for key, value in sd.items():
        if key in matrices or "gemma_expert.model.embed_tokens" in key or "gemma_expert.lm_head" in key:
            continue
        hits = [k for k, o in ours.items() if o.shape == value.shape and torch.equal(o, f32(value))]
        assert len(hits) == 1, (key, hits)
        used += 1
    assert report["mapped"] == used + 1  # + the embedding
    assert dropped == sum("gemma_expert" in k and ("embed_tokens" in k or "lm_head" in k) for k in sd)
    fresh = {k for k in ours if k.startswith("fusion.")} if not LAYOUTS[layout][2] else {
        "fusion.rays.gate", "fusion.depth.gate"}
    assert set(report["kept_fresh"]) == fresh
    assert report["layout"]["priors"] == LAYOUTS[layout][2]


def test_one_error_lists_missing_unexpected_and_both_shapes(tmp_path):
    sd = source_state("openpi")
    q = "paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"
    sd[q] = torch.zeros(256, 129)
    del sd["action_time_mlp_out.bias"]
    sd["time_mlp_in.weight"] = torch.zeros(128, 128)
    with pytest.raises(convert.ConversionError) as e:
        convert.convert(write_source(sd, str(tmp_path / "bad")), "tiny", tiny_bins())
    msg = str(e.value)
    assert "missing" in msg and "action_time_mlp.2.bias" in msg
    assert "unexpected" in msg and "time_mlp_in.weight" in msg and "pi0.5" in msg
    assert f"{q} -> expert_layers.1.self_attn.q_proj.weight: source (256, 129), model (256, 128)" in msg


def test_an_lm_head_that_is_not_the_embedding_and_a_wrong_width_are_refused(tmp_path):
    sd = source_state("lerobot-old")
    sd["model." + HEAD["old"]] = sd["model." + HEAD["old"]] + 1
    with pytest.raises(convert.ConversionError, match="differs from"):
        convert.convert(write_source(sd, str(tmp_path / "a")), "tiny", tiny_bins())
    sd = source_state("openpi")
    sd[HEAD["new"]] = torch.zeros(N_BASE, 255)
    with pytest.raises(convert.ConversionError, match=r"source \(2631, 255\), model \(\d+, 256\)"):
        convert.convert(write_source(sd, str(tmp_path / "b")), "tiny", tiny_bins())


def test_sources_in_shards_bin_files_and_with_old_lerobot_statistics(tmp_path):
    sd = source_state("lerobot-old")
    sd["normalize_inputs.buffer_observation_state.mean"] = torch.zeros(14)
    keys = sorted(sd)
    shards = tmp_path / "shards"
    shards.mkdir()
    for j, part in enumerate((keys[::2], keys[1::2])):
        save_file({k: sd[k].contiguous() for k in part}, str(shards / f"model-0000{j + 1}-of-00002.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save(sd, str(tmp_path / "bin" / "pytorch_model.bin"))
    torch.save({"state_dict": sd}, str(tmp_path / "wrapped.pt"))
    reports = []
    for src in (shards, tmp_path / "bin", tmp_path / "wrapped.pt"):
        assert convert.is_released(str(src))
        reports.append(convert.convert(str(src), "tiny", tiny_bins())[2])
    assert all(r["mapped"] == reports[0]["mapped"] for r in reports)
    assert any("statistics" in why for why in reports[0]["dropped"])
    assert reports[0]["layout"]["name"] == "lerobot pi0 (old transformers names)"


def test_a_truncated_source_file_is_one_error_naming_it(tmp_path):
    """A cut download: the safetensors or torch file's own decoder error becomes errors.read_file's
    line naming the file (not a SafetensorError traceback, which is not a BAD_INPUT type)."""
    for name, writer in (("model.safetensors", lambda p: save_file(source_state("openpi"), p)),
                         ("weights.pt", lambda p: torch.save(source_state("openpi"), p))):
        path = tmp_path / name
        writer(str(path))
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(ValueError, match=rf"{name}: cannot read .* truncated or corrupt"):
            convert.read_source(str(path))


def test_converted_model_samples_actions_generates_and_reloads(converted, tmp_path):
    sd, model, tok, report = converted("posevla")
    batch = make_batch(model, tok)
    batch["rays"] = torch.randn(2, model.cfg.n_views, 3, model.cfg.image_size, model.cfg.image_size)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.max_dim, generator=torch.Generator().manual_seed(0))
    actions = model.sample_actions(batch, noise=noise)
    ids = model.generate(batch, max_new_tokens=5)
    assert actions.shape == noise.shape and torch.isfinite(actions).all() and ids.shape[0] == 2
    src = write_source(sd, str(tmp_path / "src"), tokenizer=True)
    bins = tiny_bins()
    bins.save(str(tmp_path / "bins.json"))
    convert.main([src, "--out", str(tmp_path / "ckpt"), "--config", "tiny", "--bins", str(tmp_path / "bins.json")])
    with open(tmp_path / "ckpt" / "convert.json") as f:
        assert json.load(f)["embedding_rows"]["source_rows_dropped"] == 34
    again, _, _ = load_checkpoint(str(tmp_path / "ckpt"))
    assert torch.equal(again.sample_actions(batch, noise=noise), actions)


def test_init_accepts_a_released_source_and_a_converted_checkpoint(converted, tmp_path):
    sd, model, _, _ = converted("openpi")
    src = write_source(sd, str(tmp_path / "pi0"))
    with open(os.path.join(src, "config.json"), "w") as f:  # a lerobot policy folder has its own config.json
        json.dump({"type": "pi0", "chunk_size": 50}, f)
    args = SimpleNamespace(resume=None, init=src, no_priors=False, seed=0, config="tiny", vlm=None)
    checkpoint.check_start_checkpoints(args)
    started, _, bins = checkpoint.start_model(args, tiny_bins)
    assert bins.n_bins == tiny_bins().n_bins
    for k, v in model.state_dict().items():
        if not k.startswith("fusion."):  # pi0 has no priors: those start fresh, as in any new run
            assert torch.equal(started.state_dict()[k], v), k
    tiny_bins().save(str(tmp_path / "bins.json"))
    convert.main([src, "--out", str(tmp_path / "ckpt"), "--config", "tiny", "--bins", str(tmp_path / "bins.json")])
    args.init = str(tmp_path / "ckpt")
    assert not convert.is_released(args.init)
    checkpoint.check_start_checkpoints(args)
    again = checkpoint.start_model(args, lambda: pytest.fail("a checkpoint brings its own bins"))[0]
    assert torch.equal(again.state_dict()["expert_norm.weight"], model.state_dict()["expert_norm.weight"])
