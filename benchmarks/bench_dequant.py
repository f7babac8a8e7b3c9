"""Dequantisation throughput per GGUF type: jaxlens `_gguf_quant.dequantize` against `gguf.quants.dequantize`.

    python benchmarks/bench_dequant.py                    # 4 Mi elements per type, best of 3
    python benchmarks/bench_dequant.py --elements 1048576 --repeats 1 --types Q4_K Q6_K

For every ggml type the installed gguf package can decode, a tensor of `--elements` elements is built in that
type (quantised by `gguf.quants.quantize` from random normals where gguf can quantise it, else random blocks
with finite fp16 scales where the type's first two bytes are one) and decoded three ways, same run:

- `jaxlens`: `dequantize` as jaxlens loads files (its hand-written fast path where it keeps one, else
  gguf.quants, a chunk of blocks at a time);
- `hand-written`: the hand-written decoder alone, for types that have one (the evidence for keeping it);
- `gguf.quants`: `gguf.quants.dequantize` on the whole tensor at once, as transformers' GGUF loader calls it.

Throughput is MB (10^6 bytes) of decoded float32 per second, best of `--repeats`. The hand-written decoder's
output is also compared bit for bit with gguf.quants'. Writes benchmarks/results/dequant.json and prints a
markdown table.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import gguf
import numpy as np
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from jaxlens.converters import _gguf_quant

ROOT = Path(__file__).resolve().parents[1]


def make_blocks(type_name: str, n_elements: int, rng: np.random.Generator) -> np.ndarray:
    """[n_blocks, type_size] uint8 holding a tensor of about `n_elements` elements in `type_name`."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = max(1, n_elements // block_size)
    x = rng.normal(scale=0.05, size=(n_blocks, block_size)).astype(np.float32)
    if type_name == "F32":
        return x.view(np.uint8)
    try:
        return np.asarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(n_blocks, type_size)
    except (NotImplementedError, gguf.quants.QuantError):
        raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
        if type_size >= 2:
            raw[:, 0:2] = rng.normal(scale=0.05, size=(n_blocks, 1)).astype("<f2").view(np.uint8)
        return raw


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(type_name: str, blocks: np.ndarray, repeats: int) -> dict:
    """One table row: throughput of each decoder of `type_name` on `blocks`."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    shape = (len(blocks) * block_size,)
    mb = len(blocks) * block_size * 4 / 1e6
    row = {"type": type_name, "elements": shape[0], "input_MB": blocks.nbytes / 1e6}
    row["jaxlens_MBps"] = mb / best_seconds(lambda: _gguf_quant.dequantize(blocks, type_name, shape), repeats)
    row["gguf_MBps"] = mb / best_seconds(lambda: gguf.quants.dequantize(blocks, qtype), repeats)
    hand = _gguf_quant.HAND_WRITTEN.get(type_name)
    if hand is not None:
        row["hand_MBps"] = mb / best_seconds(lambda: hand(blocks), repeats)
        ours = hand(blocks).reshape(-1)
        theirs = np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32).reshape(-1)
        row["hand_bit_identical"] = bool(np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)))
        row["fast_path_used"] = type_name in _gguf_quant._FAST
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", nargs="*", default=None, help="ggml type names (default: every decodable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dequant.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for type_name in args.types or _gguf_quant.supported_types():
        row = measure(type_name, make_blocks(type_name, args.elements, rng), args.repeats)
        rows.append(row)
        hand = f", hand-written {row['hand_MBps']:.0f} MB/s" if "hand_MBps" in row else ""
        print(f"{type_name}: jaxlens {row['jaxlens_MBps']:.0f} MB/s, gguf.quants {row['gguf_MBps']:.0f} MB/s"
              f"{hand}", file=sys.stderr)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        "python": platform.python_version(), "numpy": np.__version__, "gguf": _gguf_quant._gguf_version(),
        "elements": args.elements, "repeats": args.repeats, "unit": "MB of decoded float32 per second",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['machine']}; {result['unit']}, best of {args.repeats}\n")
    print("| type | jaxlens | gguf.quants | hand-written | bit-identical | fast path used |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        hand = f"{r['hand_MBps']:.0f}" if "hand_MBps" in r else ""
        print(f"| {r['type']} | {r['jaxlens_MBps']:.0f} | {r['gguf_MBps']:.0f} | {hand} | "
              f"{r.get('hand_bit_identical', '')} | {r.get('fast_path_used', '')} |")


if __name__ == "__main__":
    main()
