"""Sharded weights benchmark: the forward of a GPT-2-small-shaped random model (d_model 768, 12 layers, 12
heads, d_mlp 3072, vocab 50257, n_ctx 1024) with its params replicated on every device vs sharded by
`jaxlens.scale.shard_params` (tensor parallel over `model`, optionally FSDP over `data`), on 8 simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here before jax loads).

Printed per layout: the parameter bytes each device holds, the compile time and the median (min) forward time
of a [batch, pos] token batch, and the largest logit difference from the replicated run (measured on one
device: replication puts the same whole copy on each). The 8 "devices"
share this machine's cores, so the times show the cost of the collectives and the partitioned program, not
a speed-up; on real accelerators the point is the memory column (a model 8x one device's memory fits).

    python benchmarks/bench_sharded.py                      # batch 8, 128 tokens
    python benchmarks/bench_sharded.py --batch 1 --pos 64 --repeats 3
"""

import argparse
import datetime
import os
import platform
import statistics
import time

_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from jaxlens import forward  # noqa: E402
from jaxlens.config import Config  # noqa: E402
from jaxlens.scale import make_mesh, shard_params, sharded_bytes_per_device  # noqa: E402
from jaxlens.testing import numpy_params  # noqa: E402

GPT2_SMALL = Config(d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024)
# 12 heads: the `model` axis can be 1, 2, 4 (or 3, 6, 12 on other device counts), not 8
LAYOUTS = {
    "replicated (every device: a whole copy)": None,
    "TP model=4 x data=2": dict(model=4, fsdp=False),
    "TP model=4 + FSDP data=2": dict(model=4, fsdp=True),
    "TP model=2 + FSDP data=4": dict(model=2, fsdp=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = GPT2_SMALL
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.d_vocab, (args.batch, args.pos)), jnp.int32)
    host = numpy_params(cfg, seed=0, scale=0.02)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(host))
    rows, reference = [], None
    for name, layout in LAYOUTS.items():
        if layout is None:  # measured on one device: each of 8 would hold the same copy (8x the memory)
            params = host
        else:
            params = shard_params(host, cfg, make_mesh(model=layout["model"]), fsdp=layout["fsdp"])
        held = max(sharded_bytes_per_device(params).values())
        fn = jax.jit(lambda p, t: forward(p, cfg, t)[0])
        t0 = time.perf_counter()
        compiled = fn.lower(params, tokens).compile()
        compile_s = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(params, tokens))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens))
            times.append(1e3 * (time.perf_counter() - t0))
        out = np.asarray(out)
        reference = out if reference is None else reference
        rows.append((name, held, held / total, compile_s, statistics.median(times), min(times),
                     float(np.abs(out - reference).max())))
        del params, compiled
    print(f"## Sharded weights: GPT-2-small forward, [{args.batch}, {args.pos}] tokens, 8 simulated CPU "
          "devices")
    print(f"{datetime.date.today()} · {cpu_model()} · {os.cpu_count()} cores · {platform.system()} · "
          f"jax {jax.__version__} · params {total / 2**20:.1f} MiB (float32) · {args.repeats} repeats\n")
    print("| layout | params per device | of the model | compile | forward median (min) | max logit diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, held, frac, comp, med, lo, diff in rows:
        print(f"| {name} | {held / 2**20:.1f} MiB | {frac:.3f} | {comp:.1f} s | {med:.0f} ({lo:.0f}) ms | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
