#!/usr/bin/env python3
"""The tensor types of a GGUF file, read from its header: `general.file_type` aside, a
"Q4_K_M" file mixes types (tensors whose rows are not a multiple of 256 cannot be K-quants,
so llama-quantize falls back to others), and speed follows the types of the big matrices.

    python3 scripts/gguf_types.py FILE.gguf   # prints e.g. "Q5_0 58% Q8_0 31% Q4_K 11%"

Shares of the matrices' elements (2-D, and 3-D expert stacks), largest first. Standard library only.
"""
import struct
import sys

# ggml_type ids (ggml.h) of the types GGUF models use.
TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
         11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
         19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 30: "BF16", 39: "MXFP4"}
# GGUF metadata value types: fixed sizes, 8 = string, 9 = array.
SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read(f, fmt):
    return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))


def skip_value(f, kind):
    if kind == 8:
        (n,) = read(f, "Q")
        f.seek(n, 1)
    elif kind == 9:
        elem, n = read(f, "IQ")
        if elem in SIZES:
            f.seek(SIZES[elem] * n, 1)
        else:
            for _ in range(n):
                skip_value(f, elem)
    else:
        f.seek(SIZES[kind], 1)


def tensor_types(path):
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = read(f, "IQQ")
        for _ in range(n_kv):
            (n,) = read(f, "Q")
            f.seek(n, 1)
            (kind,) = read(f, "I")
            skip_value(f, kind)
        counts = {}
        for _ in range(n_tensors):
            (n,) = read(f, "Q")
            f.seek(n, 1)
            (dims,) = read(f, "I")
            shape = read(f, "Q" * dims)
            kind, _offset = read(f, "IQ")
            if dims >= 2:
                name = TYPES.get(kind, f"type{kind}")
                elements = 1
                for d in shape:
                    elements *= d
                counts[name] = counts.get(name, 0) + elements
    return counts


def main():
    counts = tensor_types(sys.argv[1])
    total = sum(counts.values())
    print(" ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
