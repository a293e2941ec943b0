"""Falcon-H1, Qwen3.5 and Qwen2.5 written by hand in PyTorch, loading the official checkpoints.

Three model families, one building kit:
  Falcon-H1   parallel hybrid:   every layer runs attention AND a Mamba-2 mixer side by side, then an MLP
  Qwen3.5     sequential hybrid: 3 Gated DeltaNet layers, then 1 gated full-attention layer, repeated
  Qwen2.5     a plain Transformer (the control)

Read top to bottom: config, linear layers, norms and rotary embedding, attention, MLP, the causal convolution,
Mamba-2 (its scan for one token, over T tokens one by one, in chunks for prefill, and batched for a verify pass,
whose states after each token are a StatesAfterEachToken), Gated DeltaNet (likewise), the per-layer state, the two
kinds of decoder layer, what a draft leaves out (Skip) and the model, the built-in tiny models, loading, and what
identifies a model (for draft files). Every formula follows transformers 5.23 (the official implementation); the
tests compare logits with it, and RESULTS.md, "What the tests prove", says how.

Letters used in shape comments:
  B batch, T tokens in this call, S tokens already in the cache, D hidden size, V vocabulary,
  H heads, Hkv key/value heads, hd attention head dim, R rotated dims of a head,
  Mamba-2:        P head dim, N state size, G groups of B/C, Z = H*P inner width, K conv kernel, Q chunk length
  Gated DeltaNet: Hk key heads, Hv value heads, dk key dim, dv value dim

The state a model carries between calls (KV caches, conv windows, recurrent states) lives in `Cache`.
Recurrent states are never modified in place: every step makes new tensors, so keeping references to the
old ones is a valid snapshot. KV caches are preallocated buffers that are written in place and rolled back
by setting `Cache.length`.
"""
import difflib
import glob
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class UsageError(ValueError):
    """A problem the user can fix (unknown model, missing file or tensor, no network, bad request): the message
    says how."""


# ----------------------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True)
class Config:
    family: str                      # "falcon_h1" | "qwen3_5" | "qwen2" (transformers' model_type)
    vocab_size: int                  # V
    hidden_size: int                 # D
    intermediate_size: int           # width of the SwiGLU MLP
    layer_types: tuple               # per layer: "hybrid" (attention ∥ Mamba-2), "full_attention" or "linear_attention"
    rms_norm_eps: float
    tie_word_embeddings: bool        # LM head reuses the embedding matrix
    eos_token_id: int | None
    max_position_embeddings: int
    # attention
    num_heads: int                   # H
    num_kv_heads: int                # Hkv (grouped-query attention: query head j reads KV head j // (H/Hkv))
    head_dim: int                    # hd, from the config (Falcon-H1's is NOT D/H)
    rope_theta: float
    rotary_dim: int                  # R: leading dims of each head that RoPE rotates (Qwen3.5 rotates 64 of 256)
    qkv_bias: bool = False           # Qwen2.5: q/k/v projections have biases
    gated_attention: bool = False    # Qwen3.5: (1+w) RMSNorm on q and k per head; sigmoid output gate inside q_proj
    # Mamba-2 (Falcon-H1)
    mamba_n_heads: int = 0           # H
    mamba_d_head: int = 0            # P
    mamba_d_state: int = 0           # N
    mamba_n_groups: int = 1          # G
    mamba_d_conv: int = 4            # K
    mamba_chunk_size: int = 128      # Q of the chunked scan (prefill)
    mamba_rms_norm: bool = False     # grouped RMSNorm after the gate (Falcon-H1-3B); 0.5B only gates: y * silu(z)
    time_step_limit: tuple = (0.0, math.inf)
    # µP multipliers (Falcon-H1; 1.0 leaves the other families unchanged)
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    mlp_multipliers: tuple = (1.0, 1.0)                 # (gate, down)
    ssm_multipliers: tuple = (1.0, 1.0, 1.0, 1.0, 1.0)  # (z, x, B, C, dt): slices of the Mamba in_proj output
    # Gated DeltaNet (Qwen3.5)
    linear_num_key_heads: int = 0    # Hk
    linear_num_value_heads: int = 0  # Hv
    linear_key_head_dim: int = 0     # dk
    linear_value_head_dim: int = 0   # dv
    linear_conv_kernel_dim: int = 4  # K
    linear_chunk_size: int = 64      # Q of the chunked scan (transformers uses 64)

    @property
    def num_layers(self):
        return len(self.layer_types)


