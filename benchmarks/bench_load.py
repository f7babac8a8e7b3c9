"""Load benchmark: time and peak memory to load a GPT-2-small-shaped checkpoint, jaxlens vs transformers.

    python benchmarks/bench_load.py                       # GPT-2 small shape, 3 runs each
    python benchmarks/bench_load.py --repeats 1 --layers 4 --vocab 16000

A random GPT-2 (d_model 768, 12 layers, 12 heads, vocab 50257, n_ctx 1024; ~475 MiB of float32 safetensors
with the unembedding tied, as transformers saves it) is written with numpy into a temporary directory. Each
measurement runs in a fresh child process that imports its library (jaxlens, or torch + transformers), starts
the backend, reads its baseline peak RSS, loads the directory one way, waits for every array, and reports the
load time and the growth of the peak RSS over the baseline. The peak is the kernel's VmHWM of the child
(/proc/self/status). `resource.getrusage(...).ru_maxrss` is saved beside it in the JSON but not used: Linux
starts a spawned child's ru_maxrss at the parent's peak (here the parent that wrote the checkpoint), so its
growth understates the load's.

Ways measured:
- jaxlens `converters.load` (numpy params, float32), `HookedTransformer.from_pretrained_no_processing`,
  `HookedTransformer.from_pretrained` (TransformerLens weight processing, float32 and bfloat16);
- transformers `GPT2LMHeadModel.from_pretrained` (float32; safetensors memory-mapped).

Ratios are to the library's own float32 params (jaxlens stores the tied unembedding as its own [d_model,
d_vocab] array, so its model is larger than the file; transformers shares it) and to the safetensors file.
Writes benchmarks/results/load.json and prints a markdown table.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
path, how = sys.argv[1], sys.argv[2]
def peak():
    hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    return hwm / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if how == "transformers":
    import torch, transformers
    torch.set_num_threads(2)
    torch.zeros(1).sum()
else:
    import jax, jax.numpy as jnp
    from jaxlens import HookedTransformer, converters
    jnp.zeros(1).block_until_ready()
base = peak()
t = time.perf_counter()
if how == "transformers":
    model = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
elif how == "converters.load":
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(converters.load(path)[1]))
else:
    method, dtype = how.split(":")
    params = jax.block_until_ready(getattr(HookedTransformer, method)(path, dtype=getattr(jnp, dtype)).params)
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
seconds = time.perf_counter() - t
end = peak()
print(json.dumps({"seconds": seconds, "base_mib": base[0], "growth_mib": end[0] - base[0],
                  "ru_maxrss_growth_mib": end[1] - base[1], "params_mib": n_bytes / 2**20}))
"""

WAYS = {
    "converters.load": "jaxlens `converters.load(dir)` (numpy, fp32)",
    "from_pretrained_no_processing:float32": "jaxlens `from_pretrained_no_processing(dir)` fp32",
    "from_pretrained:float32": "jaxlens `from_pretrained(dir)` fp32 (TL processing)",
    "from_pretrained:bfloat16": "jaxlens `from_pretrained(dir, dtype=bfloat16)` (processing in fp32)",
    "transformers": "transformers `GPT2LMHeadModel.from_pretrained(dir)` fp32",
}


def make_checkpoint(path: Path, d_model: int, layers: int, vocab: int, n_ctx: int = 1024) -> int:
    """Write a random GPT-2 (safetensors + config.json, tied unembedding) into `path`; returns the file's
    bytes."""
    from jaxlens import testing

    testing.write_random_gpt2(path, d_model, layers, vocab, n_ctx, tie_word_embeddings=True)
    return (path / "model.safetensors").stat().st_size


def measure(path: Path, how: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise RuntimeError(f"{how} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "nproc": os.cpu_count(), "system": platform.system(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "numpy", "torch", "transformers", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def table(result: dict) -> str:
    m, c = result["machine"], result["checkpoint"]
    lines = [
        f"### Loading a checkpoint ({result['date']})",
        "",
        f"- Command: `{result['command']}`",
        f"- Machine: {m['cpu']}, nproc {m['nproc']}, {m['system']}, "
        f"load average {m['load_average']:.1f} at start",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- Checkpoint: random GPT-2, d_model {c['d_model']}, {c['layers']} layers, vocab {c['vocab']}, "
        f"{c['file_mib']:.0f} MiB safetensors (tied unembedding); float32 params "
        f"{c['params_mib']:.0f} MiB in jaxlens (W_U stored apart), "
        f"{c['hf_params_mib']:.0f} MiB in transformers",
        f"- Each row: {result['repeats']} fresh processes; time = median (min), peak RSS growth = median, "
        "over the child's baseline after imports",
        "",
        "| how | load time s | peak RSS growth MiB | x own fp32 params | x file |",
        "|---|---|---|---|---|",
    ]
    for how, r in result["rows"].items():
        lines.append(f"| {WAYS[how]} | {r['seconds']:.2f} ({r['seconds_min']:.2f}) | {r['growth_mib']:.0f} | "
                     f"{r['x_params']:.2f} | {r['x_file']:.2f} |")
    lines += ["", "transformers memory-maps the safetensors file and keeps float32 weights as views of the "
              "map: pages become resident when first read (a forward pass), so its load-time growth "
              "undercounts what the model costs once used. jaxlens copies every tensor out of the file (and "
              "stores W_U apart from W_E), so its growth is the whole model plus the loading overhead."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    args = ap.parse_args()
    result = {"command": "python benchmarks/bench_load.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "versions": versions(), "repeats": args.repeats, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        t = time.perf_counter()
        file_bytes = make_checkpoint(path, args.d_model, args.layers, args.vocab)
        print(f"checkpoint written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        runs: dict[str, list[dict]] = {how: [] for how in WAYS}
        for _ in range(args.repeats):  # interleaved, so load from other processes falls on every way alike
            for how in WAYS:
                runs[how].append(measure(path, how))
                print(how, json.dumps(runs[how][-1]), file=sys.stderr)
    fp32_params = runs["from_pretrained_no_processing:float32"][0]["params_mib"]
    result["checkpoint"] = {"d_model": args.d_model, "layers": args.layers, "vocab": args.vocab,
                            "file_mib": file_bytes / 2**20, "params_mib": fp32_params,
                            "hf_params_mib": runs["transformers"][0]["params_mib"]}
    for how, rs in runs.items():
        growth = statistics.median(r["growth_mib"] for r in rs)
        own = rs[0]["params_mib"] if how == "transformers" else fp32_params  # the library's fp32 model
        result["rows"][how] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "seconds_min": min(r["seconds"] for r in rs), "growth_mib": growth,
            "ru_maxrss_growth_mib": statistics.median(r["ru_maxrss_growth_mib"] for r in rs),
            "x_params": growth / own, "x_file": growth / (file_bytes / 2**20), "runs": rs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
