"""gguf_read.py -- a minimal, independent GGUF v2/v3 reader for the reference.

Written from the GGUF format description only (it shares nothing with the C reader):
header, key/values, tensor infos, aligned data section. Tensors come back as
numpy float64 arrays shaped with the OUTERMOST dimension first, i.e. a GGUF tensor
with ne = [n_embd, n_out] becomes an array of shape (n_out, n_embd).
"""
import struct

import numpy as np

# GGUF value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)

_SCALAR = {
    U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i",
    F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d",
}

# ggml tensor types we read: id -> (elements per block, bytes per block)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 = 0, 1, 2, 3, 6, 7, 8, 30
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS = 10, 11, 12, 13, 14, 20, 23
_TENSOR_TYPES = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24),
                 Q8_0: (32, 34), IQ4_NL: (32, 18), Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144),
                 Q5_K: (256, 176), Q6_K: (256, 210), IQ4_XS: (256, 136), BF16: (1, 2)}

# IQ4_NL's and IQ4_XS's 16 non-linear levels (ggml's kvalues_iq4nl)
_IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _f16(raw, offset, nb, stride):
    """The F16 at byte `offset` of each of nb blocks of `stride` bytes, as float32."""
    u8 = np.frombuffer(raw, dtype=np.uint8).reshape(nb, stride)
    return u8[:, offset:offset + 2].copy().view("<f2").astype(np.float32).reshape(nb)


def _q4_k(raw, nb, five=False):
    """ggml's Q4_K: per sub-block j of 32, (d * sc_j) * q - dmin * m_j, in float32.
    Q5_K (five): q has a fifth bit, bit j of byte l of the 32 bytes before the nibbles."""
    size = 176 if five else 144
    u8 = np.frombuffer(raw, dtype=np.uint8).reshape(nb, size)
    d, dmin = _f16(raw, 0, nb, size), _f16(raw, 2, nb, size)
    s = u8[:, 4:16].astype(np.int32)
    sc = np.empty((nb, 8), np.int32)
    mn = np.empty((nb, 8), np.int32)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = u8[:, 48 if five else 16:].reshape(nb, 4, 32)
    q = np.empty((nb, 8, 32), np.int32)
    q[:, 0::2, :] = qs & 15     # sub-blocks 0, 2, 4, 6: low nibbles of each 32 bytes
    q[:, 1::2, :] = qs >> 4     # 1, 3, 5, 7: high nibbles
    if five:
        qh = u8[:, 16:48].astype(np.int32)
        for j in range(8):
            q[:, j, :] |= ((qh >> j) & 1) << 4
    dj = (d[:, None] * sc.astype(np.float32))[:, :, None]
    mj = (dmin[:, None] * mn.astype(np.float32))[:, :, None]
    return (dj * q.astype(np.float32) - mj).reshape(nb * 256)


def _q6_k(raw, nb):
    """ggml's Q6_K: per sub-block j of 16, (d * sc_j) * (q - 32), in float32."""
    u8 = np.frombuffer(raw, dtype=np.uint8).reshape(nb, 210)
    d = _f16(raw, 208, nb, 210)
    sc = u8[:, 192:208].view(np.int8).astype(np.float32)
    q = np.empty((nb, 2, 4, 32), np.int32)
    for h in range(2):
        ql = u8[:, 64 * h:64 * h + 64].astype(np.int32)
        qh = u8[:, 128 + 32 * h:128 + 32 * h + 32].astype(np.int32)
        q[:, h, 0] = (ql[:, :32] & 15) | (((qh >> 0) & 3) << 4)
        q[:, h, 1] = (ql[:, 32:] & 15) | (((qh >> 2) & 3) << 4)
        q[:, h, 2] = (ql[:, :32] >> 4) | (((qh >> 4) & 3) << 4)
        q[:, h, 3] = (ql[:, 32:] >> 4) | (((qh >> 6) & 3) << 4)
    q = (q - 32).reshape(nb, 16, 16).astype(np.float32)
    return ((d[:, None] * sc)[:, :, None] * q).reshape(nb * 256)


