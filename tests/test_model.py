"""model.py on the tiny configuration: mask, joint attention, PaliGemma equivalence, caches, I/O,
image sensitivity.

Catches: actions that can see the labels (or a prefix that sees the suffix), text logits that
differ from transformers' PaliGemma, a prefix cache or KV-cached decoding that changes the result,
new token rows not mean-initialised or an untied LM head, a flipped velocity target or flow time,
a checkpoint that does not reload bit-exactly, and an image probe that cannot tell a blind model."""
import numpy as np
import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration

from config import paligemma_3b_config, paligemma_dict
from joint import ACTION, LABEL, PREFIX, STATE, attention_mask, token_positions
from model import PoseVLA, build_model, count_parameters, decode_step, last_index, load_checkpoint, save_checkpoint
from sensitivity import image_sensitivity
from tokenizer import PoseBins, build_tiny_tokenizer, loc_tokens


def tiny_bins(n_bins=32):
    rng = np.random.default_rng(0)
    t = np.stack([rng.uniform(-0.5, 0.5, 500), rng.uniform(-0.5, 0.5, 500), rng.uniform(0.3, 2.0, 500)], 1)
    return PoseBins.fit(t, rng.uniform(0.02, 0.3, (500, 3)), n_bins=n_bins)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = build_model("tiny", bins=tiny_bins())
    return model.eval(), tok


def make_batch(model, tok, B=2, labels=("<image0>red cube</image0>", "<image0></image0>"), actions=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg, S, V = model.cfg, model.cfg.image_size, model.cfg.n_views
    prompts = [tok(tok.bos_token + p + "\n", add_special_tokens=False).input_ids
               for p in ["detect the red cube", "pick up the blue can please"][:B]]
    Lp = max(map(len, prompts))
    batch = {
        "images": torch.rand(B, V, 3, S, S, generator=g) * 2 - 1,
        "view_mask": torch.tensor([[True] * V, [True, True, False]][:B]),
        "prompt_ids": torch.tensor([p + [cfg.pad_id] * (Lp - len(p)) for p in prompts]),
        "prompt_mask": torch.tensor([[1] * len(p) + [0] * (Lp - len(p)) for p in prompts], dtype=torch.bool),
    }
    if labels:
        ids = [tok(t, add_special_tokens=False).input_ids + [cfg.eos_id] for t in labels[:B]]
        L = max(map(len, ids))
        batch["label_ids"] = torch.tensor([i + [cfg.pad_id] * (L - len(i)) for i in ids])
        batch["label_mask"] = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids], dtype=torch.bool)
    if actions:
        H = cfg.action_horizon
        batch["state"] = torch.randn(B, cfg.max_dim, generator=g)
        batch["actions"] = torch.randn(B, H, cfg.max_dim, generator=g)
        batch["is_pad"] = torch.zeros(B, H, dtype=torch.bool)
        batch["is_pad"][1, H - 3:] = True
    return batch


def test_token_positions_count_real_tokens_and_the_suffix_skips_labels():
    # prefix of 3 with one padding slot, 2 labels (one padding), state, 2 actions
    kinds = torch.tensor([[PREFIX, PREFIX, PREFIX, LABEL, LABEL, STATE, ACTION, ACTION]])
    valid = torch.tensor([[True, False, True, True, False, True, True, True]])
    assert token_positions(kinds, valid).tolist() == [[0, 0, 1, 2, 2, 2, 3, 4]]


