#!/usr/bin/python3
"""train.py -- trains the default moeserve model: a small Mixtral-style MoE on
tinyshakespeare with its own byte-level BPE, and exports it as GGUF.

  /usr/bin/python3 models/train/train.py --corpus ../shared/corpus/tinyshakespeare.txt \
      --out models/tinyshakespeare-moe.gguf --work /tmp/moe-train --seed 1234 --steps 1200

Data: the first 90% of the corpus BYTES (split = size * 9 // 10) train the tokenizer
and the model; the last 10% is validation only. Deterministic for a seed and a
thread count (batches come from a seeded generator, single-threaded data order).
Writes to --work: ckpt.pt (weights, config, merges) and summary.json (figures for
the model card); --fixtures DIR also writes the golden-test fixtures (fixtures.py).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe as bpe_mod  # noqa: E402
from model import Config, MoEModel, export_gguf, round_to_f16  # noqa: E402


def log(msg):
    print(msg, flush=True)


def split_corpus(path):
    """(train text, validation text): first 90% of the bytes, last 10%."""
    with open(path, "rb") as fh:
        data = fh.read()
    cut = len(data) * 9 // 10
    return data[:cut].decode("utf-8"), data[cut:].decode("utf-8")


def get_batch(ids, batch, n_ctx, gen):
    starts = torch.randint(0, len(ids) - n_ctx - 1, (batch,), generator=gen)
    x = torch.stack([ids[s:s + n_ctx] for s in starts.tolist()])
    y = torch.stack([ids[s + 1:s + n_ctx + 1] for s in starts.tolist()])
    return x, y


def lr_at(step, steps, peak, warmup):
    """Linear warmup, cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, ids, n_bytes, max_chunks=None):
    """Validation figures: the text is cut into chunks of n_ctx + 1 tokens that
    overlap by one (inputs chunk[:-1], targets chunk[1:]), so every token but the
    first is scored once. bits/byte = total nats / ln 2 / n_bytes. Also counts the
    tokens routed to each expert in each layer."""
    model.eval()
    c = model.c
    T = c.n_ctx
    n_chunks = (len(ids) - 1 + T - 1) // T
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    nats, n_tok = 0.0, 0
    usage = np.zeros((c.n_layer, c.n_expert), dtype=np.int64)
    for i in range(n_chunks):
        x = ids[i * T:i * T + T][None]
        y = ids[i * T + 1:i * T + T + 1][None]
        x = x[:, :y.shape[1]]
        logits = model(x)
        nats += F.cross_entropy(logits.view(-1, c.n_vocab).double(), y.view(-1),
                                reduction="sum").item()
        n_tok += y.numel()
        for li, b in enumerate(model.blocks):
            usage[li] += np.bincount(b.moe.last_topi.flatten().numpy(), minlength=c.n_expert)
    model.train()
    return dict(nats=nats, tokens=n_tok, loss=nats / n_tok,
                bpb=nats / math.log(2) / n_bytes if not max_chunks else None, usage=usage)


