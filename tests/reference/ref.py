#!/usr/bin/python3
"""ref.py -- independent float64 reference forward pass for MoE GGUF models.

Supports the four architectures moeserve serves (llama incl. dense, qwen2moe, olmoe,
qwen3moe) exactly as ../shared/guides/GGUF-MOE-FACTS.md describes them. Written
separately from the C engine: its own GGUF reader (gguf_read.py), its own reading of
the hyperparameters, and a plain whole-sequence forward pass (no KV cache: every
greedy step recomputes the sequence from scratch).

  ref.py MODEL.gguf --tokens 1,2,3 [--logits-out FILE.npy|FILE.bin] [--greedy N --print-json]
         [--kv-f16]

--logits-out writes float32 logits of shape (n_tokens, n_vocab) for the given tokens
(.npy via numpy, anything else raw little-endian float32). --greedy N appends N
argmax tokens; --print-json prints {"tokens": [the N new tokens]}. --kv-f16 models
an F16 KV cache: every key (after its norm and RoPE) and value is rounded to float32,
clipped to the largest finite float16 (+-65504) and rounded to float16 (to nearest,
ties to even) before attention uses it.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_read import GGUF, GGUFError  # noqa: E402

# Per architecture: rope pairing, q/k norm kind, q/k/v biases, routing renormalisation,
# shared expert. (From the facts file; deliberately spelled out here, not imported.)
ARCHS = {
    "llama":    dict(neox=False, qk_norm=None,   bias=False, renorm=True,  shared=False),
    "qwen2moe": dict(neox=True,  qk_norm=None,   bias=True,  renorm=False, shared=True),
    "olmoe":    dict(neox=True,  qk_norm="full", bias=False, renorm=False, shared=False),
    "qwen3moe": dict(neox=True,  qk_norm="head", bias=False, renorm=True,  shared=False),
}


def f16_cached(a):
    """What an F16 KV cache keeps of the float64 array a (see --kv-f16)."""
    return np.clip(a.astype(np.float32), -65504, 65504).astype(np.float16).astype(np.float64)


class Model:
    """Hyperparameters and float64 weights of one GGUF model."""

    def __init__(self, path, kv_f16=False):
        self.kv_f16 = kv_f16
        g = GGUF(path)
        self.g = g
        arch = g.kv.get("general.architecture")
        if arch not in ARCHS:
            raise GGUFError("unknown architecture %r" % (arch,))
        self.arch = arch
        self.cfg = ARCHS[arch]

        def key(name, default=None):
            v = g.kv.get(arch + "." + name, default)
            if v is None:
                raise GGUFError("missing key %s.%s" % (arch, name))
            return v

        self.n_layer = int(key("block_count"))
        self.n_embd = int(key("embedding_length"))
        self.n_head = int(key("attention.head_count"))
        self.n_head_kv = int(key("attention.head_count_kv", self.n_head))
        self.head_dim = int(key("attention.key_length", self.n_embd // self.n_head))
        vdim = int(key("attention.value_length", self.head_dim))
        if vdim != self.head_dim:
            raise GGUFError("key_length != value_length")
        self.eps = float(key("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(key("rope.freq_base", 10000.0))
        self.n_rot = int(key("rope.dimension_count", self.head_dim))
        self.n_expert = int(key("expert_count", 0))
        self.n_expert_used = int(key("expert_used_count", 0))
        if arch in ("qwen3moe", "qwen2moe"):
            self.n_ff = int(key("expert_feed_forward_length"))
        else:
            self.n_ff = int(key("feed_forward_length"))
        self.n_ff_shexp = int(key("expert_shared_feed_forward_length")) if self.cfg["shared"] else 0

        self.tok_embd = g.tensor("token_embd.weight")            # (n_vocab, n_embd)
        self.n_vocab = self.tok_embd.shape[0]
        self.output_norm = g.tensor("output_norm.weight")        # (n_embd,)
        self.output = g.tensor("output.weight") if "output.weight" in g.tensors else self.tok_embd
        self.layers = [self._layer(i) for i in range(self.n_layer)]

    def _layer(self, i):
        """Loads blk.i.* into a dict, short names (q, k, v, o, ...)."""
        g = self.g
        names = {
            "attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
            "o": "attn_output", "ffn_norm": "ffn_norm",
        }
        if self.cfg["bias"]:
            names.update(bq="attn_q", bk="attn_k", bv="attn_v")
        if self.cfg["qk_norm"]:
            names.update(q_norm="attn_q_norm", k_norm="attn_k_norm")
        if self.n_expert == 0:
            names.update(gate="ffn_gate", up="ffn_up", down="ffn_down")
        else:
            names.update(router="ffn_gate_inp", gate_exps="ffn_gate_exps",
                         up_exps="ffn_up_exps", down_exps="ffn_down_exps")
        if self.cfg["shared"]:
            names.update(sh_inp="ffn_gate_inp_shexp", sh_gate="ffn_gate_shexp",
                         sh_up="ffn_up_shexp", sh_down="ffn_down_shexp")
        out = {}
        for short, base in names.items():
            suffix = ".bias" if short in ("bq", "bk", "bv") else ".weight"
            name = "blk.%d.%s%s" % (i, base, suffix)
            if base.endswith("_exps") and g.shape(name) is None:
                # Mixtral files before April 2024: one tensor per expert
                per = base[:-len("_exps")]
                out[short] = np.stack([g.tensor("blk.%d.%s.%d.weight" % (i, per, x)) for x in range(self.n_expert)])
            else:
                out[short] = g.tensor(name)
        return out


def rms_norm(x, w, eps):
    """x * w / sqrt(mean(x^2) + eps) over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope(x, n_rot, base, neox):
    """Rotates the first n_rot dims of every head. x: (T, H, D), position = row index."""
    T = x.shape[0]
    half = n_rot // 2
    pos = np.arange(T, dtype=np.float64)[:, None]                 # (T, 1)
    inv = base ** (-2.0 * np.arange(half, dtype=np.float64) / n_rot)  # (half,)
    ang = pos * inv                                               # (T, half)
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def attention(m, L, h):
    """Causal multi-head (grouped-query) self-attention over the whole sequence."""
    T = h.shape[0]
    q = h @ L["q"].T
    k = h @ L["k"].T
    v = h @ L["v"].T
    if m.cfg["bias"]:
        q, k, v = q + L["bq"], k + L["bk"], v + L["bv"]
    if m.cfg["qk_norm"] == "full":
        q = rms_norm(q, L["q_norm"], m.eps)
        k = rms_norm(k, L["k_norm"], m.eps)
    D = m.head_dim
    q = q.reshape(T, m.n_head, D)
    k = k.reshape(T, m.n_head_kv, D)
    v = v.reshape(T, m.n_head_kv, D)
    if m.cfg["qk_norm"] == "head":
        q = rms_norm(q, L["q_norm"], m.eps)
        k = rms_norm(k, L["k_norm"], m.eps)
    q = rope(q, m.n_rot, m.rope_base, m.cfg["neox"])
    k = rope(k, m.n_rot, m.rope_base, m.cfg["neox"])
    if m.kv_f16:
        k, v = f16_cached(k), f16_cached(v)
    group = m.n_head // m.n_head_kv
    mask = np.triu(np.full((T, T), -np.inf), 1)
    out = np.zeros((T, m.n_head, D))
    for hd in range(m.n_head):
        kh = hd // group
        s = q[:, hd, :] @ k[:, kh, :].T / np.sqrt(D) + mask
        s = np.exp(s - s.max(axis=1, keepdims=True))
        s /= s.sum(axis=1, keepdims=True)
        out[:, hd, :] = s @ v[:, kh, :]
    return out.reshape(T, m.n_head * D) @ L["o"].T


