"""Start from released weights: map a pi0 or Pose-VLA PyTorch checkpoint onto PoseVLA exactly.

Sources (all PyTorch state dicts of the pi0 "PaliGemma with expert" model; the JAX originals were
already split and transposed into torch's (out, in) Linear layout by lerobot's / openpi's own
converters, so nothing here is fused or transposed):
  - openpi's PyTorch pi0 (`PI0Pytorch.save_model`, model.safetensors): keys `paligemma_with_expert.*`
    with transformers >= 4.52 module names (`paligemma.model.language_model.*`); of the tied token
    matrix only `paligemma.lm_head.weight` is stored, `embed_tokens` is not;
  - lerobot's pi0 policy (`lerobot/pi0`, `lerobot/pi0_base`): the same under a `model.` prefix, with
    either transformers layout (`paligemma.language_model.model.*` before 4.52), the LM head alone
    (`lerobot/pi0_base`) or with the embedding (the JAX conversion), possibly with the old policy's
    normalisation buffers (`normalize_inputs.*`, ...);
  - Pose-VLA's released stage-1 checkpoint (GitHub hetolin/PoseVLA, posevla/modeling_posevla.py):
    lerobot's old layout under `model.`, plus the ray and depth patch embedders
    `paligemma_with_expert.PatchEmbedDust3R_Mlp_{rays,depth}.proj.2.fc{1,2}` and a vocabulary grown
    by its own pose tokens.

The mapping, source pattern (after the `model.` prefix, if any) -> ours:
  paligemma_with_expert.paligemma.{model.language_model | language_model.model}.layers.N.X
      -> vlm.model.language_model.layers.N.X      (q/k/v/o_proj, gate/up/down_proj, both norms)
  ... .norm.weight                                -> vlm.model.language_model.norm.weight
  ... .embed_tokens.weight                        -> vlm.model.language_model.embed_tokens.weight
      (rows of the base vocabulary copied, see below; our lm_head is tied to it)
  paligemma_with_expert.paligemma.{lm_head | language_model.lm_head}.weight
      -> the same tied matrix: used when embed_tokens is absent, must equal it when both are given
  paligemma_with_expert.paligemma.[model.]vision_tower.vision_model.X -> vlm.model.vision_tower.X
      (transformers 5 dropped the `vision_model.` level; the SigLIP modules are the same)
  paligemma_with_expert.paligemma.[model.]multi_modal_projector.linear.* -> vlm.model.multi_modal_projector.linear.*
  paligemma_with_expert.gemma_expert.model.layers.N.X -> expert_layers.N.X
  paligemma_with_expert.gemma_expert.model.norm.weight -> expert_norm.weight
  state_proj, action_in_proj, action_out_proj      -> the same names
  action_time_mlp_in / action_time_mlp_out         -> action_time_mlp.0 / action_time_mlp.2 (SiLU between)
  paligemma_with_expert.PatchEmbedDust3R_Mlp_{rays,depth}.proj.2.fc1 / fc2
      -> fusion.{rays,depth}.mlp.0 / mlp.2 (pixel-unshuffle, Linear, GELU, Linear: same input order)

Conventions, checked by tests/test_convert.py:
  - Gemma's RMSNorm weights are stored as w and applied as (1 + w) in the sources (transformers'
    GemmaRMSNorm, and the JAX `scale`) and here: copied unchanged. SigLIP's LayerNorms are plain.
  - Tensors are cast to float32 as they load into the model (the releases are bfloat16).
Source tensors with no counterpart, dropped and listed in the report:
  - gemma_expert.model.embed_tokens / gemma_expert.lm_head: the expert reads no tokens (lerobot's
    conversion stores zeros there);
  - normalize_inputs.* / normalize_targets.* / unnormalize_outputs.*: another dataset's statistics
    (post-training here fits its own, stats.json);
  - embedding rows past the base text vocabulary (Pose-VLA's own pose tokens: its bins and token
    names are not ours), except those of added tokens that a tokenizer saved next to the weights
    (Pose-VLA's save_pretrained folder) names exactly as ours, e.g. <image0> ... </image2>.
Ours with no source counterpart, kept as a fresh build_model makes them:
  - fusion.{rays,depth}.gate: our prior fusion normalises each embedded prior and scales it by a
    learned tanh(gate) (fusion.py); the released embedders add their raw output. The gate stays 0,
    so the converted model starts from the RGB features and learns how loud each prior is;
  - the whole fusion.* when the source has no prior embedders (pi0);
  - embedding rows of tokens the source lacks (pi0: <image_i>; always: our pose tokens): the mean
    of the copied rows (model.init_new_tokens' rule).
Everything else must be there with our shape, or `ConversionError` lists every missing key,
unexpected key and shape mismatch (both shapes) at once. pi0.5 (adaRMS time conditioning,
`time_mlp_*`, norms with `dense`) does not map onto this model and is reported as unexpected.

The pi0 checkpoints carry neither our tokenizer nor pose bins: the converted checkpoint uses the
text tokenizer of `--tokenizer DIR` (PaliGemma's, e.g. the google/paligemma-3b-pt-224 directory;
the tiny config builds its own offline) extended with the pose tokens of `--bins FILE` (a bins.json,
e.g. from `python data.py fit-bins`), exactly as build_model does for a fresh run.

    python convert.py SRC --out DIR --bins bins.json --tokenizer PALIGEMMA_DIR [--config paligemma-3b|tiny]
    python posttrain.py --init DIR ...        (or --init SRC directly: checkpoint.start_model converts)
"""
import argparse
import glob
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from config import CONFIGS
from errors import cli, read_file
from model import build_model, non_finite, save_checkpoint
from tokenizer import PoseBins, build_tiny_tokenizer


