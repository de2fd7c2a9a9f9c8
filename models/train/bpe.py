"""bpe.py -- byte-level BPE (GPT-2 style): training, encoding, decoding.

The vocabulary is laid out as
    ids 0..255       one token per byte value (byte b has id b)
    ids 256..        one token per merge, in rank order (merge r creates id 256 + r)
    last id          <|endoftext|> (control token; bos = eos)
Token strings are the GPT-2 byte-to-unicode images of their bytes, and merges are
written as "left right" in those images, so a GGUF "gpt2" tokenizer reproduces the
encoding: split the text with the GPT-2 pre-tokenizer regex, then inside each
pre-token apply merges lowest rank first until none applies.

Training is deterministic: the most frequent adjacent pair wins, ties go to the
pair whose (left id, right id) is smallest.
"""
import collections
import heapq

import regex

# GPT-2's pre-tokenizer (tokenizer.ggml.pre = "gpt-2").
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")
_SPLIT = regex.compile(GPT2_PATTERN)

EOT = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's reversible map from byte values to printable unicode characters."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
            + list(range(ord("\xae"), ord("\xff") + 1)))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_CHAR = bytes_to_unicode()


def pretokenize(text):
    """Pre-token byte strings of text (str) in order."""
    return [m.encode("utf-8") for m in _SPLIT.findall(text)]


class BPE:
    """merges: list of (left id, right id) in rank order."""

    def __init__(self, merges):
        self.merges = list(merges)
        self.rank = {pair: r for r, pair in enumerate(self.merges)}
        self.token_bytes = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.eot = len(self.token_bytes)
        self.n_vocab = self.eot + 1
        self._cache = {}

    # -- encoding -------------------------------------------------------
    def encode_word(self, word):
        """Ids of one pre-token (bytes): merges applied lowest rank first."""
        got = self._cache.get(word)
        if got is not None:
            return got
        ids = list(word)
        while len(ids) > 1:
            best, best_i = None, -1
            for i in range(len(ids) - 1):
                r = self.rank.get((ids[i], ids[i + 1]))
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            # merge every occurrence of that pair, left to right
            pair = self.merges[best]
            out, i = [], 0
            while i < len(ids):
                if i < len(ids) - 1 and (ids[i], ids[i + 1]) == pair:
                    out.append(256 + best)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        self._cache[word] = ids
        return ids

    def encode(self, text):
        out = []
        for w in pretokenize(text):
            out.extend(self.encode_word(w))
        return out

    def decode(self, ids):
        return b"".join(self.token_bytes[i] for i in ids if i != self.eot).decode(
            "utf-8", errors="replace")

    # -- GGUF metadata --------------------------------------------------
    def token_strings(self):
        toks = ["".join(BYTE_CHAR[b] for b in tb) for tb in self.token_bytes]
        return toks + [EOT]

    def merge_strings(self):
        toks = self.token_strings()
        return ["%s %s" % (toks[a], toks[b]) for a, b in self.merges]

    def token_types(self):
        return [1] * (self.n_vocab - 1) + [3]   # normal ..., control


def train(text, n_vocab, log=None):
    """Learns n_vocab - 257 merges from text (str). Returns a BPE."""
    n_merges = n_vocab - 257
    if n_merges < 0:
        raise ValueError("n_vocab must be at least 257")
    counts = collections.Counter(pretokenize(text))
    words = [list(w) for w in counts]           # current id sequence of each word
    freq = [counts[w] for w in counts]
    pair_count = collections.defaultdict(int)
    where = collections.defaultdict(set)        # pair -> indices of words holding it
    for wi, ids in enumerate(words):
        for p in zip(ids, ids[1:]):
            pair_count[p] += freq[wi]
            where[p].add(wi)
    # max-heap on (count, smallest pair first); stale entries are skipped lazily
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negc or -negc <= 0:
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        touched = set()
        for wi in sorted(where.pop(pair, ())):
            ids = words[wi]
            f = freq[wi]
            for p in zip(ids, ids[1:]):        # remove this word's old pairs
                pair_count[p] -= f
                touched.add(p)
            out, i = [], 0
            while i < len(ids):
                if i < len(ids) - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):        # add the new ones back
                pair_count[p] += f
                where[p].add(wi)
                touched.add(p)
        pair_count.pop(pair, None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
        if log and len(merges) % 256 == 0:
            log("bpe: %d/%d merges" % (len(merges), n_merges))
    return BPE(merges)