def config_from_hf(cfg: dict) -> Config:
    """Our Config from an official config.json (Falcon-H1, Qwen3.5 or Qwen3.5-text, Qwen2)."""
    model_type = cfg.get("model_type")
    if model_type == "qwen3_5":                  # the vision-language checkpoint: the text model is nested
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}
        model_type = "qwen3_5_text"
    if model_type not in ("falcon_h1", "qwen3_5_text", "qwen2"):
        raise UsageError(f"model_type {model_type!r} is not supported: hsd implements falcon_h1, qwen3_5 and qwen2")

    def get(key, default=None, required=False):
        if required and cfg.get(key) is None:
            raise UsageError(f"config.json gives no value for {key!r} (null or missing); {model_type} needs it")
        value = cfg.get(key, default)
        return default if value is None and not required else value

    rope = get("rope_parameters") or get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UsageError(f"rope type {rope.get('rope_type')!r} is not supported (only the default RoPE)")
    theta = rope.get("rope_theta", get("rope_theta", 10000.0))
    n_layers, heads = get("num_hidden_layers", required=True), get("num_attention_heads", required=True)
    head_dim = get("head_dim") or get("hidden_size") // heads
    eos = get("eos_token_id")
    common = dict(
        vocab_size=get("vocab_size", required=True), hidden_size=get("hidden_size", required=True),
        intermediate_size=get("intermediate_size", required=True), rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        max_position_embeddings=get("max_position_embeddings", 32768),
        num_heads=heads, num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
        rope_theta=float(theta), rotary_dim=head_dim)

    if model_type == "falcon_h1":
        for flag in ("attention_bias", "mlp_bias", "mamba_proj_bias", "projectors_bias"):
            if get(flag, False):
                raise UsageError(f"Falcon-H1 with {flag}=true is not supported")
        if get("mamba_rms_norm", False) and get("mamba_norm_before_gate", True):
            raise UsageError("Falcon-H1 with mamba_norm_before_gate=true is not supported")
        mamba_heads = get("mamba_n_heads", required=True)
        d_ssm = get("mamba_d_ssm") or get("mamba_expand", 2) * common["hidden_size"]
        if get("mamba_d_head", "auto") not in ("auto", d_ssm // mamba_heads):
            raise UsageError(f"mamba_d_head {get('mamba_d_head')} is not mamba_d_ssm / mamba_n_heads = {d_ssm // mamba_heads}")
        # muP multipliers: an absent key takes transformers' default, an explicit null is an error
        mup = {key: get(key, default, required=key in cfg)
               for key, default in [("embedding_multiplier", 1.0), ("lm_head_multiplier", 1.0),
                                    ("key_multiplier", 1.0), ("attention_in_multiplier", 1.0),
                                    ("attention_out_multiplier", 1.0), ("ssm_in_multiplier", 1.0),
                                    ("ssm_out_multiplier", 1.0), ("mlp_multipliers", (1.0, 1.0)),
                                    ("ssm_multipliers", (1.0,) * 5)]}
        mup["mlp_multipliers"], mup["ssm_multipliers"] = tuple(mup["mlp_multipliers"]), tuple(mup["ssm_multipliers"])
        return Config(
            family="falcon_h1", layer_types=("hybrid",) * n_layers, **common, **mup,
            mamba_n_heads=mamba_heads, mamba_d_head=d_ssm // mamba_heads, mamba_d_state=get("mamba_d_state", 256),
            mamba_n_groups=get("mamba_n_groups", 1), mamba_d_conv=get("mamba_d_conv", 4),
            mamba_chunk_size=get("mamba_chunk_size", 256), mamba_rms_norm=bool(get("mamba_rms_norm", False)),
            time_step_limit=tuple(_number(x) for x in get("time_step_limit", (0.0, math.inf))))

    if model_type == "qwen3_5_text":
        layer_types = get("layer_types") or [
            "full_attention" if (i + 1) % get("full_attention_interval", 4) == 0 else "linear_attention"
            for i in range(n_layers)]
        return Config(
            family="qwen3_5", layer_types=tuple(layer_types), **{**common, "rotary_dim": int(
                head_dim * rope.get("partial_rotary_factor", get("partial_rotary_factor", 0.25)))},
            qkv_bias=bool(get("attention_bias", False)), gated_attention=True,
            linear_num_key_heads=get("linear_num_key_heads", 16), linear_num_value_heads=get("linear_num_value_heads", 32),
            linear_key_head_dim=get("linear_key_head_dim", 128), linear_value_head_dim=get("linear_value_head_dim", 128),
            linear_conv_kernel_dim=get("linear_conv_kernel_dim", 4))

    if get("use_sliding_window", False):
        raise UsageError("Qwen2 with use_sliding_window=true is not supported")
    return Config(family="qwen2", layer_types=("full_attention",) * n_layers, **common, qkv_bias=True)


def _number(x):
    """A float from config.json; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    return float(x["__float__"]) if isinstance(x, dict) else float(x)


# ----------------------------------------------------------------------------------------------------------
# Linear layers, norms, rotary embedding, attention, MLP

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MIN_WEIGHTS = 2 ** 20       # below about a million weights oneDNN's fixed cost per call outweighs its speed


class Linear(nn.Linear):
    """nn.Linear; on CPU in fp32, for a large weight matrix and when no gradient is needed, the product runs through
    oneDNN instead of the default BLAS (that oneDNN call has no backward pass, so training goes through F.linear).

    Same result up to rounding. Why (a speed trick, measured on the 2-core AMD EPYC this project is tested on,
    2026-12-01, one thread of work per call): decoding multiplies 1..k+1 rows by every weight matrix, which for the
    official models is bound by reading the weights. For a 3352 x 1024 matrix F.linear (MKL) takes 778 us for one
    row and 2237 us for three, oneDNN 362 and 831 us. But each oneDNN call costs about 45 us whatever its size: for
    the toys' 176 x 128 matrices F.linear takes 6 us (one row) and oneDNN 46 us; at 1024 x 1024 the two are even (110
    and 98 us). So oneDNN is used from ONEDNN_MIN_WEIGHTS weights on.
    """

    def forward(self, x):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not needs_grad
                and self.weight.numel() >= ONEDNN_MIN_WEIGHTS):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding, whose weights are not drawn when it is made on the meta device (load builds the model there and
    reads every weight from the checkpoint). A speed trick: the first normal_ on a meta tensor in a process makes
    torch import its reference implementations, 1.8-1.9 s (torch 2.13, this CPU, 2026-12-07): every command that loads
    a checkpoint started that much later."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, normalised in fp32.

    Two conventions: Falcon-H1, Qwen2.5 (and the Gated DeltaNet output norm) store w itself and multiply after
    casting back to the input dtype; Qwen3.5 stores an offset (unit_offset=True) and multiplies by (1 + w) in fp32.
    """

    def __init__(self, dim, eps, unit_offset=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def scaled(x, multiplier):
    """x * multiplier (a µP multiplier of Falcon-H1); x itself for 1.0, the value of every multiplier elsewhere, so
    that no operation copies a tensor without changing it."""
    return x if multiplier == 1.0 else x * multiplier


def rope_cos_sin(positions, rotary_dim, theta, dtype):
    """cos and signed sin (T, R) for positions (T,), pairing dim i with dim i + R/2 ("rotate half" layout).

    Rotating the pair (x1, x2) by the angle a gives (x1 cos a - x2 sin a, x2 cos a + x1 sin a), i.e.
    x * [cos, cos] + swap_halves(x) * [-sin, sin]: the sign is put into sin here, once per forward pass.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim))
    angles = positions.float()[:, None] * inv_freq                # (T, R/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate the first R dims of every head of x (B, T, H, hd) with rope_cos_sin's cos and sin; the rest pass
    through."""
    R = cos.shape[-1]
    x_rot, x_pass = x[..., :R], x[..., R:]
    half1, half2 = x_rot[..., : R // 2], x_rot[..., R // 2:]
    cos, sin = cos[:, None, :], sin[:, None, :]                   # (T, 1, R) broadcasts over heads
    rotated = x_rot * cos + torch.cat([half2, half1], dim=-1) * sin
    return torch.cat([rotated, x_pass], dim=-1) if x_pass.shape[-1] else rotated


def causal_mask(start, T, dtype, device):
    """The additive mask (T, start + T) of T queries at positions start..start+T-1: query i sees keys 0..start+i
    (0 there, -inf after); None for one query, which sees every key."""
    return None if T == 1 else torch.full((T, start + T), -math.inf, dtype=dtype, device=device).triu(start + 1)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and a KV cache.

    Family details: Falcon-H1 scales the keys by key_multiplier; Qwen2.5 has q/k/v biases; Qwen3.5 normalises
    q and k per head, rotates only R of the hd dims, and carries a sigmoid output gate inside q_proj, interleaved
    per head as [q_0 | gate_0 | q_1 | gate_1 | ...].
    """

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        H, Hkv, hd, D = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self.q_proj = Linear(D, H * hd * (2 if c.gated_attention else 1), bias=c.qkv_bias)
        self.k_proj = Linear(D, Hkv * hd, bias=c.qkv_bias)
        self.v_proj = Linear(D, Hkv * hd, bias=c.qkv_bias)
        self.o_proj = Linear(H * hd, D, bias=False)
        if c.gated_attention:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps, unit_offset=True)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps, unit_offset=True)

    def forward(self, u, rope, mask, state=None, start=0):
        """u (B, T, D), rope = (cos, sin) and mask = causal_mask(...) for positions start..start+T-1, state: the layer's
        KV buffers or None."""
        c, (B, T, _) = self.c, u.shape
        q = self.q_proj(u)
        if c.gated_attention:
            q, gate = q.view(B, T, c.num_heads, 2 * c.head_dim).chunk(2, dim=-1)   # (B, T, H, hd) each
        q = q.view(B, T, c.num_heads, c.head_dim)                                  # (B, T, H, hd)
        k = scaled(self.k_proj(u).view(B, T, c.num_kv_heads, c.head_dim), c.key_multiplier)
        v = self.v_proj(u).view(B, T, c.num_kv_heads, c.head_dim)                  # (B, T, Hkv, hd)
        if c.gated_attention:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # (B, heads, T, hd)

        if state is not None:  # write this call's keys and values at positions start.., read everything so far
            state.keys[:, :, start:start + T] = k
            state.values[:, :, start:start + T] = v
            k, v = state.keys[:, :, :start + T], state.values[:, :, :start + T]    # (B, Hkv, S+T, hd)

        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)   # (B, H, T, hd)
        o = o.transpose(1, 2)                                                      # (B, T, H, hd)
        if c.gated_attention:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(B, T, -1))                                    # heads concatenated: (B, T, H*hd)


class MLP(nn.Module):
    """SwiGLU: down( up(v) * silu(gate(v) * g_mul) ) * d_mul, with Falcon-H1's µP multipliers (none elsewhere)."""

    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.gate_multiplier, self.down_multiplier = c.mlp_multipliers

    def forward(self, v):
        gate = F.silu(scaled(self.gate_proj(v), self.gate_multiplier))
        return scaled(self.down_proj(self.up_proj(v) * gate), self.down_multiplier)


# ----------------------------------------------------------------------------------------------------------
# Shared by Mamba-2 and Gated DeltaNet: heads from groups, the causal depthwise convolution

def repeat_heads(x, n):
    """(b, T, G, d) -> (b, T, G*n, d): group g serves heads g*n .. g*n + n-1, as x.repeat_interleave(n, dim=2) (not
    repeat). A view, not a copy, when there is one group or n is 1."""
    b, T, G, d = x.shape
    return x[:, :, :, None].expand(b, T, G, n, d).reshape(b, T, G * n, d)


def causal_conv(x, window, weight, bias):
    """Depthwise causal conv over time, then SiLU.

    x: (B, T, C) new inputs; window: (B, K-1, C) the K-1 inputs before them (zeros at the start of a sequence);
    weight: (C, 1, K) as in the checkpoints, tap K-1 multiplies the current input; bias: (C,) or None.
        y[:, t, c] = silu(bias[c] + sum_j weight[c, 0, j] * inputs[:, t + j, c]),  inputs = window ++ x
    Returns y (B, T, C) and inputs (B, K-1+T, C), every input seen: the window after any of the T tokens, the last
    K-1 inputs up to it, is part of it.
    """
    T, K = x.shape[1], weight.shape[-1]
    inputs = torch.cat([window, x], dim=1)                         # (B, K-1+T, C)
    f32 = torch.promote_types(x.dtype, torch.float32)              # sum the taps in fp32, round once (as conv1d)
    w = weight[:, 0].to(f32)                                       # (C, K)
    y = inputs[:, :T].to(f32) * w[:, 0]                            # tap 0, the oldest input: y is a new tensor,
    for j in range(1, K):                                          # so the other taps accumulate into it in place
        y.addcmul_(inputs[:, j:j + T], w[:, j])
    if bias is not None:
        y += bias
    return F.silu(y.to(x.dtype), inplace=True), inputs


# ----------------------------------------------------------------------------------------------------------
# Mamba-2 (the SSD layer of Falcon-H1)

def ssd_step(x, dt, A, B, C, state):
    """Mamba-2's selective state space recurrence for one token (the definition; a decoding step runs it).

    x: (b, H, P), dt: (b, H) step sizes (after softplus), A: (H,) negative decay rates, B, C: (b, H, N) per head,
    state: (b, H, P, N) the state before the token. All fp32.
        s_t = exp(dt_t * A) * s_{t-1} + dt_t * x_t B_t^T        y_t = s_t C_t
    Returns y: (b, H, P) (without the D skip) and the state after the token.
    """
    decay = torch.exp(dt * A)[:, :, None, None]                                     # (b, H, 1, 1)
    dt_x = (dt[:, :, None] * x)[..., None]                                          # (b, H, P, 1)
    state = decay * state                         # a new tensor: the previous state stays as it was
    state.addcmul_(dt_x, B[:, :, None, :])                                          # + (dt x) B^T
    return torch.einsum("bhpn,bhn->bhp", state, C), state


def ssd_recurrent(x, dt, A, B, C, state):
    """The recurrence over T tokens, one ssd_step after the other: the reference for the other forms.

    x: (b, T, H, P), dt: (b, T, H), B, C: (b, T, H, N); A and state as for ssd_step.
    Returns y: (b, T, H, P) (without the D skip) and the list of the T states after each token.
    """
    ys, states = [], []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y)
        states.append(state)
    return torch.stack(ys, dim=1), states


def segsum(a):
    """out[..., l, s] = a[s+1] + ... + a[l] for s <= l, and -inf above the diagonal; a: (..., Q) -> (..., Q, Q).

    exp(segsum(a)) is the decay from position s to position l inside a chunk. Summing the masked terms
    (instead of subtracting two cumulative sums) keeps it accurate when the cumulative sums are large.
    """
    Q = a.shape[-1]
    terms = a[..., :, None].expand(*a.shape, Q).tril(-1)                    # terms[l, s] = a[l] if s < l, else 0
    sums = terms.cumsum(dim=-2)                                                       # sum of a[j], s < j <= l
    above_diagonal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).triu(1)
    return sums.masked_fill_(above_diagonal, -math.inf)