def test_attention_mask_matches_hand_written():
    # [img, img, prompt, pad | label, label | state | action, action]
    kinds = torch.tensor([[PREFIX, PREFIX, PREFIX, PREFIX, LABEL, LABEL, STATE, ACTION, ACTION]])
    valid = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([
        # i  i  p  _  l  l  s  a  a
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # image
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # image
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # prompt
        [0, 0, 0, 1, 0, 0, 0, 0, 0],  # padding: only itself (keeps softmax finite)
        [1, 1, 1, 0, 1, 0, 0, 0, 0],  # label 0: prefix + causal labels
        [1, 1, 1, 0, 1, 1, 0, 0, 0],  # label 1
        [1, 1, 1, 0, 0, 0, 1, 0, 0],  # state: prefix + itself, never labels
        [1, 1, 1, 0, 0, 0, 1, 1, 1],  # action: prefix + state + all actions
        [1, 1, 1, 0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(attention_mask(kinds, valid)[0], expected)


def test_prefix_blind_to_suffix_and_flow_blind_to_labels(tiny):
    model, tok = tiny
    batch = make_batch(model, tok)
    noise, time = torch.randn_like(batch["actions"]), torch.tensor([0.3, 0.8])
    base = model(batch, noise=noise, time=time)
    other_labels = dict(batch, label_ids=torch.randint(5, 50, batch["label_ids"].shape))
    assert torch.equal(model(other_labels, noise=noise, time=time)["flow_loss"], base["flow_loss"])
    assert not torch.equal(model(other_labels, noise=noise, time=time)["ntp_loss"], base["ntp_loss"])
    # prefix hidden states: identical whatever the suffix (other state, other actions)
    other_suffix = dict(batch, state=torch.randn_like(batch["state"]), actions=torch.randn_like(batch["actions"]))
    assert torch.equal(model(other_suffix, noise=noise, time=time)["ntp_loss"], base["ntp_loss"])
    no_labels = {k: v for k, v in batch.items() if k not in ("label_ids", "label_mask")}
    _, _, h_prefix_only = model.encode_prefix(no_labels)
    for state, x in [(batch["state"], noise), (torch.randn_like(batch["state"]), torch.randn_like(noise))]:
        h, _, _ = model.joint_forward(no_labels, model.embed_suffix(state, x, time))
        torch.testing.assert_close(h, h_prefix_only, rtol=1e-6, atol=1e-6)


def hf_inputs(model, tok, batch):
    """The same sequence as PaliGemma's own input: <image> placeholders where our view tokens are."""
    cfg, P = model.cfg, model.cfg.tokens_per_view
    image_id = cfg.vlm["image_token_index"]
    ids = []
    for i in range(cfg.n_views):
        ids += [cfg.image_start_ids[i]] + [image_id] * P + [cfg.image_end_ids[i]]
    b = 0
    n_prompt = int(batch["prompt_mask"][b].sum())
    prompt = batch["prompt_ids"][b, :n_prompt].tolist()
    labels = batch["label_ids"][b].tolist()
    input_ids = torch.tensor([ids + prompt + labels])
    token_type = torch.tensor([[0] * (len(ids) + len(prompt)) + [1] * len(labels)])
    return input_ids, token_type


def our_text_logits(model, batch):
    """Logits at every image/prompt/label position with the expert out of the picture."""
    return model.logits(model.joint_forward(batch)[0])


def assert_matches_paligemma(model, tok, hf):
    batch = make_batch(model, tok, B=1, actions=False)
    input_ids, token_type = hf_inputs(model, tok, batch)
    pixel_values = batch["images"][0]
    with torch.no_grad():
        ours = our_text_logits(model, batch)
        # PaliGemma positions start at 1, ours at 0: RoPE is relative, so logits must agree anyway.
        theirs = hf(input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_text_logits_equal_transformers_paligemma(tiny):
    model, tok = tiny
    hf = PaliGemmaForConditionalGeneration(model.vlm.config).eval()
    hf.load_state_dict(model.vlm.state_dict())
    assert_matches_paligemma(model, tok, hf)


def test_vlm_directory_loads_with_identical_logits(tiny, tmp_path):
    model, tok = tiny
    vlm_dir = tmp_path / "paligemma"
    model.vlm.save_pretrained(vlm_dir)
    tok.save_pretrained(vlm_dir)
    loaded, tok2 = build_model("tiny", bins=tiny_bins(), vlm_path=str(vlm_dir))
    assert torch.equal(loaded.vlm.get_input_embeddings().weight, model.vlm.get_input_embeddings().weight)
    assert loaded.vlm.lm_head.weight.data_ptr() == loaded.vlm.get_input_embeddings().weight.data_ptr()
    hf = PaliGemmaForConditionalGeneration.from_pretrained(vlm_dir).eval()
    assert_matches_paligemma(loaded.eval(), tok2, hf)


@pytest.mark.parametrize("spare_rows", [0, 40])
def test_new_token_rows_are_mean_initialised(tmp_path, spare_rows):
    """A PaliGemma whose tokenizer lacks the pose tokens: every new id gets the mean row, also the
    ids that land in spare rows the matrix already had (PaliGemma: 257216 rows, ~257152 tokens)."""
    torch.manual_seed(0)
    model, _ = build_model("tiny", bins=tiny_bins(16))
    base_tok = build_tiny_tokenizer()
    n = len(base_tok)
    cfg = model.vlm.config
    cfg.text_config.vocab_size = cfg.vocab_size = n + spare_rows
    hf = PaliGemmaForConditionalGeneration(cfg)
    vlm_dir = tmp_path / "plain"
    hf.save_pretrained(vlm_dir)
    base_tok.save_pretrained(vlm_dir)
    old = hf.get_input_embeddings().weight.detach().clone()
    grown, tok2 = build_model("tiny", bins=tiny_bins(16), vlm_path=str(vlm_dir))
    W = grown.vlm.get_input_embeddings().weight
    assert W.shape[0] == len(tok2) > n + spare_rows
    assert torch.equal(W[:n], old[:n])
    torch.testing.assert_close(W[n:], old[:n].mean(0).expand(W.shape[0] - n, -1))
    assert grown.vlm.lm_head.weight.data_ptr() == W.data_ptr()


def test_cached_sampling_equals_naive(tiny):
    model, tok = tiny
    batch = make_batch(model, tok, labels=None)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.max_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.sample_actions(batch, noise=noise),
                                   model.sample_actions(batch, noise=noise, use_cache=False),
                                   rtol=1e-4, atol=1e-5)


def test_decode_step_lets_a_value_group_compete_as_one_token():
    # vocabulary: 3 text tokens (0-2), a 4-token value group (3-6), a 2-token group (7-8)
    groups = [[3, 7], [7, 9]]
    p = torch.tensor([[0.30, 0.05, 0.05, 0.15, 0.25, 0.15, 0.05, 0.0, 0.0],  # group 0.60 > text 0.30
                      [0.50, 0.05, 0.05, 0.10, 0.10, 0.10, 0.05, 0.05, 0.0],  # text 0.50 > group 0.35
                      [0.20, 0.05, 0.05, 0.10, 0.10, 0.05, 0.05, 0.10, 0.30]])  # second group 0.40 wins
    logp = p.clamp(min=1e-9).log()
    assert decode_step(logp, groups).tolist() == [4, 0, 8]     # the group's own most likely member
    assert decode_step(logp, []).tolist() == [0, 0, 8]         # plain argmax without groups


def test_value_groups_cover_the_value_tokens(tiny):
    model, tok = tiny
    loc = tok.convert_tokens_to_ids(["<loc0000>", "<loc1023>"])
    assert model.cfg.value_groups[0] == [loc[0], loc[1] + 1] and len(model.cfg.value_groups) == 5
    assert tok.convert_tokens_to_ids("<no_object>") not in range(*model.cfg.value_groups[0])


def test_cached_generation_equals_naive_greedy(tiny):
    model, tok = tiny
    batch = make_batch(model, tok, labels=None, actions=False)
    out, scores = model.generate(batch, max_new_tokens=6, return_scores=True)
    assert torch.equal(out, model.generate(batch, max_new_tokens=6))
    for b in range(2):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        seq = []
        for _ in range(out.shape[1]):
            one["label_ids"] = torch.tensor([seq + [0]])
            one["label_mask"] = torch.ones(1, len(seq) + 1, dtype=torch.bool)
            with torch.no_grad():
                logits = our_text_logits(model, one)
            p_valid = model.embed_prefix(one)[2]
            # the next token comes from the last real token: the last prompt token, then the last label
            h_idx = int(last_index(p_valid)[0]) if not seq else p_valid.shape[1] + len(seq) - 1
            logp = logits[0, h_idx].log_softmax(-1)
            seq.append(int(decode_step(logp[None], model.cfg.value_groups)[0]))
            best = logp[seq[-1]]
            torch.testing.assert_close(scores[b, len(seq) - 1], best, rtol=1e-4, atol=1e-4)
            if seq[-1] == model.cfg.eos_id:
                break
        assert out[b, :len(seq)].tolist() == seq


def test_overfits_one_batch():
    torch.manual_seed(0)
    model, tok = build_model("tiny", bins=tiny_bins())
    batch = make_batch(model, tok, labels=("<image0>red cube<loc0010><loc0500>;</image0>", "<image1></image1>"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    noise = torch.randn_like(batch["actions"])
    time = torch.tensor([0.5, 0.5])
    first = model(batch, noise=noise, time=time)
    for _ in range(150):
        loss = model(batch, noise=noise, time=time)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    last = model(batch, noise=noise, time=time)
    assert last["ntp_loss"] < 0.1 * first["ntp_loss"]
    assert last["flow_loss"] < 0.1 * first["flow_loss"]


def test_flow_matching_reproduces_each_samples_chunk():
    """Trained briefly on three samples (own state and prompt, one fixed chunk each), sampling from
    noise returns each sample's own chunk. A loss that falls (test_overfits_one_batch) cannot tell a
    flipped velocity target or an integration run the wrong way in time; this can."""
    torch.manual_seed(0)
    # tiny's shape at 56 px (16 tokens per view), 4 steps of 4 dims: fast on one CPU thread
    model, tok = build_model("tiny", bins=tiny_bins(), action_horizon=4, max_dim=4,
                             vlm=paligemma_dict(56, 14, 128, 2, 4, 512, 256, 4, 4, 1, 64, 1024))
    cfg, S = model.cfg, model.cfg.image_size
    g = torch.Generator().manual_seed(0)
    prompts = [tok(tok.bos_token + p + "\n", add_special_tokens=False).input_ids
               for p in ["pick up the red cube", "open the drawer", "push the blue can"]]
    B, Lp = len(prompts), max(map(len, prompts))
    a = torch.tensor([[1.0, 0.0, -1.0, 0.5], [-1.0, 1.0, 0.0, -0.5], [0.0, -1.0, 1.0, 0.0]])
    # an offset and a ramp per sample; the chunks sum to zero, so the mean chunk fits none of them
    chunks = a[:, None] + 0.5 * torch.linspace(-1, 1, 4)[None, :, None] * a.roll(1, 1)[:, None]  # (B, H, D)
    batch = {"images": (torch.rand(1, 1, 3, S, S, generator=g) * 2 - 1).expand(B, -1, -1, -1, -1),  # one shared view
             "view_mask": torch.ones(B, 1, dtype=torch.bool),
             "prompt_ids": torch.tensor([p + [cfg.pad_id] * (Lp - len(p)) for p in prompts]),
             "prompt_mask": torch.tensor([[1] * len(p) + [0] * (Lp - len(p)) for p in prompts], dtype=torch.bool),
             "state": torch.randn(B, cfg.max_dim, generator=g), "actions": chunks}
    rows = {k: v.repeat_interleave(4, 0) for k, v in batch.items()}  # each step: 4 noise/time draws per sample
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    for _ in range(150):
        loss = model(rows)["flow_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    twice = {k: torch.cat([v, v]) for k, v in batch.items()}  # two noise draws per sample
    out = model.sample_actions(twice, noise=torch.randn(2 * B, 4, cfg.max_dim, generator=g))
    rms = lambda x: x.pow(2).mean((-2, -1)).sqrt()
    err = rms(out - torch.cat([chunks, chunks]))                                 # (2B,)
    apart = min(float(rms(chunks[i] - chunks[j])) for i in range(B) for j in range(i))
    assert err.max() < 0.2 * apart, (err, apart)
    assert torch.all(err < 0.4 * rms(chunks - chunks.mean(0)).repeat(2)), err


def test_flow_time_runs_from_actions_to_noise(tiny, monkeypatch):
    """x_t = t * noise + (1 - t) * actions, the convention sample_actions integrates (t=1: noise).
    The reproduction test above cannot see this one: trained on one chunk per sample, a model
    learns to reach its chunk whichever way the path runs."""
    model, tok = tiny
    batch = make_batch(model, tok, labels=None)
    noise, seen = torch.randn_like(batch["actions"]), []
    embed = model.embed_suffix
    monkeypatch.setattr(model, "embed_suffix", lambda state, x_t, t: seen.append(x_t) or embed(state, x_t, t))
    for t in (0.0, 0.25, 1.0):
        model(batch, noise=noise, time=torch.full((2,), t))
    for x_t, t in zip(seen, (0.0, 0.25, 1.0)):
        torch.testing.assert_close(x_t, t * noise + (1 - t) * batch["actions"])


def probe_batch(model, tok):
    """Targets with <loc> tokens, actions, and every view present (rolling a view mask alone would
    change the prefix, whatever the images)."""
    batch = make_batch(model, tok, labels=("<image0> red cube<loc0412><loc0530>;</image0>",
                                           "<image0> blue can<loc0100><loc0900>;</image0>"))
    batch["view_mask"][:] = True
    return batch


def test_image_sensitivity_sees_the_images(tiny):
    model, tok = tiny
    loc_ids = tok.convert_tokens_to_ids(loc_tokens())
    batch = probe_batch(model, tok)
    model.train()
    rng = torch.get_rng_state()
    try:
        s = image_sensitivity(model, batch, loc_ids)
        assert model.training and torch.equal(torch.get_rng_state(), rng)  # mode restored, RNG untouched
    finally:
        model.eval()
    assert s["img_tv"] > 0 and s["img_tv_loc"] > 0 and s["img_tv_loc"] != s["img_tv"]
    assert min(s["img_action_delta"], s["img_action_delta_first"], s["prompt_action_delta"]) > 0
    # every sample with the same three (different) views: swapping samples changes nothing, exactly
    same = dict(batch, images=batch["images"][:1].repeat(2, 1, 1, 1, 1))
    s = image_sensitivity(model, same, loc_ids)
    assert s["img_tv"] == s["img_tv_loc"] == s["img_action_delta"] == s["img_action_delta_first"] == 0.0
    assert s["prompt_action_delta"] > 0
    # and the same prompt everywhere: the prompt swap changes nothing (the state is not what it swaps)
    one_prompt = dict(batch, prompt_ids=batch["prompt_ids"][:1].repeat(2, 1),
                      prompt_mask=batch["prompt_mask"][:1].repeat(2, 1))
    s = image_sensitivity(model, one_prompt)
    assert s["prompt_action_delta"] == s["prompt_action_delta_first"] == 0.0 and s["img_action_delta"] > 0
    assert np.isnan(s["img_tv_loc"])  # no <loc> ids given
    with pytest.raises(ValueError, match=">= 2"):
        image_sensitivity(model, {k: v[:1] for k, v in batch.items()})


def test_action_errors_score_the_sampled_chunk_against_the_demonstrated_one(tiny):
    model, tok = tiny
    batch = probe_batch(model, tok)
    s = image_sensitivity(model, batch)
    noise = torch.randn(batch["actions"].shape, generator=torch.Generator().manual_seed(0))
    true, real = batch["actions"], ~batch["is_pad"]                             # every dim filled here
    with torch.no_grad():
        chunk = model.sample_actions(batch, noise=noise)
    assert s["action_err"] == pytest.approx((chunk - true).norm(dim=-1)[real].mean().item(), rel=1e-5)
    assert s["mean_action_err"] == pytest.approx(true.norm(dim=-1)[real].mean().item(), rel=1e-5)
    assert s["img_swap_action_err"] != pytest.approx(s["action_err"])  # the views swapped: another chunk
    # padded steps (past an episode's end) are not scored, whatever the data holds there
    junk = dict(batch, actions=torch.where(batch["is_pad"][..., None], 1e3, true))
    again = image_sensitivity(model, junk)
    assert again["mean_action_err"] == pytest.approx(s["mean_action_err"], rel=1e-5)
    assert again["action_err"] == pytest.approx(s["action_err"], rel=1e-5)
    # a batch whose views are all the same: swapping them cannot make the chunk worse or better
    same = image_sensitivity(model, dict(batch, images=batch["images"][:1].repeat(2, 1, 1, 1, 1)))
    assert same["img_swap_action_err"] == same["action_err"]


def test_image_blind_model_shows_no_image_sensitivity_but_prompt_sensitivity(tiny):
    model, tok = tiny
    loc_ids = tok.convert_tokens_to_ids(loc_tokens())
    batch = probe_batch(model, tok)
    hook = model.fusion.register_forward_hook(lambda m, inputs, out: torch.zeros_like(out))  # view features constant
    try:
        s = image_sensitivity(model, batch, loc_ids)
    finally:
        hook.remove()
    assert s["img_tv"] == s["img_tv_loc"] == s["img_action_delta"] == s["img_action_delta_first"] == 0.0
    assert s["prompt_action_delta"] > 0 and s["prompt_action_delta_first"] > 0

    def blind_rgb(module, inputs, out):  # the same features for every image (nonzero: they scale the priors)
        out.last_hidden_state = torch.ones_like(out.last_hidden_state)
        return out
    # RGB features constant but each sample with its own depth: the depth prior is swapped with the views
    g = torch.Generator().manual_seed(3)
    S, V = model.cfg.image_size, model.cfg.n_views
    batch.update(depth=torch.cat([torch.rand(2, V, 1, S, S, generator=g) + 0.5, torch.ones(2, V, 1, S, S)], 2),
                 has_depth=torch.ones(2, V, dtype=torch.bool))
    gate = model.fusion.depth.gate  # zero at init: the prior would add nothing yet
    hook = model.vlm.model.vision_tower.register_forward_hook(blind_rgb)
    try:
        with torch.no_grad():
            gate.fill_(0.5)
        assert image_sensitivity(model, batch, loc_ids)["img_tv"] > 0
    finally:
        hook.remove()
        with torch.no_grad():
            gate.zero_()


def test_checkpoint_round_trip(tiny, tmp_path):
    model, tok = tiny
    bins = tiny_bins()
    save_checkpoint(str(tmp_path / "ckpt"), model, tok, bins)
    loaded, tok2, bins2 = load_checkpoint(str(tmp_path / "ckpt"))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok2.get_vocab() == tok.get_vocab()
    for kind in ("xy", "z", "size"):
        assert np.array_equal(getattr(bins2, kind), getattr(bins, kind))
    batch = make_batch(model, tok, labels=None)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.max_dim)
    assert torch.equal(model.sample_actions(batch, noise), loaded.eval().sample_actions(batch, noise))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="unknown config"):
        build_model("huge", bins=tiny_bins())


def test_full_config_counts_without_allocating():
    cfg = paligemma_3b_config()
    with torch.device("meta"):
        model = PoseVLA(cfg)
    vlm, total = count_parameters(model.vlm), count_parameters(model)
    assert 2.8e9 < vlm < 3.0e9
    assert 0.25e9 < total - vlm < 0.35e9
