"""Hook-function benchmark: TransformerLens's loop idiom, a fresh hook function per `run_with_hooks` call.

One random GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257), 16 tokens,
batch 1: a random `transformers` GPT2LMHeadModel saved to a temporary folder and loaded, unprocessed, into
TransformerLens 4.3 (`TransformerBridge.boot_transformers` + `enable_compatibility_mode(no_processing=True)`)
and jaxlens (`from_pretrained_no_processing`). The loop, N calls, position `i % 16` each:

    jaxlens:          hook = lambda x, hook: x.at[:, pos].set(clean[:, pos])   # a new function every call
    TransformerLens:  def hook(x, hook): x[:, pos] = clean[:, pos]; return x   # TL's in-place idiom

(`clean`: the clean run's `blocks.5.hook_resid_pre`, patched into a corrupted run there.) Each call is timed
to a ready result (`block_until_ready`; `torch.no_grad()`, 2 torch threads), the two libraries interleaved
call by call. Reported: jaxlens's first call (compile + run), the median and min of its later calls, TL's
median and min (and its first call), each's median process CPU time (less sensitive to other processes on
a shared machine), the ratios of medians, each library's forward without hooks (interleaved too), the
compiles the loop caused (`run_jit`'s cache entries) and the largest logit difference from TL. For
comparison, the two other designs measured: the hook kept static by identity (the previous behaviour: one
compile per call) and the calls run without jit (`jax.disable_jit()`), a few calls each.

    python benchmarks/bench_hooks.py                 # writes benchmarks/results/hooks.json, prints a section
    python benchmarks/bench_hooks.py --calls 10 --no-tl
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from jaxlens import HookedTransformer, testing  # noqa: E402
from jaxlens.caching import run_jit  # noqa: E402

GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024)
NAME = "blocks.5.hook_resid_pre"
N_TOKENS = 16
ROOT = Path(__file__).resolve().parents[1]


def build(workdir: Path, with_tl: bool, threads: int):
    """(jaxlens model, TL bridge or None) on the same random GPT-2-small weights."""
    if not with_tl:
        d, n, v = GPT2_SMALL["n_embd"], GPT2_SMALL["n_layer"], GPT2_SMALL["vocab_size"]
        testing.write_random_gpt2(workdir, d, n, v)
        return HookedTransformer.from_pretrained_no_processing(workdir), None
    import torch
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SMALL, bos_token_id=0, eos_token_id=0))
    testing.perturb_hf_model(hf.float().eval(), scale=0.02)
    testing.save_hf_model(hf, workdir, testing.train_tiny_tokenizer(workdir))
    del hf
    model = HookedTransformer.from_pretrained_no_processing(workdir)
    br = TransformerBridge.boot_transformers(str(workdir), device="cpu", dtype=torch.float32)
    br.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    br.eval()
    return model, br


def timed(fn) -> tuple[float, float, object]:
    """(wall ms, process CPU ms, result) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return 1e3 * (time.perf_counter() - t0), 1e3 * (time.process_time() - c0), out


def jaxlens_call(model, corrupted, clean, pos: int):
    """One call of the idiom: a hook function made here, closing over `pos` and `clean`."""
    hook = lambda x, hook: x.at[:, pos].set(clean[:, pos])  # noqa: E731
    return jax.block_until_ready(model.run_with_hooks(corrupted, fwd_hooks=[(NAME, hook)]))


class _StaticHook:
    """The previous behaviour: a hook that is not a plain function is static, by identity (a compile each)."""

    def __init__(self, pos, clean):
        self.pos, self.clean = pos, clean

    def __call__(self, x, hook):
        return x.at[:, self.pos].set(self.clean[:, self.pos])


def tl_call(br, corrupted, clean, pos: int):
    import torch

    def hook(x, hook):
        x[:, pos] = clean[:, pos]
        return x

    with torch.no_grad():
        return br.run_with_hooks(corrupted, fwd_hooks=[(NAME, hook)])


def tl_forward(br, corrupted):
    import torch

    with torch.no_grad():
        return br(corrupted)


