#!/usr/bin/python3
"""check_export.py -- the exported GGUF computes what the PyTorch model computes.

Runs the independent float64 reference (tests/reference/ref.py) on the exported
file and compares its logits with the PyTorch forward pass, position by position
(max_j |torch - ref| / max_j |ref|).

  check_export.py                      random tiny model, F32 and F16 exports
  check_export.py --ckpt WORK/ckpt.pt --gguf models/tinyshakespeare-moe.gguf
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))
import bpe as bpe_mod  # noqa: E402
import ref  # noqa: E402
from model import Config, MoEModel, export_gguf, round_to_f16  # noqa: E402


def compare(model, path, tokens):
    model.eval()
    with torch.no_grad():
        got = model(torch.tensor([tokens]))[0].double().numpy()
    want = ref.forward(ref.Model(path), tokens)
    rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    return float(rel.max())


def random_check():
    text = open(os.path.join(HERE, "bpe.py")).read()
    tok = bpe_mod.train(text, 300)
    ok = True
    for f16 in (False, True):
        torch.manual_seed(7)
        c = Config(n_vocab=tok.n_vocab, n_ctx=64, n_embd=64, n_layer=2, n_head=4,
                   n_head_kv=2, n_expert=8, n_ff=48)
        m = MoEModel(c)
        m.init_weights()
        with torch.no_grad():     # make norms and scales non-trivial
            for n, p in m.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.05))
        if f16:
            round_to_f16(m)
        tokens = tok.encode("def encode(self, text):\n    return 42")[:40]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tiny.gguf")
            export_gguf(m, tok, path, "tiny", f16=f16)
            err = compare(m, path, tokens)
        print("random tiny model, %s export, %d tokens: max rel err %.2e" % (
            "F16" if f16 else "F32", len(tokens), err))
        ok = ok and err < 1e-5
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt")
    ap.add_argument("--gguf")
    ap.add_argument("--corpus", default=os.path.join(HERE, "..", "..", "..", "shared",
                                                     "corpus", "tinyshakespeare.txt"))
    a = ap.parse_args()
    if not a.ckpt:
        return 0 if random_check() else 1
    ck = torch.load(a.ckpt)
    c = Config(**ck["config"])
    m = MoEModel(c)
    m.load_state_dict(ck["state"])
    tok = bpe_mod.BPE([tuple(p) for p in ck["merges"]])
    with open(a.corpus, "rb") as fh:
        data = fh.read()
    val = data[len(data) * 9 // 10:].decode("utf-8")
    tokens = tok.encode(val)[:64]
    err = compare(m, a.gguf, tokens)
    print("%s vs %s, %d tokens: max rel err %.2e" % (a.ckpt, a.gguf, len(tokens), err))
    return 0 if err < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