class ConversionError(ValueError):
    """A source that does not map exactly onto the model: every problem listed at once."""


EMBED = "vlm.model.language_model.embed_tokens.weight"
LM_HEAD = "vlm.lm_head.weight"
_PW = r"paligemma_with_expert\."
_TEXT = _PW + r"paligemma\.(model\.language_model|language_model\.model)\."

# (pattern on a key without its `model.` prefix, our name or a special target). Special targets:
# "embed" / "lm_head": the tied token matrix; None: dropped (no counterpart).
RULES = [
    (_TEXT + r"embed_tokens\.weight$", "embed"),
    (_PW + r"paligemma\.(language_model\.)?lm_head\.weight$", "lm_head"),
    (_TEXT + r"(layers\.\d+\..+|norm\.weight)$", r"vlm.model.language_model.\2"),
    (_PW + r"paligemma\.(model\.)?vision_tower\.(vision_model\.)?(.+)$", r"vlm.model.vision_tower.\3"),
    (_PW + r"paligemma\.(model\.)?multi_modal_projector\.(.+)$", r"vlm.model.multi_modal_projector.\2"),
    (_PW + r"gemma_expert\.model\.layers\.(\d+)\.(.+)$", r"expert_layers.\1.\2"),
    (_PW + r"gemma_expert\.model\.norm\.weight$", "expert_norm.weight"),
    (_PW + r"gemma_expert\.(model\.embed_tokens|lm_head)\.weight$", None),
    (r"(state_proj|action_in_proj|action_out_proj)\.(weight|bias)$", r"\1.\2"),
    (r"action_time_mlp_in\.(weight|bias)$", r"action_time_mlp.0.\1"),
    (r"action_time_mlp_out\.(weight|bias)$", r"action_time_mlp.2.\1"),
    (_PW + r"PatchEmbedDust3R_Mlp_(rays|depth)\.proj\.2\.fc1\.(weight|bias)$", r"fusion.\1.mlp.0.\2"),
    (_PW + r"PatchEmbedDust3R_Mlp_(rays|depth)\.proj\.2\.fc2\.(weight|bias)$", r"fusion.\1.mlp.2.\2"),
]
DROP_REASONS = {
    "gemma_expert": "the action expert reads no tokens: its embedding / LM head have no counterpart",
    "stats": "another dataset's normalisation statistics (post-training fits its own: stats.json)",
}
STATS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")


# ----------------------------------------------------------------------------------------------
# Reading a source