def usage_table(usage):
    """Rows per layer: token counts per expert, share of the busiest, entropy in bits
    (max log2(n_expert))."""
    rows = []
    for li, u in enumerate(usage):
        p = u / u.sum()
        ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        rows.append(dict(layer=li, counts=[int(v) for v in u], entropy_bits=ent,
                         max_share=float(p.max()), min_share=float(p.min())))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--work", required=True, help="directory for ckpt.pt and summary.json")
    ap.add_argument("--fixtures", help="write golden-test fixtures into this directory")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-expert", type=int, default=8)
    ap.add_argument("--n-ff", type=int, default=384)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--f32", action="store_true", help="export F32 instead of F16")
    ap.add_argument("--name", default="tinyshakespeare-moe")
    a = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    os.makedirs(a.work, exist_ok=True)

    train_text, val_text = split_corpus(a.corpus)
    log("data: %d train bytes, %d validation bytes" % (len(train_text.encode()),
                                                        len(val_text.encode())))
    tok = bpe_mod.train(train_text, a.vocab, log=log)
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tok.encode(val_text), dtype=torch.long)
    val_bytes = len(val_text.encode())
    log("bpe: vocab %d, %d train tokens (%.2f bytes/token), %d validation tokens (%.1fs)" % (
        tok.n_vocab, len(train_ids), len(train_text.encode()) / len(train_ids), len(val_ids),
        time.time() - t_start))

    c = Config(n_vocab=tok.n_vocab, n_ctx=a.n_ctx, n_embd=a.n_embd, n_layer=a.n_layer,
               n_head=a.n_head, n_head_kv=a.n_head_kv, n_expert=a.n_expert,
               n_expert_used=2, n_ff=a.n_ff, dropout=a.dropout)
    model = MoEModel(c)
    model.init_weights()
    total, active = model.n_params()
    log("model: %d parameters, %d active per token" % (total, active))

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=a.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.95))
    gen = torch.Generator()
    gen.manual_seed(a.seed)

    t_train = time.time()
    tokens_done = 0
    history = []
    for step in range(a.steps):
        lr = lr_at(step, a.steps, a.lr, a.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(train_ids, a.batch, c.n_ctx, gen)
        logits = model(x)
        ce = F.cross_entropy(logits.view(-1, c.n_vocab), y.view(-1))
        aux = model.aux_loss()
        loss = ce + a.aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_done += x.numel()
        if step % 10 == 0 or step == a.steps - 1:
            el = time.time() - t_train
            tps = tokens_done / el
            eta = el / (step + 1) * (a.steps - step - 1)
            log("step %5d/%d  loss %.4f  aux %.4f  lr %.2e  %.0f tok/s  elapsed %.1f min  "
                "ETA %.1f min" % (step, a.steps, ce.item(), aux.item(), lr, tps, el / 60,
                                  eta / 60))
        if a.eval_every and step > 0 and step % a.eval_every == 0:
            ev = evaluate(model, val_ids, val_bytes, max_chunks=24)
            log("eval step %d: validation loss %.4f nats/token (first 24 chunks)" %
                (step, ev["loss"]))
            history.append(dict(step=step, val_loss=ev["loss"], train_loss=ce.item()))
    train_s = time.time() - t_train

    # From here on the model is exactly what the file holds.
    round_to_f16(model) if not a.f32 else None
    ev = evaluate(model, val_ids, val_bytes)
    log("validation: %.4f nats/token, %.4f bits/byte over %d tokens, %d bytes" % (
        ev["loss"], ev["bpb"], ev["tokens"], val_bytes))
    util = usage_table(ev["usage"])
    for r in util:
        log("layer %d: experts %s entropy %.3f bits" % (r["layer"], r["counts"],
                                                        r["entropy_bits"]))
    export_gguf(model, tok, a.out, a.name, f16=not a.f32)
    torch.save(dict(state=model.state_dict(), config=c.as_dict(), merges=tok.merges,
                    f16=not a.f32), os.path.join(a.work, "ckpt.pt"))
    summary = dict(args=vars(a), argv=sys.argv, params_total=total, params_active=active,
                   config=c.as_dict(), train_seconds=train_s,
                   wall_seconds=time.time() - t_start, train_tokens=len(train_ids),
                   val_tokens=len(val_ids), val_bytes=val_bytes, val_loss=ev["loss"],
                   val_bpb=ev["bpb"], val_ppl=math.exp(ev["loss"]), utilisation=util,
                   history=history, torch=torch.__version__,
                   file_bytes=os.path.getsize(a.out))
    with open(os.path.join(a.work, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    if a.fixtures:
        import fixtures
        fixtures.write(model, tok, val_text, a.fixtures, log)
    log("done: %s (%d bytes), training %.1f min, total %.1f min" % (
        a.out, os.path.getsize(a.out), train_s / 60, (time.time() - t_start) / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
