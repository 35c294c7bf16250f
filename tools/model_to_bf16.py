"""Write a BERT model folder with its F32 weights rounded to BF16 (nearest, ties to even).

Usage: python3 tools/model_to_bf16.py IN_DIR OUT_DIR

Copies config.json and tokenizer.json, and writes OUT_DIR/model.safetensors with every F32
tensor stored as BF16 (other dtypes as they are). The result is half the size: small enough to
travel to the GPU machine with the `train` binary for the bf16-against-f32 accuracy check
(scripts/build-accuracy-bundle.sh). `train --precision bf16` reads it as it is; `--precision f32`
widens it exactly, so both precisions train on the same base.

Standard library only (the rounding is integer arithmetic on the f32 bits), so it runs where
numpy and torch are not installed.
"""

import json
import shutil
import struct
import sys
from array import array
from pathlib import Path


def round_to_bf16(raw: bytes) -> bytes:
    """The bf16 bits of little-endian f32 values, rounded to nearest even; NaN stays NaN."""
    words = array("I")
    words.frombytes(raw)
    if sys.byteorder != "little":
        words.byteswap()
    out = array("H", bytes(2 * len(words)))
    for i, w in enumerate(words):
        if (w & 0x7F800000) == 0x7F800000 and (w & 0x007FFFFF):
            out[i] = (w >> 16) | 0x0040  # a quiet NaN
        else:
            out[i] = ((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    with open(src / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    tensors = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        raw = data[start:end]
        dtype = info["dtype"]
        if dtype == "F32":
            raw, dtype = round_to_bf16(raw), "BF16"
        tensors.append((name, dtype, info["shape"], raw))
    out_header = {} if meta is None else {"__metadata__": meta}
    offset = 0
    for name, dtype, shape, raw in tensors:
        out_header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for *_, raw in tensors:
            f.write(raw)
    tmp.replace(dst / "model.safetensors")
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(src / name, dst / name)
    print(f"{dst}: {len(tensors)} tensors, {offset / 2**20:.1f} MiB of data")


if __name__ == "__main__":
    main()
