"""model.py -- a small Mixtral-style MoE decoder in PyTorch and its GGUF export.

Computes exactly what the llama architecture in GGUF means (see
../../tests/reference/ref.py): pre-RMSNorm blocks, grouped-query attention with
"normal" RoPE (consecutive pairs rotated), and a MoE feed-forward whose router
takes softmax over all experts, keeps the top-k and renormalises their weights;
each expert is down(silu(gate x) * up x). Output head separate from the embedding.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gguf_write import Writer


class Config:
    def __init__(self, **kw):
        self.n_vocab = 2048
        self.n_ctx = 256
        self.n_embd = 256
        self.n_layer = 4
        self.n_head = 4
        self.n_head_kv = 2
        self.n_expert = 8
        self.n_expert_used = 2
        self.n_ff = 384            # width of one expert
        self.rope_base = 10000.0
        self.eps = 1e-5
        self.dropout = 0.0
        for k, v in kw.items():
            if not hasattr(self, k):
                raise ValueError("unknown config key %s" % k)
            setattr(self, k, v)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def as_dict(self):
        return dict(self.__dict__)


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(n_ctx, head_dim, base):
    """cos, sin of shape (n_ctx, head_dim/2): angle pos * base^(-2i/d), in float64."""
    inv = base ** (-2.0 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_normal(x, cos, sin):
    """llama ("normal") RoPE: rotates (x[2i], x[2i+1]). x: (B, H, T, D)."""
    a, b = x[..., 0::2], x[..., 1::2]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    return torch.stack((ra, rb), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d = c.head_dim
        self.q = nn.Linear(c.n_embd, c.n_head * d, bias=False)
        self.k = nn.Linear(c.n_embd, c.n_head_kv * d, bias=False)
        self.v = nn.Linear(c.n_embd, c.n_head_kv * d, bias=False)
        self.o = nn.Linear(c.n_head * d, c.n_embd, bias=False)
        self.drop = nn.Dropout(c.dropout)
        mask = torch.triu(torch.ones(c.n_ctx, c.n_ctx, dtype=torch.bool), 1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, cos, sin):
        c = self.c
        B, T, _ = x.shape
        D = c.head_dim
        q = self.q(x).view(B, T, c.n_head, D).transpose(1, 2)
        k = self.k(x).view(B, T, c.n_head_kv, D).transpose(1, 2)
        v = self.v(x).view(B, T, c.n_head_kv, D).transpose(1, 2)
        q = rope_normal(q, cos[:T], sin[:T])
        k = rope_normal(k, cos[:T], sin[:T])
        group = c.n_head // c.n_head_kv
        k = k.repeat_interleave(group, dim=1)    # head h uses kv head h // group
        v = v.repeat_interleave(group, dim=1)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        s = s.masked_fill(self.mask[:T, :T], float("-inf"))
        y = self.drop(torch.softmax(s, dim=-1)) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, c.n_head * D))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; keeps routing statistics of the last call."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        E, d, f = c.n_expert, c.n_embd, c.n_ff
        self.router = nn.Linear(d, E, bias=False)
        self.gate = nn.Parameter(torch.empty(E, f, d))
        self.up = nn.Parameter(torch.empty(E, f, d))
        self.down = nn.Parameter(torch.empty(E, d, f))
        self.aux_loss = None
        self.last_topi = None

    def forward(self, x):
        c = self.c
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N = x.shape[0]
        p = torch.softmax(self.router(x), dim=-1)             # (N, E)
        topw, topi = torch.topk(p, c.n_expert_used, dim=-1)  # sorted, descending
        topw = topw / topw.sum(-1, keepdim=True)
        self.last_topi = topi.detach()
        # Switch-style load balancing: E * sum_e (fraction routed to e) * (mean prob of e)
        frac = torch.bincount(topi.flatten(), minlength=c.n_expert).float() / (N * c.n_expert_used)
        self.aux_loss = c.n_expert * torch.sum(frac * p.mean(0))
        out = torch.zeros_like(x)
        flat_i = topi.flatten()
        flat_w = topw.flatten()
        order = torch.argsort(flat_i, stable=True)
        counts = torch.bincount(flat_i, minlength=c.n_expert).tolist()
        tok_all = order // c.n_expert_used
        start = 0
        for e in range(c.n_expert):
            n = counts[e]
            if n == 0:
                continue
            sel = order[start:start + n]
            tok = tok_all[start:start + n]
            start += n
            h = x[tok]
            y = (F.silu(h @ self.gate[e].t()) * (h @ self.up[e].t())) @ self.down[e].t()
            out.index_add_(0, tok, y * flat_w[sel][:, None])
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn_norm = RMSNorm(c.n_embd, c.eps)
        self.attn = Attention(c)
        self.ffn_norm = RMSNorm(c.n_embd, c.eps)
        self.moe = MoE(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.moe(self.ffn_norm(x)))


class MoEModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embd = nn.Embedding(c.n_vocab, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.eps)
        self.output = nn.Linear(c.n_embd, c.n_vocab, bias=False)
        cos, sin = rope_tables(c.n_ctx, c.head_dim, c.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.drop = nn.Dropout(c.dropout)

    def init_weights(self):
        """GPT-2 style: N(0, 0.02), residual outputs scaled by 1/sqrt(2 n_layer)."""
        std = 0.02
        res = std / math.sqrt(2 * self.c.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith("attn.o.weight") or name.endswith("moe.down"):
                nn.init.normal_(p, 0.0, res)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.c.n_ctx:
            raise ValueError("sequence longer than n_ctx")
        x = self.drop(self.embd(idx))
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        return self.output(self.norm(x))

    def aux_loss(self):
        return sum(b.moe.aux_loss for b in self.blocks) / len(self.blocks)

    def n_params(self):
        """(total, active per token) parameter counts."""
        c = self.c
        total = sum(p.numel() for p in self.parameters())
        per_expert = 3 * c.n_embd * c.n_ff
        active = total - c.n_layer * (c.n_expert - c.n_expert_used) * per_expert
        return total, active


def round_to_f16(model):
    """Rounds every matrix to float16 in place: the PyTorch model then computes
    exactly what the F16 GGUF file holds (1-D norms stay F32, as exported)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _exported_f16(name, p):
                p.copy_(p.half().float())