def _block32(raw, ttype):
    """ggml's blocks of 32: an f16 d, then (Q4_1, Q5_1) an f16 m, (Q5_0, Q5_1) a
    little-endian u32 of fifth bits, bit j for weight j, then 16 bytes of
    nibbles, low ones the first 16 weights. Q4_1, Q5_1: d * q + m; Q5_0: d *
    (q - 16); IQ4_NL: d * level[q]. In float32, as ggml computes them."""
    fields = [("d", "<f2")]
    if ttype in (Q4_1, Q5_1):
        fields.append(("m", "<f2"))
    if ttype in (Q5_0, Q5_1):
        fields.append(("qh", "<u4"))
    fields.append(("q", "u1", 16))
    blocks = np.frombuffer(raw, dtype=np.dtype(fields))
    q = np.concatenate([blocks["q"] & 15, blocks["q"] >> 4], axis=1).astype(np.int64)
    if ttype in (Q5_0, Q5_1):
        bits = (blocks["qh"][:, None].astype(np.int64) >> np.arange(32)[None, :]) & 1
        q |= bits << 4
    d = blocks["d"].astype(np.float32)[:, None]
    if ttype == IQ4_NL:
        return (d * _IQ4_LEVELS[q]).reshape(-1)
    if ttype == Q5_0:
        return (d * (q - 16).astype(np.float32)).reshape(-1)
    return (d * q.astype(np.float32) + blocks["m"].astype(np.float32)[:, None]).reshape(-1)


def _two_bit(qs, nb):
    """Q2_K's and Q3_K's 2-bit q: weight 128n + 32j + l at bits 2j of byte 32n + l."""
    q = np.empty((nb, 2, 4, 32), np.int32)
    for n in range(2):
        for j in range(4):
            q[:, n, j, :] = (qs[:, 32 * n:32 * n + 32] >> (2 * j)) & 3
    return q.reshape(nb, 256)


def _q2_k(raw, nb):
    """ggml's Q2_K: per sub-block s of 16, (d * (sc_s & 15)) * q - dmin * (sc_s >> 4)."""
    u8 = np.frombuffer(raw, dtype=np.uint8).reshape(nb, 84).astype(np.int32)
    d, dmin = _f16(raw, 80, nb, 84), _f16(raw, 82, nb, 84)
    sc = u8[:, :16]
    q = _two_bit(u8[:, 16:80], nb).reshape(nb, 16, 16).astype(np.float32)
    dl = (d[:, None] * (sc & 15).astype(np.float32))[:, :, None]
    ml = (dmin[:, None] * (sc >> 4).astype(np.float32))[:, :, None]
    return (dl * q - ml).reshape(nb * 256)


