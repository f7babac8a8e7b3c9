"""GGUF in bfloat16 without a float32 copy: peak memory and time of loading SmolLM2's GGUF, before and after.

    python benchmarks/bench_gguf_half.py                 # the packaged SmolLM2-135M-Instruct Q4_1 file

Each way runs in a fresh child process that imports jax and jaxlens, starts the backend, resets its peak RSS
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and reads its RSS, loads the file one way, waits for every
array, and reports the load time and the growth of the kernel's VmHWM (/proc/self/status) over that RSS.

Ways, each giving a bfloat16 model:
- before, numpy params: `_gguf.load(path)` (float32; the dequantisation cache missed, then hit), each leaf
  then cast to bfloat16: what a bfloat16 model from `converters.load` cost before `dtype=`;
- after, numpy params: `_gguf.load(path, dtype=jnp.bfloat16)`: decoded straight into bfloat16;
- before / after, `HookedTransformer.from_pretrained_no_processing(path, dtype=jnp.bfloat16)` (jax
  arrays): "before" with `converters.load` made to ignore `dtype` (the code before this change: a float32
  read, cast on the way to jax), "after" as it is. (`from_pretrained` with weight processing still reads
  float32, so that processing sees the full-precision weights: unchanged, not measured here.)

Ratios: each peak to the model's float32 and bfloat16 sizes, and after / before. Writes
benchmarks/results/gguf_half.json and prints a markdown table.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import PEAK_RSS_PRELUDE, cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
path, how, cache = sys.argv[1], sys.argv[2], sys.argv[3]
import jax, jax.numpy as jnp, numpy as np
from jaxlens import HookedTransformer, converters
from jaxlens.converters import _gguf
jnp.zeros(1).block_until_ready()
""" + PEAK_RSS_PRELUDE + r"""
t = time.perf_counter()
if how.startswith("numpy fp32"):
    cfg, params = _gguf.load(path, cache_dir=cache, progress=False)
    flat = converters.flatten_params(params)
    n_fp32 = sum(v.size * 4 for v in flat.values())
    for k in list(flat):
        flat[k] = flat[k].astype(jnp.bfloat16)  # the old way to a bfloat16 model: one leaf at a time
    leaves = list(flat.values())
elif how == "numpy bf16":
    cfg, params = _gguf.load(path, cache_dir=cache, progress=False, dtype=jnp.bfloat16)
    leaves = list(converters.flatten_params(params).values())
    n_fp32 = sum(v.size * 4 for v in leaves)
else:
    if how == "from_pretrained before":
        load = converters.load
        converters.load = lambda source, allow_pickle=False, dtype=None: load(source,
                                                                              allow_pickle=allow_pickle)
    model = HookedTransformer.from_pretrained_no_processing(path, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(model.params)
    jax.block_until_ready(leaves)
    n_fp32 = sum(v.size * 4 for v in leaves)
seconds = time.perf_counter() - t
assert {str(v.dtype) for v in leaves} == {"bfloat16"}, {str(v.dtype) for v in leaves}
print(json.dumps({"seconds": seconds, "peak_growth_mib": status("VmHWM") - base, "base_rss_mib": base,
                  "fp32_model_mib": n_fp32 / 2**20}))
"""

WAYS = ("numpy fp32 (cache miss) + cast", "numpy fp32 (cache hit) + cast", "numpy bf16",
        "from_pretrained before", "from_pretrained after")


def run_child(path: Path, how: str, cache: Path) -> dict:
    env = dict(os.environ, JAXLENS_CACHE=str(cache), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), how, str(cache)], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{how} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from jaxlens import _atomic, hub

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file or packaged model name")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gguf_half.json"))
    args = p.parse_args()
    path = hub.resolve(args.model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for how in WAYS:
            if how == "numpy fp32 (cache miss) + cast" or how.startswith("from_pretrained"):
                cache = Path(tmp) / how.replace(" ", "_")  # an empty cache: first load
            if how == "numpy fp32 (cache hit) + cast":
                cache = Path(tmp) / "numpy_fp32_(cache_miss)_+_cast"  # the entry the miss wrote
            results[how] = run_child(path, how, cache)
            print(how, results[how], flush=True)
    fp32 = results["numpy bf16"]["fp32_model_mib"]
    for r in results.values():
        r["peak_over_fp32_model"] = r["peak_growth_mib"] / fp32
        r["peak_over_bf16_model"] = r["peak_growth_mib"] / (fp32 / 2)
    ratios = {
        "numpy: bf16 direct / fp32 cache miss + cast": results["numpy bf16"]["peak_growth_mib"]
        / results["numpy fp32 (cache miss) + cast"]["peak_growth_mib"],
        "numpy: bf16 direct / fp32 cache hit + cast": results["numpy bf16"]["peak_growth_mib"]
        / results["numpy fp32 (cache hit) + cast"]["peak_growth_mib"],
        "from_pretrained: after / before": results["from_pretrained after"]["peak_growth_mib"]
        / results["from_pretrained before"]["peak_growth_mib"],
    }
    record = {
        "benchmark": "bench_gguf_half.py", "file": str(path), "file_mib": path.stat().st_size / 2**20,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1min": os.getloadavg()[0]},
        "fp32_model_mib": fp32, "results": results, "peak_ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    _atomic.write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(f"\n{path.name}: float32 model {fp32:.0f} MiB; load average {os.getloadavg()[0]:.1f}\n")
    print("| way (bfloat16 model) | peak growth MiB | / fp32 model | time s |")
    print("|---|---|---|---|")
    for how, r in results.items():
        print(f"| {how} | {r['peak_growth_mib']:.0f} | {r['peak_over_fp32_model']:.2f} | "
              f"{r['seconds']:.1f} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()