def read_source(path):
    """The state dict of a source: a directory with model.safetensors, *.safetensors shards or
    pytorch_model.bin, or one such file (.safetensors, or a torch pickle .bin/.pt/.pth, optionally
    wrapped as {"state_dict": ...} or {"model": ...})."""
    if os.path.isdir(path):
        files = ([os.path.join(path, "model.safetensors")] if os.path.isfile(os.path.join(path, "model.safetensors"))
                 else sorted(glob.glob(os.path.join(path, "*.safetensors"))))
        if not files and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            files = [os.path.join(path, "pytorch_model.bin")]
        if not files:
            raise FileNotFoundError(f"{path}: no model.safetensors, *.safetensors shards or pytorch_model.bin")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    state = {}
    for f in files:
        part = read_file(f, "safetensors weights", load_file) if f.endswith(".safetensors") else _torch_file(f)
        overlap = set(part) & set(state)
        if overlap:
            raise ConversionError(f"{f}: keys also in another shard, e.g. {sorted(overlap)[:3]}")
        state.update(part)
    return state


def _torch_file(path):
    obj = read_file(path, "a torch state dict", lambda p: torch.load(p, map_location="cpu", weights_only=True))
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: not a state dict of tensors")
    return obj


def source_prefix(keys):
    """The prefix before `paligemma_with_expert.` shared by every such key: "" (openpi) or
    "model." (lerobot and Pose-VLA policies)."""
    found = {k[:k.index("paligemma_with_expert.")] for k in keys if "paligemma_with_expert." in k}
    if len(found) != 1 or next(iter(found)) not in ("", "model."):
        raise ConversionError("not a pi0 / Pose-VLA state dict: expected keys under `paligemma_with_expert.` "
                              f"or `model.paligemma_with_expert.`, found prefixes {sorted(found) or 'none'}")
    return found.pop()


def detect_layout(keys):
    """A short description of the source's layout (for the report and the error)."""
    prefix = source_prefix(keys)
    text = [k for k in keys if ".paligemma." in k and ".layers." in k]
    new = any("paligemma.model.language_model." in k for k in text)
    priors = any("PatchEmbedDust3R_Mlp_" in k for k in keys)
    who = ("Pose-VLA" if priors else "lerobot pi0") if prefix == "model." else "openpi pi0"
    return {"prefix": prefix, "transformers": ">= 4.52 names" if new else "< 4.52 names",
            "priors": priors, "name": f"{who} ({'new' if new else 'old'} transformers names)"}


def is_released(path):
    """Whether `path` is a released pi0 / Pose-VLA source rather than one of our checkpoints or
    run directories (a config.json with a `vlm` section, or step_XXXXXX checkpoints)."""
    if os.path.isdir(path):
        if glob.glob(os.path.join(path, "step_*")):
            return False
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    if isinstance(json.load(f).get("vlm"), dict):
                        return False
            except (OSError, ValueError, AttributeError):
                pass
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    else:
        shards = [path] if path.endswith(".safetensors") else []
    if shards:
        try:
            with safe_open(shards[0], "pt") as f:
                return any("paligemma_with_expert." in k for k in f.keys())
        except (OSError, SafetensorError):  # unreadable: not ours to judge here, the loaders say why
            return False
    return os.path.isfile(os.path.join(path, "pytorch_model.bin")) or (
        os.path.isfile(path) and path.endswith((".bin", ".pt", ".pth")))


# ----------------------------------------------------------------------------------------------
# Mapping

