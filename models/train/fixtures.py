"""fixtures.py -- golden-test fixtures from the PyTorch model (tests/data/).

  fixtures.py --ckpt WORK/ckpt.pt --corpus CORPUS --out-dir tests/data

  <name>.val.u16     the training tokenizer's ids for the whole validation text
                     (last 10% of the corpus bytes), uint16 little-endian
  <name>.golden.bin  "MOEGOLD1", then u32 n_tokens, n_vocab, n_greedy; int32 tokens
                     (the first n_tokens validation ids); float32 logits
                     [n_tokens][n_vocab] of the PyTorch forward pass at every
                     position; int32 greedy continuation (n_greedy argmax tokens)
"""
import os
import struct

import numpy as np
import torch

N_SAMPLE = 64
N_GREEDY = 32


def write(model, tok, val_text, out_dir, log, name="tinyshakespeare-moe"):
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    ids = tok.encode(val_text)
    if max(ids) > 0xFFFF:
        raise ValueError("vocabulary too large for uint16 fixture")
    with open(os.path.join(out_dir, name + ".val.u16"), "wb") as fh:
        fh.write(np.asarray(ids, dtype="<u2").tobytes())
    sample = ids[:N_SAMPLE]
    with torch.no_grad():
        logits = model(torch.tensor([sample]))[0].float().numpy()
        seq = list(sample)
        margins = []
        for _ in range(N_GREEDY):
            last = model(torch.tensor([seq]))[0, -1]
            top2 = torch.topk(last, 2).values
            margins.append(float(top2[0] - top2[1]))
            seq.append(int(torch.argmax(last)))
    greedy = seq[N_SAMPLE:]
    with open(os.path.join(out_dir, name + ".golden.bin"), "wb") as fh:
        fh.write(b"MOEGOLD1" + struct.pack("<III", N_SAMPLE, logits.shape[1], N_GREEDY))
        fh.write(np.asarray(sample, dtype="<i4").tobytes())
        fh.write(logits.astype("<f4").tobytes())
        fh.write(np.asarray(greedy, dtype="<i4").tobytes())
    log("fixtures: %d validation ids, %d-token sample, greedy %r (smallest top-2 margin %.4f)"
        % (len(ids), N_SAMPLE, tok.decode(greedy), min(margins)))
    return ids, sample, logits, greedy


def main():
    """Rewrites the fixtures from a training checkpoint (train.py --work DIR/ckpt.pt)."""
    import argparse
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bpe as bpe_mod
    from model import Config, MoEModel
    from train import split_corpus
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ck = torch.load(a.ckpt)
    model = MoEModel(Config(**ck["config"]))
    model.load_state_dict(ck["state"])
    tok = bpe_mod.BPE([tuple(p) for p in ck["merges"]])
    write(model, tok, split_corpus(a.corpus)[1], a.out_dir, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