def ssd_chunked(x, dt, A, B, C, state, chunk_size):
    """The same recurrence computed chunk by chunk (the SSD algorithm); used for prefill.

    Same inputs as ssd_recurrent. Returns y: (b, T, H, P) and the state after the last token (b, H, P, N).
    Positions are padded to a multiple of Q with dt = 0 and x = 0, which neither decays nor updates the state.
    """
    b, T, H, P = x.shape
    Q = chunk_size
    pad = (-T) % Q
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    n = (T + pad) // Q
    x, B, C = (t.reshape(b, n, Q, H, -1) for t in (x, B, C))                      # (b, c, Q, H, P|N)
    dt = dt.reshape(b, n, Q, H)
    a = (dt * A).permute(0, 1, 3, 2)                                                # (b, c, H, Q) log decay per step
    a_cum = a.cumsum(dim=-1)                                                        # (b, c, H, Q)
    xdt = x * dt[..., None]                                                         # (b, c, Q, H, P)

    # 1. within each chunk (diagonal blocks): y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1}+...+a_l) dt_s x_s
    decay = torch.exp(segsum(a))                                                    # (b, c, H, Q, Q)
    scores = torch.einsum("bclhn,bcshn->bchls", C, B) * decay
    y_diag = torch.einsum("bchls,bcshp->bclhp", scores, xdt)
    # 2. what each chunk adds to the state by its end: U_c = sum_s exp(a_{s+1}+...+a_Q) dt_s x_s B_s^T
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)                               # (b, c, H, Q)
    chunk_updates = torch.einsum("bchs,bcshp,bcshn->bchpn", decay_to_end, xdt, B)
    # 3. across chunks, in order: S_{c+1} = exp(a_1+...+a_Q) S_c + U_c
    chunk_starts = []
    for i in range(n):
        chunk_starts.append(state)
        state = torch.exp(a_cum[:, i, :, -1])[..., None, None] * state + chunk_updates[:, i]
    # 4. what each position reads from the state its chunk started with: exp(a_1+...+a_l) S_c C_l
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, torch.stack(chunk_starts, dim=1))
    y_off = y_off * torch.exp(a_cum).permute(0, 1, 3, 2)[..., None]
    y = (y_diag + y_off).reshape(b, n * Q, H, P)[:, :T]
    return y, state


class StatesAfterEachToken:
    """The recurrent states after each of the T tokens of a verify pass, computed when indexed: commit needs only one,
    and writing all T of them (T * H*P*N numbers per layer) would cost more than the pass's other work.

    Both recurrences unroll, from the state s_0 before the pass, to the same form:
        states[t] = from_start[t] s_0 + sum_{j<=t} decay[t, j] left_j right_j^T
    (Mamba-2: left_j = dt_j x_j, right_j = B_j; gated delta rule: left_j = k_j, right_j = u_j, the value token j wrote).
    start: (b, H, P, N); from_start: (b, H, T); decay: (b, H, T, T), 0 above the diagonal; left: (b, H, T, P);
    right: (b, H, T, N). states[t] is (b, H, P, N), the state after token t (t counts from 0, negative from the end).
    """

    def __init__(self, start, from_start, decay, left, right):
        self.start, self.from_start, self.decay, self.left, self.right = start, from_start, decay, left, right

    def __len__(self):
        return self.decay.shape[-1]

    def __getitem__(self, t):
        """states[t] = from_start[t] s_0 + sum_{j<=t} decay[t, j] left_j right_j^T: (b, H, P, N)."""
        t = range(len(self))[t]                          # a negative t counts from the end; IndexError past it
        weighted = self.left * self.decay[..., t, :, None]                      # (b, H, T, P): decay[t, j] left_j
        writes = weighted.transpose(-1, -2) @ self.right                         # (b, H, P, N): sum over j <= t
        return writes + self.from_start[..., t, None, None] * self.start

    def __repr__(self):
        return f"StatesAfterEachToken({len(self)} tokens, each state {tuple(self.start.shape)}, computed when indexed)"


@dataclass
class Recorded:
    """What a recurrent layer records in a verify pass (record=True), for commit to keep the state after any prefix:
    conv_inputs (B, K-1+T, C), the K-1 inputs of the conv window before the pass, then the pass's T inputs (the conv
    window after a token is the last K-1 inputs up to it); states, the recurrent state after each token (states[t]
    is the state after token t, counting from 0)."""
    conv_inputs: torch.Tensor
    states: StatesAfterEachToken

    def __repr__(self):
        return f"Recorded(conv_inputs {tuple(self.conv_inputs.shape)}, {self.states!r})"