def ffn(gate, up, down, x):
    """down( silu(gate x) * (up x) ) for rows of x."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def moe(m, L, h):
    """Routed experts (+ qwen2moe's gated shared expert) for every row of h."""
    T = h.shape[0]
    logits = h @ L["router"].T                                   # (T, n_expert)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    out = np.zeros_like(h)
    for t in range(T):
        # stable sort: ties keep the lower expert index first
        top = np.argsort(-p[t], kind="stable")[:m.n_expert_used]
        w = p[t, top]
        if m.cfg["renorm"]:
            w = w / w.sum()
        for e, we in zip(top, w):
            out[t] += we * ffn(L["gate_exps"][e], L["up_exps"][e], L["down_exps"][e], h[t:t + 1])[0]
    if m.cfg["shared"]:
        g = h @ L["sh_inp"]                                       # (T,)
        sig = 1.0 / (1.0 + np.exp(-g))
        out += sig[:, None] * ffn(L["sh_gate"], L["sh_up"], L["sh_down"], h)
    return out


def forward(m, tokens):
    """Logits (T, n_vocab) in float64 for every position of tokens."""
    x = m.tok_embd[np.asarray(tokens, dtype=np.int64)]
    for L in m.layers:
        x = x + attention(m, L, rms_norm(x, L["attn_norm"], m.eps))
        h = rms_norm(x, L["ffn_norm"], m.eps)
        if m.n_expert == 0:
            x = x + ffn(L["gate"], L["up"], L["down"], h)
        else:
            x = x + moe(m, L, h)
    return rms_norm(x, m.output_norm, m.eps) @ m.output.T


def greedy(m, tokens, n):
    """n argmax tokens after tokens (whole-sequence recompute each step)."""
    seq = list(tokens)
    new = []
    for _ in range(n):
        nxt = int(np.argmax(forward(m, seq)[-1]))
        seq.append(nxt)
        new.append(nxt)
    return new


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--logits-out")
    ap.add_argument("--greedy", type=int, default=0)
    ap.add_argument("--print-json", action="store_true")
    ap.add_argument("--kv-f16", action="store_true", help="keys and values rounded to float16")
    a = ap.parse_args()
    try:
        m = Model(a.model, kv_f16=a.kv_f16)
    except (GGUFError, KeyError, ValueError, OSError) as e:
        print("ref.py: %s: %s" % (a.model, e), file=sys.stderr)
        return 1
    tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    if not tokens or min(tokens) < 0 or max(tokens) >= m.n_vocab:
        print("ref.py: token ids must be in [0, %d)" % m.n_vocab, file=sys.stderr)
        return 1
    if a.logits_out:
        logits = forward(m, tokens).astype("<f4")
        if a.logits_out.endswith(".npy"):
            np.save(a.logits_out, logits)
        else:
            with open(a.logits_out, "wb") as fh:
                fh.write(logits.tobytes())
    if a.greedy > 0:
        new = greedy(m, tokens, a.greedy)
        if a.print_json:
            print(json.dumps({"tokens": new}))
        else:
            print(",".join(str(t) for t in new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