def _q3_k(raw, nb):
    """ggml's Q3_K: per sub-block s of 16, (d * (sc_s - 32)) * (q - 4), the 4 not
    taken when weight e's bit e // 32 of hmask[e % 32] is set. The sixteen 6-bit
    scales unpacked as ggml does, through four u32 words."""
    u8 = np.frombuffer(raw, dtype=np.uint8).reshape(nb, 110)
    d = _f16(raw, 108, nb, 110)
    aux = np.zeros((nb, 4), np.uint32)
    aux[:, :3] = u8[:, 96:108].copy().view("<u4")
    tmp = aux[:, 2].copy()
    k1, k2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
    a0, a1 = aux[:, 0].copy(), aux[:, 1].copy()
    aux[:, 2] = ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4)
    aux[:, 3] = ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4)
    aux[:, 0] = (a0 & k2) | (((tmp >> 0) & k1) << 4)
    aux[:, 1] = (a1 & k2) | (((tmp >> 2) & k1) << 4)
    sc = aux.view(np.int8).reshape(nb, 16).astype(np.int32) - 32
    q = _two_bit(u8[:, 32:96].astype(np.int32), nb)
    e = np.arange(256)
    high = (u8[:, e % 32].astype(np.int32) >> (e // 32)[None, :]) & 1
    q = (q - 4 * (1 - high)).reshape(nb, 16, 16).astype(np.float32)
    return ((d[:, None] * sc.astype(np.float32))[:, :, None] * q).reshape(nb * 256)


def _iq4_xs(raw, nb):
    """ggml's IQ4_XS: f16 d, u16 of high scale bits, 4 bytes of low scale nibbles,
    then per sub-block j of 32 16 bytes of indices (low nibbles first);
    (d * (ls_j - 32)) * level[q]."""
    u8 = np.frombuffer(raw, dtype=np.uint8).reshape(nb, 136).astype(np.int32)
    d = _f16(raw, 0, nb, 136)
    sh = u8[:, 2] | (u8[:, 3] << 8)
    ls = np.empty((nb, 8), np.int32)
    for j in range(8):
        ls[:, j] = ((u8[:, 4 + j // 2] >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)
    qs = u8[:, 8:].reshape(nb, 8, 16)
    lv = np.concatenate([_IQ4_LEVELS[qs & 15], _IQ4_LEVELS[qs >> 4]], axis=2)
    dl = (d[:, None] * (ls - 32).astype(np.float32))[:, :, None]
    return (dl * lv).reshape(nb * 256)


class GGUFError(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads from a bytes object."""

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, n):
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError("truncated file at offset %d (need %d bytes)" % (self.pos, n))
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        n = self.scalar("<Q")
        return self.take(n).decode("utf-8", errors="surrogateescape")

    def value(self, vtype):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == STR:
            return self.string()
        if vtype == ARR:
            etype = self.scalar("<I")
            n = self.scalar("<Q")
            if etype in _SCALAR:
                fmt = _SCALAR[etype]
                size = struct.calcsize(fmt)
                raw = self.take(size * n)
                return list(struct.unpack("<%d%s" % (n, fmt[1]), raw))
            return [self.value(etype) for _ in range(n)]
        raise GGUFError("unknown value type %d" % vtype)


class GGUF:
    """A parsed GGUF file: .kv (dict key -> python value) and .tensors (name -> info)."""

    def __init__(self, path):
        with open(path, "rb") as fh:
            self.buf = fh.read()
        cur = _Cursor(self.buf)
        if cur.take(4) != b"GGUF":
            raise GGUFError("not a GGUF file")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFError("unsupported GGUF version %d" % self.version)
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")
        self.kv = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar("<I")
            self.kv[key] = cur.value(vtype)
        self.tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            ne = [cur.scalar("<Q") for _ in range(n_dims)]
            ttype = cur.scalar("<I")
            offset = cur.scalar("<Q")
            self.tensors[name] = (ne, ttype, offset)
        align = self.kv.get("general.alignment", 32)
        self.data_start = (cur.pos + align - 1) // align * align

    def shape(self, name):
        """GGUF ne (innermost first) of a tensor, or None when absent."""
        t = self.tensors.get(name)
        return None if t is None else list(t[0])

    def tensor(self, name):
        """The tensor as float64, outermost dimension first."""
        ne, ttype, offset = self.tensors[name]
        if ttype not in _TENSOR_TYPES:
            raise GGUFError("%s: unsupported tensor type %d" % (name, ttype))
        block, size = _TENSOR_TYPES[ttype]
        count = 1
        for d in ne:
            count *= d
        if ne[0] % block:
            raise GGUFError("%s: rows of %d are not whole blocks of %d" % (name, ne[0], block))
        start = self.data_start + offset
        end = start + count // block * size
        if end > len(self.buf):
            raise GGUFError("%s: data past end of file" % name)
        raw = self.buf[start:end]
        if ttype == BF16:  # the high half of an IEEE float32
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif ttype == Q8_0:  # blocks of an f16 scale d and 32 int8 q: d * q
            blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("q", "i1", 32)]))
            arr = blocks["d"].astype(np.float64)[:, None] * blocks["q"].astype(np.float64)
        elif ttype == Q4_0:  # blocks of an f16 scale d and 16 bytes: low nibbles, then high; d * (q - 8)
            blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("q", "u1", 16)]))
            q = np.concatenate([blocks["q"] & 15, blocks["q"] >> 4], axis=1).astype(np.float64) - 8.0
            arr = blocks["d"].astype(np.float64)[:, None] * q
        elif ttype in (Q4_1, Q5_0, Q5_1, IQ4_NL):
            arr = _block32(raw, ttype)
        elif ttype == Q2_K:
            arr = _q2_k(raw, count // 256)
        elif ttype == Q3_K:
            arr = _q3_k(raw, count // 256)
        elif ttype == IQ4_XS:
            arr = _iq4_xs(raw, count // 256)
        elif ttype == Q4_K:
            arr = _q4_k(raw, count // 256)
        elif ttype == Q5_K:
            arr = _q4_k(raw, count // 256, five=True)
        elif ttype == Q6_K:
            arr = _q6_k(raw, count // 256)
        elif ttype == F16:
            arr = np.frombuffer(raw, dtype="<f2")
        else:
            arr = np.frombuffer(raw, dtype="<f4")
        return arr.astype(np.float64).reshape(list(reversed(ne)))