def ssd_states(x, dt, A, B, C, state):
    """The same recurrence for a few tokens at once, with the state after every token, in a number of operations
    that does not grow with T (the state space duality, written for the few tokens of a verify pass; the arithmetic
    grows as T^2, which for a verify pass's few tokens is little).

    Same inputs as ssd_recurrent. With a_t = dt_t * A, unrolling the recurrence from s_0 = state gives
        s_t = exp(a_1 + ... + a_t) s_0 + sum_{s<=t} exp(a_{s+1} + ... + a_t) dt_s x_s B_s^T
        y_t = s_t C_t = exp(a_1 + ... + a_t) s_0 C_t + sum_{s<=t} exp(a_{s+1} + ... + a_t) (C_t . B_s) dt_s x_s
    (y in its second, attention-like form reads s_0 once instead of all T states).
    Returns y: (b, T, H, P) (without the D skip) and states: StatesAfterEachToken, states[t] (b, H, P, N) the state
    after token t (as ssd_recurrent's list). For many tokens prefill uses ssd_chunked.
    """
    x_dt, B, C = (dt[..., None] * x).transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)   # (b, H, T, P|N)
    a = (dt * A).transpose(1, 2)                                                    # (b, H, T) log decay per token
    decay = torch.exp(segsum(a))                          # (b, H, T, T): [t, s] = exp(a_{s+1} + ... + a_t), 0 if s > t
    from_start = torch.exp(a.cumsum(dim=-1))                                        # (b, H, T): exp(a_1 + ... + a_t)
    scores = C @ B.transpose(-1, -2) * decay                              # (b, H, T, T): (C_t . B_s) decay[t, s]
    y = scores @ x_dt + from_start[..., None] * (C @ state.transpose(-1, -2))      # (b, H, T, P)
    return y.transpose(1, 2), StatesAfterEachToken(state, from_start, decay, x_dt, B)


def mup_vector(c: Config):
    """transformers' mup_vector: the µP factor of every feature of the Mamba in_proj output, one per slice (z, x, B, C,
    dt) -> (2Z + 2GN + H,). Not in the checkpoint: a buffer computed from the config."""
    Z, GN = c.mamba_n_heads * c.mamba_d_head, c.mamba_n_groups * c.mamba_d_state
    sizes = (Z, Z, GN, GN, c.mamba_n_heads)
    return torch.cat([torch.full((n,), s) for n, s in zip(sizes, c.ssm_multipliers)])