def map_state(src, target, n_base, by_name=None):
    """Map source tensors onto `target` (our state dict: names -> tensors of the right shape and dtype).

    n_base: the size of the base text vocabulary (the tokenizer before pose tokens were added):
    embedding rows below it are copied from the source, the others get the mean of the copied rows,
    except by_name {our id: source id}: added tokens both tokenizers have (token_pairs), whose
    source rows are copied. Returns (state for load_state_dict, report). Raises ConversionError
    listing every problem."""
    layout = detect_layout(src)
    prefix = layout["prefix"]
    state, dropped, unexpected, mismatched = {}, {}, [], []
    token_matrix = {}
    for key, value in src.items():
        if key.startswith(STATS_PREFIXES):
            dropped[key] = DROP_REASONS["stats"]
            continue
        if not key.startswith(prefix):
            unexpected.append(key)
            continue
        name, rule = _apply_rules(key[len(prefix):])
        if rule is None:
            unexpected.append(key)
        elif name is None:
            dropped[key] = DROP_REASONS["gemma_expert"]
        elif name in ("embed", "lm_head"):
            token_matrix[name] = (key, value)
        elif name not in target:
            unexpected.append(f"{key} (-> {name}, which this model does not have)")
        elif tuple(value.shape) != tuple(target[name].shape):
            mismatched.append(f"{key} -> {name}: source {tuple(value.shape)}, model {tuple(target[name].shape)}")
        elif name in state:
            unexpected.append(f"{key} (a second source for {name})")
        else:
            state[name] = value  # cast to float32 by load_state_dict, one tensor at a time
    rows = _token_rows(token_matrix, target, n_base, state, mismatched, by_name or {})
    fresh = [k for k in target if k.startswith("fusion.") and k not in state]
    prior_keys = [k for k in state if k.startswith("fusion.")]
    # Fresh is allowed for the gates always, for all of fusion.* when the source has no priors.
    allowed = {k for k in fresh if k.endswith(".gate") or not prior_keys}
    missing = [k for k in target if k not in state and k != LM_HEAD and k not in allowed]
    if missing or unexpected or mismatched:
        raise ConversionError(_problems(layout["name"], missing, unexpected, mismatched))
    bad = non_finite(state)
    if bad:
        raise ConversionError(f"{len(bad)} source tensors hold NaN/inf, e.g. {bad[:3]}")
    report = {"layout": layout, "mapped": len(state), "embedding_rows": rows,
              "dropped": _summarise(dropped), "kept_fresh": sorted(allowed)}
    return state, report


def _apply_rules(key):
    for pattern, repl in RULES:
        m = re.match(pattern, key)
        if m:
            if repl in (None, "embed", "lm_head"):
                return repl, True
            return m.expand(repl), True
    return None, None


def _token_rows(token_matrix, target, n_base, state, mismatched, by_name):
    """Fill the tied token matrix from the source's embed_tokens (or lm_head when that is all it
    stores): rows [0, min(R, n_base)) copied, added tokens the source names too (by_name) copied
    from their source rows, the rest the mean of the rows [0, min(R, n_base))."""
    if not token_matrix:
        return None  # reported as missing
    key, E = token_matrix.get("embed", token_matrix.get("lm_head"))
    if "embed" in token_matrix and "lm_head" in token_matrix:
        head_key, head = token_matrix["lm_head"]
        if head.shape != E.shape or not torch.equal(head, E):
            mismatched.append(f"{head_key}: an LM head that differs from {key}; this model ties them")
            return None
    ours = target[EMBED]
    if E.ndim != 2 or E.shape[1] != ours.shape[1]:
        mismatched.append(f"{key} -> {EMBED}: source {tuple(E.shape)}, model {tuple(ours.shape)} "
                          "(rows may differ, the width may not)")
        return None
    n = min(E.shape[0], n_base)
    out = torch.empty_like(ours)
    out[:n] = E[:n].to(ours.dtype)
    out[n:] = out[:n].mean(0)
    named = {ours_id: src_id for ours_id, src_id in by_name.items() if n <= ours_id < len(out) and src_id < len(E)}
    for ours_id, src_id in named.items():
        out[ours_id] = E[src_id].to(ours.dtype)
    state[EMBED] = out
    return {"copied": n, "copied_by_name": len(named), "mean_initialised": ours.shape[0] - n - len(named),
            "source_rows_dropped": max(0, E.shape[0] - n_base) - len(named), "from": key}


