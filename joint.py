"""Joint attention: one sequence [prefix | labels | state | actions] over two token streams.

method.md §5.3-5.4 (paper Sec. III). Reading order:
  1. the token kinds, and attention_mask(): who sees whom in [prefix | labels | state | actions];
  2. token_positions(): RoPE positions, where the suffix skips the labels;
  3. joint_layer(): one transformer layer over two streams (VLM tokens, expert tokens) that compute
     their own q/k/v, share ONE scaled_dot_product_attention, then apply their own o_proj/norms/MLP.
model.PoseVLA runs the stack of these layers (run_layers) with Gemma's and the expert's weights.
"""
import torch
import torch.nn.functional as F

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
