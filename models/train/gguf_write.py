"""gguf_write.py -- a small GGUF v3 writer (key/values + F32/F16 tensors).

Arrays given to add_tensor are numpy arrays shaped outermost dimension first
(torch layout: a Linear weight (n_out, n_in)); GGUF stores ne innermost first, so
ne is the reversed shape.
"""
import struct

import numpy as np

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
GGML_F32, GGML_F16 = 0, 1
ALIGN = 32


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


class Writer:
    def __init__(self):
        self.kv = []          # (key, bytes of type + value)
        self.tensors = []     # (name, ndarray already in its file dtype, ggml type)

    def u32(self, key, v):
        self.kv.append((key, struct.pack("<I", U32) + struct.pack("<I", v)))

    def i32(self, key, v):
        self.kv.append((key, struct.pack("<I", I32) + struct.pack("<i", v)))

    def f32(self, key, v):
        self.kv.append((key, struct.pack("<I", F32) + struct.pack("<f", v)))

    def boolean(self, key, v):
        self.kv.append((key, struct.pack("<I", BOOL) + struct.pack("<?", bool(v))))

    def string(self, key, v):
        self.kv.append((key, struct.pack("<I", STR) + _str(v)))

    def str_array(self, key, vals):
        body = struct.pack("<IIQ", ARR, STR, len(vals)) + b"".join(_str(v) for v in vals)
        self.kv.append((key, body))

    def i32_array(self, key, vals):
        arr = np.asarray(vals, dtype="<i4")
        self.kv.append((key, struct.pack("<IIQ", ARR, I32, len(arr)) + arr.tobytes()))

    def add_tensor(self, name, arr, f16=False):
        arr = np.ascontiguousarray(arr)
        if f16:
            self.tensors.append((name, arr.astype("<f2"), GGML_F16))
        else:
            self.tensors.append((name, arr.astype("<f4"), GGML_F32))

    def write(self, path):
        head = b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv))
        for key, body in self.kv:
            head += _str(key) + body
        offset = 0
        infos = b""
        for name, arr, ttype in self.tensors:
            ne = list(reversed(arr.shape))
            infos += _str(name) + struct.pack("<I", len(ne))
            infos += b"".join(struct.pack("<Q", d) for d in ne)
            infos += struct.pack("<IQ", ttype, offset)
            offset += (arr.nbytes + ALIGN - 1) // ALIGN * ALIGN
        meta = head + infos
        with open(path, "wb") as fh:
            fh.write(meta)
            fh.write(b"\0" * ((-len(meta)) % ALIGN))
            for _, arr, _ in self.tensors:
                fh.write(arr.tobytes())
                fh.write(b"\0" * ((-arr.nbytes) % ALIGN))