def _problems(layout, missing, unexpected, mismatched, show=25):
    lines = [f"the source ({layout}) does not map exactly onto this model:"]
    for title, items in (("missing keys (the model needs them, the source lacks them)", missing),
                         ("unexpected keys (no counterpart in this model)", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {k}" for k in items[:show]]
            if len(items) > show:
                lines.append(f"    ... and {len(items) - show} more")
    if any("time_mlp_in" in k or ".dense." in k for k in unexpected):
        lines.append("  (time_mlp_* / adaRMS `dense` norms are pi0.5's; only pi0 layouts map onto this model)")
    if mismatched and not missing and not unexpected:
        lines.append("  (every name maps: is --config the size the source was trained at?)")
    return "\n".join(lines)


def _summarise(dropped):
    """{reason: [count, first keys]} of the dropped source tensors."""
    out = {}
    for key, why in dropped.items():
        entry = out.setdefault(why, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 3:
            entry["examples"].append(key)
    return out


# ----------------------------------------------------------------------------------------------
# Converting

def convert(src_path, config, bins, tokenizer_dir=None):
    """(PoseVLA, text tokenizer, report) from a released source. bins: PoseBins; tokenizer_dir:
    the base text tokenizer (PaliGemma's directory; the tiny config builds its own without it)."""
    if tokenizer_dir is None and config != "tiny":  # checked before the (large) source is read
        raise ValueError(f"--config {config} needs --tokenizer DIR (PaliGemma's tokenizer, e.g. the "
                         "google/paligemma-3b-pt-224 directory): the pi0 checkpoints do not carry one")
    n_base = len(AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tiny_tokenizer())
    model, tok = build_model(config, bins, tokenizer_dir=tokenizer_dir)  # refuses an unknown config
    src, src_tok = read_source(src_path), source_tokenizer(src_path)
    state, report = map_state(src, model.state_dict(), n_base, token_pairs(tok, src_tok, n_base) if src_tok else None)
    model.load_state_dict(state, strict=False)  # map_state refused anything missing but the LM head / kept fresh
    model.vlm.tie_weights()
    report["source_tokenizer"] = src_tok.name_or_path if src_tok else None
    report["source"] = os.path.abspath(src_path)
    report["config"] = config
    report["tokenizer"] = tokenizer_dir or "tokenizer.build_tiny_tokenizer()"
    return model, tok, report


def source_tokenizer(path):
    """The tokenizer saved next to the source weights (Pose-VLA's save_pretrained folder has one),
    or None. Only its added tokens are used: rows of tokens it shares with ours (token_pairs)."""
    if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, f)) for f in
                                          ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: a tokenizer is there but does not load ({e}); remove it to convert "
                              "without matching added tokens by name") from e


def token_pairs(ours, theirs, n_base):
    """{our id: source id} for the tokens past the base vocabulary that both tokenizers name alike
    (e.g. Pose-VLA's <image0> ... </image2>; its pose tokens have other names and bins)."""
    src = theirs.get_vocab()
    return {i: src[name] for name, i in ours.get_vocab().items() if i >= n_base and src.get(name, -1) >= n_base}


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a released pi0 / Pose-VLA PyTorch checkpoint into a "
                                            "Pose-VLA checkpoint directory (model.save_checkpoint's format)")
    p.add_argument("src", help="a directory (model.safetensors, *.safetensors shards or pytorch_model.bin) or a file")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", default="paligemma-3b", choices=sorted(CONFIGS))
    p.add_argument("--bins", required=True, help="bins.json defining the pose vocabulary (python data.py fit-bins)")
    p.add_argument("--tokenizer", default=None, help="base text tokenizer directory (PaliGemma's); tiny: none")
    args = p.parse_args(argv)
    bins = PoseBins.load(args.bins)
    model, tok, report = convert(args.src, args.config, bins, tokenizer_dir=args.tokenizer)
    save_checkpoint(args.out, model, tok, bins, extra={"convert.json": report})
    rows = report["embedding_rows"]
    print(f"{report['layout']['name']}: {report['mapped']} tensors mapped; embedding rows copied {rows['copied']} "
          f"(+ {rows['copied_by_name']} added tokens by name), mean-initialised {rows['mean_initialised']}, "
          f"source rows dropped {rows['source_rows_dropped']}")
    for why, entry in report["dropped"].items():
        print(f"dropped {entry['count']} ({why}), e.g. {entry['examples'][0]}")
    if report["kept_fresh"]:
        print(f"kept as built ({len(report['kept_fresh'])}): {', '.join(report['kept_fresh'][:6])}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli(main)