def summary(ms: list[float], cpu: list[float]) -> dict:
    later = ms[1:]
    return {"first_ms": ms[0], "median_ms": statistics.median(later), "min_ms": min(later), "calls": len(ms),
            "first_cpu_ms": cpu[0], "median_cpu_ms": statistics.median(cpu[1:]), "all_ms": ms,
            "all_cpu_ms": cpu}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="run_with_hooks calls per library (default 20)")
    ap.add_argument("--others", type=int, default=3, help="calls of the other two designs (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens (no torch needed)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hooks.json")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        model, br = build(Path(d), not args.no_tl, args.threads)
    rng = np.random.RandomState(0)
    clean_tokens = rng.randint(1, GPT2_SMALL["vocab_size"], (1, N_TOKENS))
    corrupted_tokens = rng.randint(1, GPT2_SMALL["vocab_size"], (1, N_TOKENS))
    corrupted = jnp.asarray(corrupted_tokens)
    _, cache = model.run_with_cache(jnp.asarray(clean_tokens), names_filter=NAME)
    clean = cache[NAME]
    if br is not None:
        import torch

        with torch.no_grad():
            _, tl_cache = br.run_with_cache(torch.as_tensor(clean_tokens), names_filter=NAME)
        tl_clean, tl_corrupted = tl_cache[NAME].clone(), torch.as_tensor(corrupted_tokens)

    jax.block_until_ready(model(corrupted))  # the plain forward's program, compiled before the count starts
    entries0 = run_jit._cache_size()
    jl_ms, jl_cpu, tl_ms, tl_cpu, max_diff = [], [], [], [], 0.0
    plain = {"jaxlens": [], "transformer_lens": []}  # the forward without hooks, interleaved with the loop
    for i in range(args.calls):
        pos = i % N_TOKENS
        ms, cpu, out = timed(lambda: jaxlens_call(model, corrupted, clean, pos))  # noqa: B023
        jl_ms.append(ms)
        jl_cpu.append(cpu)
        if br is not None:
            ms, cpu, ref = timed(lambda: tl_call(br, tl_corrupted, tl_clean, pos))  # noqa: B023
            tl_ms.append(ms)
            tl_cpu.append(cpu)
            max_diff = max(max_diff, float(np.abs(np.asarray(out) - ref.numpy()).max()))
            plain["transformer_lens"].append(timed(lambda: tl_forward(br, tl_corrupted))[0])
        plain["jaxlens"].append(timed(lambda: jax.block_until_ready(model(corrupted)))[0])
    compiles = run_jit._cache_size() - entries0

    static = lambda i: jax.block_until_ready(  # noqa: E731
        model.run_with_hooks(corrupted, fwd_hooks=[(NAME, _StaticHook(i, clean))]))
    static_ms = [timed(lambda: static(i))[0] for i in range(args.others)]  # noqa: B023
    with jax.disable_jit():
        eager = lambda i: jaxlens_call(model, corrupted, clean, i)  # noqa: E731
        eager_ms = [timed(lambda: eager(i))[0] for i in range(args.others)]  # noqa: B023

    result = {
        "command": "python benchmarks/bench_hooks.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M+00:00"),
        "machine": f"{cpu_model()}, nproc {os.cpu_count()}, {platform.system()}",
        "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
        "torch_threads": args.threads, "tokens": N_TOKENS, "hook": NAME,
        "versions": {"jax": jax.__version__},
        "jaxlens": {**summary(jl_ms, jl_cpu), "compiles": compiles},
        "plain_forward_median_ms": {k: statistics.median(v[1:]) for k, v in plain.items() if v},
        "jaxlens_static_hook_previous": {"calls_ms": static_ms},
        "jaxlens_no_jit": {"calls_ms": eager_ms},
    }
    if br is not None:
        from importlib.metadata import version

        result["versions"] |= {"torch": version("torch"), "transformer_lens": version("transformer-lens")}
        tl = result["transformer_lens"] = summary(tl_ms, tl_cpu)
        result["ratio_tl_over_jaxlens_median"] = tl["median_ms"] / result["jaxlens"]["median_ms"]
        result["ratio_tl_over_jaxlens_median_cpu"] = tl["median_cpu_ms"] / result["jaxlens"]["median_cpu_ms"]
        result["max_abs_logit_diff_vs_tl"] = max_diff
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    jl, tl = r["jaxlens"], r.get("transformer_lens")
    def row(lib, x, n):
        return (f"| {lib} | {x['first_ms']:.0f} | {x['median_ms']:.1f} | {x['min_ms']:.1f} | "
                f"{x['median_cpu_ms']:.1f} | {n} |")

    rows = [row("jaxlens", jl, jl["compiles"])] + ([row("TransformerLens 4.3", tl, "-")] if tl else [])
    fmt = lambda ms: ", ".join(f"{m:.0f}" for m in ms)  # noqa: E731
    lines = [
        f"- Command: `{r['command']}`",
        f"- Machine: {r['machine']}; load average {r['load_average_start']:.1f} at start, "
        f"{r['load_average_end']:.1f} at end; torch threads {r['torch_threads']}",
        f"- Date: {r['date']}",
        f"- {jl['calls']} calls, a fresh hook function each (patching position `i % 16` of `{r['hook']}`), "
        f"{r['tokens']} tokens, timed call by call, the libraries interleaved.", "",
        "| library | first call, ms | later calls, median ms | min ms | median CPU ms | compiles in loop |",
        "|---|---|---|---|---|---|",
        *rows, "",
    ]
    if tl:
        lines.append(f"Ratio (TransformerLens median / jaxlens median): "
                     f"**{r['ratio_tl_over_jaxlens_median']:.2f}x** wall, "
                     f"{r['ratio_tl_over_jaxlens_median_cpu']:.2f}x process CPU time; max |logit difference| "
                     f"from TL: {r['max_abs_logit_diff_vs_tl']:.1e}.")
    fwd = r["plain_forward_median_ms"]
    names = {"jaxlens": "jaxlens", "transformer_lens": "TransformerLens"}
    lines.append("The same model's forward without hooks, interleaved with the loop (median ms): "
                 + ", ".join(f"{names[k]} {v:.1f}" for k, v in fwd.items()) + ".")
    lines.append(f"Other designs, same run: the hook static by identity (the previous behaviour, one compile "
                 f"per call): {fmt(r['jaxlens_static_hook_previous']['calls_ms'])} ms a call; without jit "
                 f"(`jax.disable_jit()`): {fmt(r['jaxlens_no_jit']['calls_ms'])} ms a call.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
