"""Wall time and peak memory of `jaxlens demo`, the README's first command, run as a user runs it.

    python benchmarks/bench_demo.py [--small] [--model smollm2-135m] [--repeat 1]

Each run is a fresh child process (`python -m jaxlens.cli demo --quiet --out TMP`), so the time includes
Python and JAX start-up, loading the model (from the dequantisation cache when it is warm), compilation and
writing the report. Peak RSS is the child's `ru_maxrss` (RUSAGE_CHILDREN, read after each child exits; the
parent imports nothing heavy, so its own peak does not mask the child's). The per-stage timings are the demo's
own (results.json). Prints a Markdown table with the command, the machine (cores, CPU model, load average at
the start) and the date.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_once(model: str, small: bool) -> dict:
    """One `jaxlens demo` in a child process: wall seconds, the child's peak RSS (MiB), the demo's stage
    timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "jaxlens.cli", "demo", "--quiet", "--model", model, "--out", str(out)]
        if small:
            cmd.append("--small")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            sys.exit(f"jaxlens demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads((out / "results.json").read_text())
    return {"wall_s": wall, "peak_rss_mib": max(peak, before) / 1024, "timings": res["timings_s"],
            "stdout": proc.stdout, "top_induction": [h["label"] for h in res["induction"]["top_heads"]],
            "top_ioi": [h["label"] for h in res["ioi"]["top_heads"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--small", action="store_true", help="the demo's --small settings")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs (the first may fill the dequantisation cache)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    runs = [run_once(args.model, args.small) for _ in range(args.repeat)]
    command = "jaxlens demo" + (" --small" if args.small else "") + (
        f" --model {args.model}" if args.model != "smollm2-135m" else "")
    print(f"Command: `{command}` (child process, --quiet, fresh output folder)")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, load average {load:.1f} at start; "
          f"Python {platform.python_version()}; "
          f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    stages = list(runs[0]["timings"])
    print("| run | total wall (s) | peak RSS (MiB) | " + " | ".join(f"{s} (s)" for s in stages) + " |")
    print("|---|---|---|" + "---|" * len(stages))
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              + " | ".join(f"{r['timings'][s]:.1f}" for s in stages) + " |")
    print("\nTop induction heads:", ", ".join(runs[-1]["top_induction"]))
    print("Top IOI heads:", ", ".join(runs[-1]["top_ioi"]))


if __name__ == "__main__":
    main()