def _exported_f16(name, p):
    return p.dim() >= 2 and not name.endswith("router.weight")


def export_gguf(model, bpe, path, name, f16=True):
    """Writes model + tokenizer as a llama-architecture GGUF."""
    c = model.c
    w = Writer()
    A = "llama"
    w.string("general.architecture", A)
    w.string("general.name", name)
    w.u32("general.file_type", 1 if f16 else 0)
    w.u32("general.alignment", 32)
    w.u32(A + ".vocab_size", c.n_vocab)
    w.u32(A + ".context_length", c.n_ctx)
    w.u32(A + ".embedding_length", c.n_embd)
    w.u32(A + ".block_count", c.n_layer)
    w.u32(A + ".feed_forward_length", c.n_ff)
    w.u32(A + ".attention.head_count", c.n_head)
    w.u32(A + ".attention.head_count_kv", c.n_head_kv)
    w.u32(A + ".rope.dimension_count", c.head_dim)
    w.f32(A + ".rope.freq_base", c.rope_base)
    w.f32(A + ".attention.layer_norm_rms_epsilon", c.eps)
    w.u32(A + ".expert_count", c.n_expert)
    w.u32(A + ".expert_used_count", c.n_expert_used)
    w.string("tokenizer.ggml.model", "gpt2")
    w.string("tokenizer.ggml.pre", "gpt-2")
    w.str_array("tokenizer.ggml.tokens", bpe.token_strings())
    w.i32_array("tokenizer.ggml.token_type", bpe.token_types())
    w.str_array("tokenizer.ggml.merges", bpe.merge_strings())
    w.u32("tokenizer.ggml.bos_token_id", bpe.eot)
    w.u32("tokenizer.ggml.eos_token_id", bpe.eot)
    w.boolean("tokenizer.ggml.add_bos_token", False)
    w.boolean("tokenizer.ggml.add_eos_token", False)

    def t(gname, tname, p):
        w.add_tensor(gname, p.detach().float().numpy(), f16=f16 and _exported_f16(tname, p))

    params = dict(model.named_parameters())
    t("token_embd.weight", "embd.weight", params["embd.weight"])
    for i in range(c.n_layer):
        pre = "blocks.%d." % i
        blk = "blk.%d." % i
        for g, n in (("attn_norm", "attn_norm.weight"), ("attn_q", "attn.q.weight"),
                     ("attn_k", "attn.k.weight"), ("attn_v", "attn.v.weight"),
                     ("attn_output", "attn.o.weight"), ("ffn_norm", "ffn_norm.weight"),
                     ("ffn_gate_inp", "moe.router.weight"), ("ffn_gate_exps", "moe.gate"),
                     ("ffn_up_exps", "moe.up"), ("ffn_down_exps", "moe.down")):
            t(blk + g + ".weight", pre + n, params[pre + n])
    t("output_norm.weight", "norm.weight", params["norm.weight"])
    t("output.weight", "output.weight", params["output.weight"])
    w.write(path)
