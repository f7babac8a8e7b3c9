"""A multi-host patching sweep on this machine: the same sweep with 1 process (8 simulated CPU devices) and
with 2 processes (4 each) joined by `jax.distributed` on localhost (gloo collectives), timed from outside
(launch to exit) and inside (the sweep, first call with its compiles, then again compiled).

    python benchmarks/bench_multihost.py                          # writes benchmarks/results/multihost.json
    python benchmarks/bench_multihost.py --layers 4 --pos 24 --out /tmp/multihost.json

Each process runs tests/scale/multihost_worker.py (the tests' worker) on a tiny random model (d_model 40,
5 heads). On a machine with few cores expect no speed-up from 2 processes: both share the same cores and add
the collectives; the point is that the results agree (checked here) and the launch recipe works.
"""

import argparse
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scale" / "multihost_worker.py"
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(n_processes: int, devices: int, layers: int, pos: int, tmp: Path) -> dict:
    """Launch `n_processes` workers with `devices / n_processes` devices each; their outputs and wall time."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // n_processes}"}
    outs = [tmp / f"n{n_processes}_p{i}.npz" for i in range(n_processes)]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--port", str(port), "--num-processes",
                               str(n_processes), "--process-id", str(i), "--out", str(outs[i]), "--repeat",
                               "--n-layers", str(layers), "--n-pos", str(pos)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(n_processes)]
    try:
        errs = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - start
    for p, err in zip(procs, errs, strict=True):
        if p.returncode:
            raise SystemExit(f"a worker failed ({p.returncode}):\n{err[-3000:]}")
    got = [dict(np.load(f)) for f in outs]
    return {"wall_s": wall, "sweep_first_s": max(float(g["seconds"]) for g in got),
            "sweep_compiled_s": max(float(g["seconds_warm"]) for g in got), "values": got[0]["values"],
            "agree": all(np.array_equal(g["values"], got[0]["values"]) for g in got)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--pos", type=int, default=16)
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices in all")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multihost.json")
    args = ap.parse_args(argv)
    from _machine import cpu_model

    from jaxlens import _atomic

    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: run(n, args.devices, args.layers, args.pos, Path(tmp)) for n in (1, 2)}
    diff = float(np.abs(runs[1]["values"] - runs[2]["values"]).max())
    cells = int(np.prod(runs[1]["values"].shape))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; sweep of attn.hook_z over layer {args.layers} x "
          f"pos {args.pos} x head 5 ({cells} cells) on {args.devices} simulated CPU devices")
    for n, r in runs.items():
        print(f"  {n} process(es) x {args.devices // n} devices: launch to exit {r['wall_s']:.1f} s, first "
              f"sweep (with compiles) {r['sweep_first_s']:.2f} s, compiled sweep "
              f"{r['sweep_compiled_s']:.3f} s, processes agree: {r['agree']}")
    print(f"  largest difference 1 vs 2 processes: {diff:.2e}")
    result = {
        "date": datetime.date.today().isoformat(), "machine": cpu_model(), "cores": os.cpu_count(),
        "command": " ".join(["python benchmarks/bench_multihost.py", *(argv or sys.argv[1:])]),
        "cells": cells, "devices": args.devices, "max_abs_diff_1_vs_2": diff,
        "runs": {f"{n}_processes": {k: v for k, v in r.items() if k != "values"} for n, r in runs.items()},
    }
    _atomic.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