class Mamba2Mixer(nn.Module):
    """Falcon-H1's Mamba-2 branch: in_proj -> (z, xBC, dt) -> conv+SiLU -> SSD scan + D skip -> gate (then a grouped
    RMSNorm if mamba_rms_norm) -> out_proj."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        H, P, N, G = c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups
        self.Z, self.GN = H * P, G * N
        conv_dim = self.Z + 2 * self.GN                                    # channels of x, B, C
        self.in_proj = Linear(c.hidden_size, self.Z + conv_dim + H, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, c.mamba_d_conv, groups=conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        if c.mamba_rms_norm:
            self.norm = nn.Module()
            self.norm.weight = nn.Parameter(torch.ones(self.Z))
        self.out_proj = Linear(self.Z, c.hidden_size, bias=False)
        self.register_buffer("mup_vector", mup_vector(c), persistent=False)   # in the model's dtype, as transformers'

    def forward(self, u, state=None, record=False):
        """u (B, T, D) -> (y (B, T, D), recorded). With a state, start from it and advance it (see Cache). record (a
        verify pass): use the batched form, and recorded is a Recorded (the state after every token); else None."""
        c, (Bsz, T, _) = self.c, u.shape
        H, P, N, G, Z, GN = c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups, self.Z, self.GN
        p = self.in_proj(scaled(u, c.ssm_in_multiplier)) * self.mup_vector  # (B, T, 2Z + 2GN + H)
        z, xBC, dt = p.split([Z, Z + 2 * GN, H], dim=-1)                      # xBC: (B, T, Z + 2GN)

        window = state.conv if state is not None else u.new_zeros(Bsz, c.mamba_d_conv - 1, xBC.shape[-1])
        xBC, conv_inputs = causal_conv(xBC, window, self.conv1d.weight, self.conv1d.bias)
        x, Bm, Cm = xBC.split([Z, GN, GN], dim=-1)

        f32 = torch.promote_types(u.dtype, torch.float32)                   # scans run in fp32 (fp64 if asked)
        x = x.reshape(Bsz, T, H, P).to(f32)
        # group g of B and C serves heads g*H/G .. (g+1)*H/G - 1
        Bm = repeat_heads(Bm.reshape(Bsz, T, G, N).to(f32), H // G)                # (B, T, H, N)
        Cm = repeat_heads(Cm.reshape(Bsz, T, G, N).to(f32), H // G)
        dt = F.softplus(dt + self.dt_bias).clamp(*c.time_step_limit).to(f32)     # (B, T, H)
        A = -torch.exp(self.A_log.to(f32))                                        # (H,)
        s0 = state.ssm if state is not None else u.new_zeros(Bsz, H, P, N, dtype=f32)

        recorded = None
        if record:                  # a verify pass: the state after every token, for commit to choose from
            y, states = ssd_states(x, dt, A, Bm, Cm, s0)
            final, recorded = states[-1], Recorded(conv_inputs, states)
        elif T == 1:                # decoding: one step of the recurrence
            y, final = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], s0)
            y = y[:, None]
        else:
            y, final = ssd_chunked(x, dt, A, Bm, Cm, s0, c.mamba_chunk_size)
        y = y + x * self.D.to(f32)[:, None]                                       # D skip, per head
        y = y.reshape(Bsz, T, Z) * F.silu(z.to(f32) if c.mamba_rms_norm else z)  # gate (silu in fp32 before the norm)
        if c.mamba_rms_norm:                                                      # grouped RMSNorm, after the gate
            y = y.view(Bsz, T, G, Z // G)
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
            y = (self.norm.weight.to(f32) * y.reshape(Bsz, T, Z))
        if state is not None:
            state.advance(conv_inputs, final, record)
        return self.out_proj(y.to(u.dtype)), recorded


# ----------------------------------------------------------------------------------------------------------
# Gated DeltaNet (the linear-attention layers of Qwen3.5)

def gated_delta_rule_step(q, k, v, g, beta, state):
    """The gated delta rule for one token (the definition; a decoding step runs it).

    q, k: (b, H, dk) L2-normalised (q also scaled by dk^-0.5), v: (b, H, dv), g: (b, H) log decay (<= 0),
    beta: (b, H) write strength in (0, 1), state: (b, H, dk, dv) memory before the token. All fp32.
        S' = exp(g_t) S_{t-1}             decay the memory
        S_t = S' + k_t (beta_t (v_t - S'^T k_t))^T     write the error of what the memory predicts for k_t
        o_t = S_t^T q_t                   read with the updated memory
    Returns o: (b, H, dv) and the state after the token.
    """
    state = torch.exp(g)[:, :, None, None] * state    # (b, H, dk, dv), a new tensor: the previous stays as it was
    prediction = (k[:, :, None, :] @ state).squeeze(-2)                            # (b, H, dv): S'^T k
    error = beta[:, :, None] * (v - prediction)                                     # (b, H, dv)
    state.addcmul_(k[:, :, :, None], error[:, :, None, :])                          # S' + k error^T
    return (q[:, :, None, :] @ state).squeeze(-2), state                            # (b, H, dv): S^T q


def gated_delta_rule_recurrent(q, k, v, g, beta, state):
    """The rule over T tokens, one gated_delta_rule_step after the other: the reference for the other forms.

    q, k: (b, T, H, dk), v: (b, T, H, dv), g, beta: (b, T, H); state as for gated_delta_rule_step.
    Returns o: (b, T, H, dv) and the list of the T states after each token.
    """
    outs, states = [], []
    for t in range(q.shape[1]):
        o, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
        states.append(state)
    return torch.stack(outs, dim=1), states


def gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size):
    """The same rule computed chunk by chunk (the WY/UT form); used for prefill.

    Same inputs as gated_delta_rule_recurrent. Returns o: (b, T, H, dv) and the state after the last token.
    Inside a chunk with start state S0 and c = cumsum(g), the values written are u = U - W S0 with
        (I + M) U = beta*v,   (I + M) W = beta*k*exp(c),   M[i, j] = beta_i (k_i . k_j) exp(c_i - c_j) for j < i,
    and o_i = exp(c_i) S0^T q_i + sum_{j<=i} (q_i . k_j) exp(c_i - c_j) u_j.
    Padding positions have k = v = 0, g = 0, beta = 0: they leave the state exactly as it was.
    """
    b, T, H, dk = k.shape
    Q = chunk_size
    pad = (-T) % Q
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    n = (T + pad) // Q
    q, k, v = (t.reshape(b, n, Q, H, -1).permute(0, 1, 3, 2, 4) for t in (q, k, v))   # (b, c, H, Q, d)
    g, beta = (t.reshape(b, n, Q, H).permute(0, 1, 3, 2) for t in (g, beta))            # (b, c, H, Q)
    c = g.cumsum(dim=-1)
    decay = torch.exp(segsum(g))                                                         # (b, c, H, Q, Q)

    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    M = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(Q, dtype=k.dtype, device=k.device)
    U = torch.linalg.solve_triangular(eye + M, v_beta, upper=False, unitriangular=True)              # (b, c, H, Q, dv)
    W = torch.linalg.solve_triangular(eye + M, k_beta * c.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay                                             # (b, c, H, Q, Q)

    outs = []
    for i in range(n):
        u = U[:, i] - W[:, i] @ state                                                    # (b, H, Q, dv)
        outs.append((q[:, i] * c[:, i, ..., None].exp()) @ state + attn[:, i] @ u)
        decay_to_end = (c[:, i, :, -1:] - c[:, i]).exp()[..., None]                      # (b, H, Q, 1)
        state = c[:, i, :, -1].exp()[..., None, None] * state + (k[:, i] * decay_to_end).transpose(-1, -2) @ u
    o = torch.stack(outs, dim=1).permute(0, 1, 3, 2, 4).reshape(b, n * Q, H, -1)[:, :T]
    return o, state


def gated_delta_rule_states(q, k, v, g, beta, state):
    """The same rule for a few tokens at once, with the state after every token, in a number of operations that
    does not grow with T (the algebra inside one chunk of gated_delta_rule_chunked, written for a verify pass; the
    arithmetic grows as T^2).

    Same inputs as gated_delta_rule_recurrent. With c_t = g_1 + ... + g_t and S_0 = state, the rule unrolls to
        S_t = exp(c_t) S_0 + sum_{j<=t} exp(c_t - c_j) k_j u_j^T          u_j: the value token j writes
        o_t = S_t^T q_t = exp(c_t) S_0^T q_t + sum_{j<=t} exp(c_t - c_j) (q_t . k_j) u_j
    where u_j = beta_j (v_j - S'^T k_j) is the error of what the decayed memory predicts, which depends on the earlier
    writes; so the u_t solve one unit lower-triangular system:
        u_t + sum_{j<t} beta_t exp(c_t - c_j) (k_t . k_j) u_j = beta_t (v_t - exp(c_t) S_0^T k_t)
    Returns o: (b, T, H, dv) and states: StatesAfterEachToken, states[t] (b, H, dk, dv) the state after token t (as
    gated_delta_rule_recurrent's list). For many tokens prefill uses the chunked form.
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                               # (b, H, T, dk|dv)
    g, beta = g.transpose(1, 2), beta.transpose(1, 2)[..., None]                   # (b, H, T), (b, H, T, 1)
    decay = torch.exp(segsum(g))                                   # (b, H, T, T): [t, j] = exp(c_t - c_j), 0 if j > t
    from_start = torch.exp(g.cumsum(dim=-1))                                        # (b, H, T): exp(c_t)
    M = (beta * k) @ k.transpose(-1, -2) * decay                          # (b, H, T, T), used below the diagonal
    # (I + the part of M below the diagonal) u = rhs: unitriangular, solve_triangular reads only below the diagonal
    rhs = beta * (v - from_start[..., None] * (k @ state))                         # (b, H, T, dv)
    u = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)     # (b, H, T, dv)
    o = (q @ k.transpose(-1, -2) * decay) @ u + from_start[..., None] * (q @ state)   # (b, H, T, dv)
    return o.transpose(1, 2), StatesAfterEachToken(state, from_start, decay, k, u)


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear-attention mixer: projections -> conv+SiLU over q|k|v -> gated delta rule -> gated norm."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        Hk, Hv, dk, dv, D = (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                             c.linear_value_head_dim, c.hidden_size)
        conv_dim = 2 * Hk * dk + Hv * dv
        self.in_proj_qkv = Linear(D, conv_dim, bias=False)
        self.in_proj_z = Linear(D, Hv * dv, bias=False)
        self.in_proj_b = Linear(D, Hv, bias=False)
        self.in_proj_a = Linear(D, Hv, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, c.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(Hv))
        self.A_log = nn.Parameter(torch.zeros(Hv))
        self.norm = RMSNorm(dv, c.rms_norm_eps)                    # plain w (not 1 + w), shared by all heads
        self.out_proj = Linear(Hv * dv, D, bias=False)

    def forward(self, u, state=None, record=False):
        """u (B, T, D) -> (o (B, T, D), recorded), as Mamba2Mixer.forward."""
        c, (Bsz, T, _) = self.c, u.shape
        Hk, Hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        qkv = self.in_proj_qkv(u)                                            # (B, T, 2*Hk*dk + Hv*dv)
        z = self.in_proj_z(u).view(Bsz, T, Hv, dv)
        b, a = self.in_proj_b(u), self.in_proj_a(u)                          # (B, T, Hv) each

        window = state.conv if state is not None else u.new_zeros(Bsz, c.linear_conv_kernel_dim - 1, qkv.shape[-1])
        qkv, conv_inputs = causal_conv(qkv, window, self.conv1d.weight, None)
        qk, v = qkv.split([2 * Hk * dk, Hv * dv], dim=-1)

        f32 = torch.promote_types(u.dtype, torch.float32)                    # the rule runs in fp32 (fp64 if asked)
        qk = qk.reshape(Bsz, T, 2 * Hk, dk).to(f32)                          # the Hk query heads, then the Hk key heads
        qk = qk * torch.rsqrt(qk.pow(2).sum(-1, keepdim=True) + 1e-6)        # L2 norm of each head, eps inside the root
        q, k = qk.split(Hk, dim=2)
        # value head h uses key head h // (Hv/Hk)
        q, k = repeat_heads(q / math.sqrt(dk), Hv // Hk), repeat_heads(k, Hv // Hk)
        v = v.reshape(Bsz, T, Hv, dv).to(f32)
        beta = torch.sigmoid(b).to(f32)                                      # (B, T, Hv)
        g = -torch.exp(self.A_log.to(f32)) * F.softplus(a.to(f32) + self.dt_bias)   # (B, T, Hv), <= 0
        s0 = state.ssm if state is not None else u.new_zeros(Bsz, Hv, dk, dv, dtype=f32)

        recorded = None
        if record:                  # a verify pass: the state after every token, for commit to choose from
            o, states = gated_delta_rule_states(q, k, v, g, beta, s0)
            final, recorded = states[-1], Recorded(conv_inputs, states)
        elif T == 1:                # decoding: one step of the rule
            o, final = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0)
            o = o[:, None]
        else:
            o, final = gated_delta_rule_chunked(q, k, v, g, beta, s0, c.linear_chunk_size)
        o = (self.norm(o.to(u.dtype)) * F.silu(z.to(f32))).to(u.dtype)      # (B, T, Hv, dv)
        if state is not None:
            state.advance(conv_inputs, final, record)
        return self.out_proj(o.reshape(Bsz, T, Hv * dv)), recorded


# ----------------------------------------------------------------------------------------------------------
# State carried between calls

@dataclass
class LayerState:
    """What one decoder layer carries from one call to the next.

    keys/values: preallocated (B, Hkv, max_len, hd) buffers, valid up to Cache.length (attention layers).
    conv: (B, K-1, C) the last K-1 conv inputs; ssm: the recurrent state in fp32, (B, H, P, N) for Mamba-2,
    (B, Hv, dk, dv) for Gated DeltaNet (recurrent layers). Both are replaced, never written in place.
    """
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None

    def advance(self, conv_inputs, final, recording=False):
        """After a recurrent layer's call: conv_inputs (B, K-1+T, C) all conv inputs seen, final the state after the
        last token. New tensors replace the old ones."""
        window = conv_inputs[:, -self.conv.shape[1]:]                    # the last K-1 inputs
        new_inputs = conv_inputs.shape[1] - window.shape[1]                # T
        # a view of conv_inputs, except after a prefill, where it would keep all T inputs alive (after one token it
        # keeps one input more; after a recording pass, its Recorded keeps them all anyway)
        self.conv = window.clone() if new_inputs > 1 and not recording else window
        self.ssm = final

    def __repr__(self):
        return f"LayerState({describe(self)})"


def describe(state):
    """What a LayerState holds, in words and shapes: "KV (1, 2, 40, 16)", "conv (1, 3, 128), state (1, 4, 16, 16)"."""
    parts = [f"KV {tuple(state.keys.shape)}"] if state.keys is not None else []
    parts += [f"conv {tuple(state.conv.shape)}, state {tuple(state.ssm.shape)}"] if state.ssm is not None else []
    return ", ".join(parts) or "nothing"


def layer_ranges(layers):
    """Layer indices as short ranges: [0, 1, 2, 4, 5, 6] -> "0-2, 4-6"."""
    runs = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


class Cache:
    """The model's state for a batch of sequences: one LayerState per layer and the number of tokens held."""

    def __init__(self, model, max_len, batch_size=1):
        c, p = model.config, model.lm_head.weight
        f32 = torch.promote_types(p.dtype, torch.float32)
        self.length = 0                  # tokens held = position of the next token
        self.max_len, self.device = max_len, p.device
        self.layers = []
        for layer_type in c.layer_types:
            s = LayerState()
            if layer_type in ("hybrid", "full_attention"):
                s.keys = p.new_zeros(batch_size, c.num_kv_heads, max_len, c.head_dim)
                s.values = torch.zeros_like(s.keys)
            if layer_type == "hybrid":
                s.conv = p.new_zeros(batch_size, c.mamba_d_conv - 1,
                                     c.mamba_n_heads * c.mamba_d_head + 2 * c.mamba_n_groups * c.mamba_d_state)
                s.ssm = p.new_zeros(batch_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, dtype=f32)
            if layer_type == "linear_attention":
                s.conv = p.new_zeros(batch_size, c.linear_conv_kernel_dim - 1, 2 * c.linear_num_key_heads
                                     * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim)
                s.ssm = p.new_zeros(batch_size, c.linear_num_value_heads, c.linear_key_head_dim,
                                    c.linear_value_head_dim, dtype=f32)
            self.layers.append(s)

    def __repr__(self):
        kinds = {}                                              # layers grouped by what they hold
        for i, state in enumerate(self.layers):
            kinds.setdefault(describe(state), []).append(i)
        return (f"Cache(length {self.length} of {self.max_len}; " +
                "; ".join(f"layers {layer_ranges(i)}: {kind}" for kind, i in kinds.items()) + ")")


# ----------------------------------------------------------------------------------------------------------
# The two kinds of decoder layer

class ParallelHybridLayer(nn.Module):
    """Falcon-H1: h += ssm_out * Mamba2(u) + attn_out * Attention(u * attn_in), u = norm(h); then h += MLP(norm(h))."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mamba = Mamba2Mixer(c)
        self.self_attn = Attention(c)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward = MLP(c)

    def forward(self, h, rope, mask, state, start, leave_out=frozenset(), record=False):
        """h (B, T, D) -> (h, recorded): recorded, the Mamba-2 branch's Recorded (record=True), else None. leave_out:
        the units a draft leaves out of this layer ("attention", "recurrent", "mlp"): each adds nothing to h."""
        c, mixed, recorded = self.c, None, None
        if not leave_out >= {"attention", "recurrent"}:
            u = self.input_layernorm(h)
        if "recurrent" not in leave_out:       # left out: no Mamba-2 call, its conv window and state untouched
            mamba, recorded = self.mamba(u, state, record)
            mixed = scaled(mamba, c.ssm_out_multiplier)
        if "attention" not in leave_out:       # left out: no QKV computed, the KV cache untouched
            attention = scaled(self.self_attn(scaled(u, c.attention_in_multiplier), rope, mask, state, start),
                               c.attention_out_multiplier)
            mixed = attention if mixed is None else mixed + attention
        if mixed is not None:
            h = h + mixed
        if "mlp" not in leave_out:
            h = h + self.feed_forward(self.pre_ff_layernorm(h))
        return h, recorded


class SequentialLayer(nn.Module):
    """Qwen3.5 and Qwen2.5: h += Mixer(norm(h)); h += MLP(norm(h)), the mixer being attention or Gated DeltaNet."""

    def __init__(self, c: Config, layer_type):
        super().__init__()
        unit_offset = c.family == "qwen3_5"
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset)
        if layer_type == "full_attention":
            self.self_attn = Attention(c)
        else:
            self.linear_attn = GatedDeltaNet(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset)
        self.mlp = MLP(c)

    def forward(self, h, rope, mask, state, start, leave_out=frozenset(), record=False):
        """h (B, T, D) -> (h, recorded): recorded, the Gated DeltaNet's Recorded (record=True), else None. leave_out:
        the units a draft leaves out ("attention" or "recurrent", whichever mixer the layer has, and "mlp")."""
        recorded = None
        if hasattr(self, "linear_attn") and "recurrent" not in leave_out:
            mixed, recorded = self.linear_attn(self.input_layernorm(h), state, record)
            h = h + mixed
        elif hasattr(self, "self_attn") and "attention" not in leave_out:
            h = h + self.self_attn(self.input_layernorm(h), rope, mask, state, start)
        if "mlp" not in leave_out:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h, recorded


# ----------------------------------------------------------------------------------------------------------
# What a draft leaves out, and the model

UNITS = ("attention", "recurrent", "mlp")       # the units of a layer a draft can leave out, besides the whole layer


def units_of(layer_type):
    """The units a layer of this type has: Falcon-H1's all three; an attention layer no recurrent mixer; a Gated
    DeltaNet layer no attention."""
    return {"hybrid": UNITS, "full_attention": ("attention", "mlp"), "linear_attention": ("recurrent", "mlp")}[layer_type]


@dataclass(frozen=True)
class Skip:
    """Which parts of the model a forward pass leaves out; a draft model is the full model minus these. Each field is
    a set of layer indices (sets and lists are taken, kept as frozensets).

    layers:    decoder layers replaced by identity (mixers, MLP and norms all skipped).
    attention: layers whose attention adds nothing: Falcon-H1's attention branch, or a full-attention layer's attention
               (its MLP still runs). No QKV is computed and the KV cache is untouched.
    recurrent: layers whose recurrent mixer adds nothing: Falcon-H1's Mamba-2 branch, or a Gated DeltaNet layer's
               mixer (its MLP still runs). Its conv window and state are untouched.
    mlp:       layers whose MLP adds nothing.
    """
    layers: frozenset = frozenset()
    attention: frozenset = frozenset()
    recurrent: frozenset = frozenset()
    mlp: frozenset = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "layers", frozenset(self.layers))
        for field in UNITS:                     # a unit of a layer left out whole is left out already: not named twice
            object.__setattr__(self, field, frozenset(getattr(self, field)) - self.layers)

    def left_out_of(self, i):
        """The units the draft leaves out of layer i (whole layers are in `layers`): a frozenset of UNITS names."""
        return frozenset(unit for unit in UNITS if i in getattr(self, unit))

    def __str__(self):
        names = {"layers": "", "attention": "the attention of ", "recurrent": "the recurrent mixers of ",
                 "mlp": "the MLPs of "}
        parts = [f"{names[field]}layer{'s' * (len(getattr(self, field)) > 1)} "
                 f"{layer_ranges(sorted(getattr(self, field)))}" for field in names if getattr(self, field)]
        return "; ".join(parts) or "nothing"

    def __repr__(self):
        fields = [f"{field}={{{', '.join(map(str, sorted(getattr(self, field))))}}}" for field in ("layers", *UNITS)
                  if getattr(self, field)]
        return f"Skip({', '.join(fields)})"


def check_skip(config, skip):
    """A UsageError naming the first layer or unit of skip that the model does not have; nothing if all is well (a
    Skip naming them would otherwise leave out nothing without a word)."""
    n = config.num_layers
    for field in ("layers", *UNITS):
        for i in sorted(getattr(skip, field)):
            if not (isinstance(i, int) and 0 <= i < n):
                raise UsageError(f"the draft names layer {i!r} ({field}), which the model does not have: its layers "
                                 f"are 0-{n - 1}")
            if field != "layers" and field not in units_of(config.layer_types[i]):
                having = [j for j, t in enumerate(config.layer_types) if field in units_of(t)]
                raise UsageError(f"the draft leaves out the {field} unit of layer {i}, a {config.layer_types[i]} layer, "
                                 f"which has none: " + (f"layers with one: {layer_ranges(having)}" if having else
                                                        "no layer of this model has one"))


class Model(nn.Module):
    """A causal LM of one of the three families. model(input_ids) -> logits (B, T, V) of the full model.
    No padding or attention mask: the sequences of a batch have equal lengths (hsd decodes one at a time)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.model = nn.Module()       # parameter names mirror the checkpoints: model.embed_tokens, model.layers.N...
        self.model.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(
            ParallelHybridLayer(c) if t == "hybrid" else SequentialLayer(c, t) for t in c.layer_types)
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, unit_offset=c.family == "qwen3_5")
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, cache=None, skip=None, record_states=False, normed=True):
        """The final-normed hidden states (B, T, D) for input_ids (B, T) (normed=False: the residual stream after the
        last layer, before the final norm: what the layers add up to, for analyses such as hsd_search's).

        cache: a Cache to continue from and advance (positions start at cache.length), or None for a fresh sequence.
        skip: a Skip describing the parts left out (a draft), or None for the full model.
        record_states: use the verify pass's batched forms (ssd_states, gated_delta_rule_states) and return, with h,
        what they recorded: (h, recorded), recorded[i] layer i's Recorded (the state after every position, each
        computed when indexed), None for attention layers and layers left out, so that a caller can keep the state
        after any prefix of input_ids (speculative decoding: hsd.commit).
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a LongTensor of shape (B, T), got {input_ids.dtype} {tuple(input_ids.shape)}")
        c, skip = self.config, skip or Skip()
        check_skip(c, skip)
        start, T = (cache.length if cache is not None else 0), input_ids.shape[1]
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; {start + T} do not fit: make a larger Cache")
        positions = torch.arange(start, start + T, device=input_ids.device)
        h = scaled(self.model.embed_tokens(input_ids), c.embedding_multiplier)  # (B, T, D)
        rope = rope_cos_sin(positions, c.rotary_dim, c.rope_theta, h.dtype)     # for every attention layer, once
        mask = causal_mask(start, T, h.dtype, h.device)
        recorded = [None] * c.num_layers
        for i, layer in enumerate(self.model.layers):
            if i in skip.layers:
                continue
            state = cache.layers[i] if cache is not None else None
            h, recorded[i] = layer(h, rope, mask, state, start, skip.left_out_of(i), record_states)
        if cache is not None:
            cache.length = start + T
        h = self.model.norm(h) if normed else h
        return (h, recorded) if record_states else h

    def logits(self, h):
        """(B, T, D) hidden states -> (B, T, V) logits."""
        return scaled(self.lm_head(h), self.config.lm_head_multiplier)

    def forward(self, input_ids, cache=None, skip=None, record_states=False):
        """Logits (B, T, V), and with record_states (logits, recorded); the arguments as for hidden_states (with a
        skip, the draft model's logits)."""
        if record_states:
            h, recorded = self.hidden_states(input_ids, cache, skip, record_states=True)
            return self.logits(h), recorded
        return self.logits(self.hidden_states(input_ids, cache, skip))


# ----------------------------------------------------------------------------------------------------------
# Built-in tiny models: the real structures at toy size, random weights, no download

TINY = {
    "tiny-falcon-h1": Config(
        family="falcon_h1", vocab_size=97, hidden_size=64, intermediate_size=128, layer_types=("hybrid",) * 6,
        rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=96, max_position_embeddings=4096,
        num_heads=4, num_kv_heads=2, head_dim=24, rope_theta=1e4, rotary_dim=24,
        mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=16,
        mamba_rms_norm=True, embedding_multiplier=5.656854249492381, lm_head_multiplier=0.5,
        key_multiplier=0.39062499999999994, attention_in_multiplier=1.0, attention_out_multiplier=0.9375,
        ssm_in_multiplier=1.25, ssm_out_multiplier=0.23570226039551587, mlp_multipliers=(0.8838834764831844, 0.5859375),
        ssm_multipliers=(0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738)),
    "tiny-qwen3.5": Config(
        family="qwen3_5", vocab_size=97, hidden_size=64, intermediate_size=128,
        layer_types=("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + ("full_attention",),
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=96, max_position_embeddings=4096,
        num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=1e7, rotary_dim=8, gated_attention=True,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_chunk_size=16),
    "tiny-qwen2.5": Config(
        family="qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, layer_types=("full_attention",) * 6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=96, max_position_embeddings=4096,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, rotary_dim=16, qkv_bias=True),
}


@torch.no_grad()
def init_random(model, seed=0):
    """Seeded random weights: matrices ~ N(0, 1/fan_in), norms near their neutral value, Mamba/DeltaNet decays spread
    over heads. Output projections are doubled and q/k projections quadrupled (sharper attention): with plain scales
    a random tiny model soon repeats one token forever, which makes every draft look perfect."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen)
        if name.endswith("A_log"):
            r = torch.log(torch.rand(p.shape, generator=gen) * 7.5 + 0.5)          # decay rates 0.5..8
        elif name.endswith("dt_bias"):
            r = 0.5 * r - 1.0
        elif name.endswith(".D"):
            r = 1.0 + 0.1 * r
        elif p.dim() == 1 and "norm" in name:
            r = 0.1 * r + (0.0 if is_offset_norm(model, name) else 1.0)
        elif p.dim() == 1:                                                           # biases
            r = 0.1 * r
        elif not name.endswith("embed_tokens.weight"):
            r = r / math.sqrt(p[0].numel())
            r = r * (2.0 if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")) else
                     4.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
        p.copy_(r)
    return model


def is_offset_norm(model, name):
    """Whether the norm parameter `name` stores an offset (Qwen3.5's (1 + w) norms; not its Gated DeltaNet's)."""
    return model.config.family == "qwen3_5" and not name.endswith("linear_attn.norm.weight")


# ----------------------------------------------------------------------------------------------------------
# Loading official checkpoints

OFFICIAL = {
    "falcon-h1-0.5b": "tiiuae/Falcon-H1-0.5B-Base",
    "falcon-h1-3b": "tiiuae/Falcon-H1-3B-Base",
    "qwen3.5-0.8b": "Qwen/Qwen3.5-0.8B-Base",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
}
# The official config.json files of the models above but falcon-h1-3b (byte-exact copies of the Hub's files;
# RESULTS.md, "What the tests prove"): the tests build models from them, hsd_bench random checkpoints.
OFFICIAL_CONFIGS = {
    "falcon-h1-0.5b": {
        "architectures": ["FalconH1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375, "attn_layer_indices": None,
        "bos_token_id": 1, "embedding_multiplier": 5.656854249492381, "eos_token_id": 11, "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 2048,
        "key_multiplier": 0.39062499999999994, "lm_head_multiplier": 0.0390625, "mamba_chunk_size": 128,
        "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_head": 64, "mamba_d_ssm": 1536, "mamba_d_state": 128,
        "mamba_expand": 2, "mamba_n_groups": 1, "mamba_n_heads": 24, "mamba_norm_before_gate": False,
        "mamba_proj_bias": False, "mamba_rms_norm": False, "mamba_use_mlp": True, "max_position_embeddings": 16384,
        "mlp_bias": False, "mlp_expansion_factor": 8, "mlp_multipliers": [0.8838834764831844, 0.5859375],
        "model_type": "falcon_h1", "num_attention_heads": 8, "num_hidden_layers": 36, "num_key_value_heads": 2,
        "num_logits_to_keep": 1, "pad_token_id": 0, "projectors_bias": False, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 100000000000.0, "ssm_in_multiplier": 1.25,
        "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
        "ssm_out_multiplier": 0.23570226039551587, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.52.0.dev0", "use_cache": True, "vocab_size": 32784},
    "qwen3.5-0.8b": {
        "architectures": ["Qwen3_5ForConditionalGeneration"], "image_token_id": 248056, "model_type": "qwen3_5",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "dtype": "bfloat16",
            "eos_token_id": 248044, "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu",
            "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3584,
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6, "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
            "linear_value_head_dim": 128, "max_position_embeddings": 262144, "mlp_only_layers": [],
            "model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
            "num_attention_heads": 8, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True, "use_cache": True, "vocab_size": 248320, "mamba_ssm_dtype": "float32",
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                                "rope_theta": 10000000, "partial_rotary_factor": 0.25}},
        "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 248057,
        "vision_config": {
            "deepstack_visual_indexes": [], "depth": 12, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 768,
            "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 3072, "model_type": "qwen3_5",
            "num_heads": 12, "num_position_embeddings": 2304, "out_hidden_size": 1024, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": 248054, "vision_start_token_id": 248053},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 151936},
}
DOWNLOAD = ["config.json", "tokenizer.json", "*.safetensors", "model.safetensors.index.json"]
TOYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toys")
TOYS = {name: os.path.join(TOYS_DIR, name) for name in ("toy-falcon-h1", "toy-qwen3.5", "toy-qwen2.5")}   # trained


def checkpoint_name(name, config):
    """Our parameter name for a checkpoint tensor, or None for tensors the text model does not use."""
    if name.startswith(("model.visual.", "mtp.")):           # Qwen3.5: vision tower, multi-token-prediction head
        return None
    if name.startswith("model.language_model."):              # Qwen3.5: the text model inside the VLM checkpoint
        name = "model." + name[len("model.language_model."):]
    if name == "model.final_layernorm.weight":                # Falcon-H1's name for the final norm
        name = "model.norm.weight"
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    return name


def resolve(name_or_path):
    """A local directory holding config.json, tokenizer.json and the safetensors, downloading them if needed."""
    local = os.path.expanduser(TOYS.get(name_or_path, name_or_path))
    if os.path.isdir(local):
        return local
    if os.path.isfile(local):                              # config.json, say, for the folder that holds it
        raise UsageError(f"{name_or_path} is a file: give its folder, {os.path.dirname(name_or_path) or '.'}")
    if name_or_path.startswith(("/", ".", "~")):
        raise UsageError(f"no such directory: {name_or_path}")
    repo = OFFICIAL.get(name_or_path, name_or_path)
    if repo.count("/") != 1:
        close = difflib.get_close_matches(name_or_path, [*TOYS, *OFFICIAL, *TINY], n=1)
        raise UsageError(f"unknown model {name_or_path!r}: " + (f"did you mean {close[0]}? " if close else "") +
                         f"use one of {', '.join([*TOYS, *OFFICIAL, *TINY])}, a Hugging Face repo id (owner/name) or a "
                         "local directory")
    folder = name_or_path.split("/")[0]           # "toys/nonexistent" reads as a repo id too: say both
    local_too = f"; nor is there a local folder {name_or_path} (in {folder}/)" if os.path.isdir(folder) else ""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return snapshot_download(repo, allow_patterns=DOWNLOAD)
    except RepositoryNotFoundError:
        raise UsageError(f"{repo} is not a model repository on the Hugging Face Hub (or it needs a login: `hf auth "
                         f"login`){local_too}") from None
    except LocalEntryNotFoundError:
        raise UsageError(f"cannot download {repo}: no connection to the Hugging Face Hub and it is not in the local "
                         f"cache{local_too}. Connect to the network once, or pass a local directory with config.json, "
                         "tokenizer.json and *.safetensors") from None
    except (HfHubHTTPError, OSError) as e:
        raise UsageError(f"cannot download {repo}: {str(e).splitlines()[0]}{local_too}") from None


def not_a_model_folder(path, missing):
    """The UsageError for a folder that lacks one of a model's files: what a model folder holds, and how to get one."""
    return UsageError(f"{path} holds no {missing}: a model folder holds config.json, tokenizer.json and *.safetensors "
                      "(the Hugging Face Hub's layout; e.g. `hf download tiiuae/Falcon-H1-0.5B-Base --local-dir DIR`), "
                      f"or give a short name: {', '.join([*OFFICIAL, *TOYS, *TINY])}")


def safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise UsageError(f"{index} lists {os.path.basename(missing[0])}, which is not there: download it again")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise not_a_model_folder(path, "*.safetensors")
    return files


def damaged(file, error):
    """The UsageError for a file that cannot be read: which file, and what to delete or replace."""
    if os.path.islink(file):            # in the Hugging Face cache: a link to the downloaded file
        fix = f"delete {os.path.realpath(file)} and run the command again, which downloads it anew"
    else:
        fix = "replace it with an intact copy"
    return UsageError(f"{file} is damaged or incomplete ({str(error).splitlines()[0][:100]}): {fix}")


def open_safetensors(file):
    """safe_open(file), with a damaged file (an interrupted download, say) reported as a UsageError."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise damaged(file, e) from None


@torch.no_grad()
def load(name_or_path, dtype=torch.float32, device="cpu"):
    """Load a model in eval mode: a short name (see OFFICIAL), a built-in tiny-* model, a Hub repo id or a local
    directory in the official layout (config.json + *.safetensors, sharded or not).

    The model is built on the meta device (no memory), given empty storage, and every tensor is checked, then read
    and copied in one at a time: peak memory stays near one copy of the weights (plus the largest tensor).
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("CUDA is not available on this machine: use --device cpu")
    if name_or_path in TINY:
        model = init_random(Model(TINY[name_or_path]), seed=0).to(device=device, dtype=dtype)
        return model.eval().requires_grad_(False)
    path = resolve(name_or_path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = config_from_hf(json.load(f))
    except FileNotFoundError:
        raise not_a_model_folder(path, "config.json") from None
    except UsageError as e:                   # read, but not a configuration hsd runs: say what is wrong
        raise UsageError(f"{path}/config.json: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}/config.json is not JSON ({e})") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise UsageError(f"cannot read {path}/config.json: {type(e).__name__}: {e}") from None

    with torch.device("meta"):
        model = Model(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    for layer in model.model.layers:          # the buffers are not in the checkpoint: computed from the config again
        if isinstance(layer, ParallelHybridLayer):
            layer.mamba.mup_vector.copy_(mup_vector(config))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = dict(model.named_parameters())                  # tied weights appear once, as model.embed_tokens.weight
    files = safetensors_files(path)
    where, unexpected = {}, []
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                name = checkpoint_name(key, config)
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                if name in where:
                    raise UsageError(f"{path} holds two tensors for {name}: {where[name][1]} in "
                                     f"{os.path.basename(where[name][0])} and {key} in {os.path.basename(file)}")
                where[name] = (file, key, tuple(f.get_slice(key).get_shape()))
    problems = [f"missing tensor {n} {tuple(p.shape)}" for n, p in expected.items() if n not in where]
    problems += [f"tensor {key} has shape {shape}, expected {tuple(expected[n].shape)}"
                 for n, (_, key, shape) in where.items() if n in expected and shape != tuple(expected[n].shape)]
    problems += [f"unexpected tensor {key}" for key in unexpected]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UsageError(f"checkpoint in {path} does not match its config.json: {'; '.join(problems[:5])}{more}")
    for file in files:
        with open_safetensors(file) as f:
            for name, (fname, key, _) in where.items():
                if fname == file and name in expected:
                    expected[name].copy_(f.get_tensor(key))
    return model.eval().requires_grad_(False)


def char_tokenizer():
    """The tiny models' tokenizer: one token per printable ASCII character (ids 0..94) and newline (95); any other
    character reads as "?"; 96 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models as tokenizer_models
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tokenizer = Tokenizer(tokenizer_models.BPE(vocab={ch: i for i, ch in enumerate(chars)}, merges=[], unk_token="?"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


def load_tokenizer(name_or_path):
    """The model's tokenizers.Tokenizer, from tokenizer.json (char_tokenizer() for tiny-* models)."""
    if name_or_path in TINY:
        return char_tokenizer()
    from tokenizers import Tokenizer
    path = os.path.join(resolve(name_or_path), "tokenizer.json")
    if not os.path.exists(path):
        raise not_a_model_folder(os.path.dirname(path), "tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:                      # the tokenizers library raises a bare Exception for a broken file
        raise damaged(path, e) from None
