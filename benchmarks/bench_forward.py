"""Core forward benchmark: jaxlens vs Hugging Face transformers vs TransformerLens, GPT-2-small shape.

One random GPT-2-small (d_model 768, 12 layers, 12 heads, d_mlp 3072, vocab 50257, n_ctx 1024) is built
with `transformers` and loaded into jaxlens with `from_pretrained_no_processing`, so every library runs the
same weights (checked: the logits agree). Batch 1, 16 and 256 tokens. Timed, each the median (and min) of N
interleaved runs after warm-up:

- jaxlens `model(tokens)` and `model.run_with_cache(tokens)` (all default hooks), jitted, `block_until_ready`;
- HF `model(tokens)` under `torch.no_grad()` with 2 torch threads, with its default attention (sdpa) and with
  eager attention returning hidden states and attentions (its nearest thing to a cache);
- TransformerLens 4.x (if installed) `TransformerBridge` in compatibility mode, forward and `run_with_cache`.

Also the compile time of the jitted forward (and run_with_cache) for 12 and 48 layers: the blocks run under
`jax.lax.scan`, so it should barely grow with depth, except where the façade unrolls them (models of at most
`jaxlens.model.layout.UNROLL_MAX_LAYERS` layers on CPU: per-layer weight views, no per-call weight copies);
unrolled compile is also measured at `--unroll-depths` to show where it stops being acceptable. Measured as
`jax.jit(f).lower(shapes).compile()` on abstract shapes (no weights allocated). The scanned forward (the path
before the layout) is timed in the same run. Each timing also records the process CPU time of the call.

    python benchmarks/bench_forward.py                 # full run, appends a section to BENCHMARKS.md
    python benchmarks/bench_forward.py --quick --no-append
    python benchmarks/bench_forward.py --dtype bfloat16 --repeats 10
    python benchmarks/bench_forward.py --quick --no-append --json benchmarks/results/forward16.json
"""

import argparse
import copy
import datetime
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

import jaxlens  # noqa: E402
from jaxlens import HookedTransformer, hook_names  # noqa: E402
from jaxlens._atomic import write_json  # noqa: E402
from jaxlens.model import layout  # noqa: E402
from jaxlens.model.forward import run  # noqa: E402

GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024)
ROOT = Path(__file__).resolve().parents[1]


def measure(fns: dict, repeats: int, warmup: int = 2) -> dict[str, tuple[float, float, float]]:
    """{name: (median ms, min ms, median process CPU ms)} of each thunk (which must block until its result is
    ready).

    The thunks are timed in interleaved rounds (a, b, c, a, b, c, ...) so that load from other processes
    falls on every library alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
            cpu[name].append(1e3 * (time.process_time() - c0))
    return {name: (statistics.median(t), min(t), statistics.median(cpu[name])) for name, t in times.items()}


def build_hf(torch_dtype):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**GPT2_SMALL, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(torch_dtype).eval()


def jaxlens_thunks(model: HookedTransformer, tokens: np.ndarray) -> dict:
    toks = jnp.asarray(tokens)
    scanned = jax.jit(lambda params, t: run(params, model.cfg, t)[0])  # no layout: the scan over layers
    return {("jaxlens", "forward"): lambda: jax.block_until_ready(model(toks)),
            ("jaxlens", "forward (scan)"): lambda: jax.block_until_ready(scanned(model.params, toks)),
            ("jaxlens", "run_with_cache"): lambda: jax.block_until_ready(model.run_with_cache(toks))}


def hf_thunks(hf, hf_eager, tokens: np.ndarray) -> dict:
    import torch

    toks = torch.as_tensor(tokens, dtype=torch.long)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    lib = "HF transformers"
    return {(lib, "forward (sdpa)"): no_grad(lambda: hf(toks)),
            (lib, "forward (eager)"): no_grad(lambda: hf_eager(toks)),
            (lib, "hidden+attn (eager)"): no_grad(lambda: hf_eager(toks, output_hidden_states=True,
                                                                   output_attentions=True))}


def boot_tl(hf, torch_dtype):
    """TransformerLens 4.x bridge (compatibility mode, TL's default processing) on a copy of `hf`, or None."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:
        print(f"TransformerLens not available ({e}); skipping it.", file=sys.stderr)
        return None
    from jaxlens import testing

    with tempfile.TemporaryDirectory() as d:
        model = copy.deepcopy(hf).float()
        testing.save_hf_model(model, Path(d), testing.train_tiny_tokenizer(Path(d)))
        br = TransformerBridge.boot_transformers(d, device="cpu", dtype=torch_dtype)
    br.enable_compatibility_mode(disable_warnings=True)
    return br


def tl_thunks(br, tokens: np.ndarray) -> dict:
    import torch

    toks = torch.as_tensor(tokens, dtype=torch.long)

    def forward():
        with torch.no_grad():
            return br(toks)

    def cache():
        with torch.no_grad():
            return br.run_with_cache(toks)

    return {("TransformerLens", "forward"): forward, ("TransformerLens", "run_with_cache"): cache}


COMPILED = {
    "forward": "forward (no cache), scan",
    "facade forward": "forward as the façade compiles it (unrolled where the layout applies)",
    "per-layer": "forward + default hooks, per-layer names (`blocks.3.attn.hook_z`), scan",
    "stacked": "forward + default hooks, stacked names (`blocks.attn.hook_z`, [layer ...]), scan",
    "run_with_cache": "run_with_cache's program: per-layer names, held stacked (`ActivationCache` slices), "
                      "as the façade compiles it",
}
UNROLLED = "forward, unrolled (per-layer weights, as the layout runs it)"


def abstract_layout(cfg: jaxlens.Config, params, unroll: bool) -> layout.Layout | None:
    """The abstract shapes of the layout `layout.prepare` makes for float32 CPU params (None: the scan)."""
    if not unroll or params["unembed"]["W_U"].dtype != jnp.float32:
        return None
    one = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), params["blocks"])
    return layout.Layout(tuple(one for _ in range(cfg.n_layers)),
                         jax.ShapeDtypeStruct((cfg.d_vocab, cfg.d_model), jnp.float32))


def compile_seconds(cfg: jaxlens.Config, n_layers: int, n_tokens: int, dtype,
                    kind: str) -> tuple[float, float]:
    """(lower, compile) seconds of jax.jit(forward).lower(abstract shapes).compile() at n_layers layers.

    kind: "forward" (no cache, scan), "facade forward" (no cache, unrolled at most UNROLL_MAX_LAYERS layers),
    "unrolled" (no cache, always unrolled), "per-layer" (every default hook, one name per layer), "stacked"
    (the same activations as one [layer ...] array per hook) or "run_with_cache" (per-layer names, recorded
    stacked, unrolled where the layout applies, as `run_with_cache` compiles them)."""
    cfg = cfg.replace(n_layers=n_layers)
    params = jax.eval_shape(lambda: jaxlens.init_params(cfg, jax.random.key(0), dtype=dtype))
    tokens = jax.ShapeDtypeStruct((1, n_tokens), jnp.int32)
    names = () if kind in ("forward", "facade forward", "unrolled") else tuple(hook_names.default_names(cfg))
    if kind == "stacked":
        names = tuple(dict.fromkeys(n if not n.startswith("blocks.") else "blocks." + n.split(".", 2)[2]
                                    for n in names))
    facade = kind in ("facade forward", "run_with_cache") and n_layers <= layout.UNROLL_MAX_LAYERS
    lay = abstract_layout(cfg, params, facade or kind == "unrolled")

    def f(params, lay, tokens):  # a fresh function each time: nothing is reused from jit's cache
        return run(params, cfg, tokens, cache_names=names, stacked_cache=kind == "run_with_cache",
                   layout=lay)[:2]

    t0 = time.perf_counter()
    lowered = jax.jit(f).lower(params, lay, tokens)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def machine() -> str:
    model = cpu_model()
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} cores, {platform.system()}{load}"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--quick", action="store_true", help="16 tokens only, 3 repeats, compile at 12/48 layers")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs each (default 15; quick 3)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 16 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results to this JSON file")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time rows")
    ap.add_argument("--unroll-depths", type=int, nargs="*", default=[12, 24],
                    help="depths at which to time the unrolled forward's compile")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    lengths = args.lengths or ([16] if args.quick else [16, 256])

    import torch

    torch.set_num_threads(args.threads)
    torch_dtype = getattr(torch, args.dtype)
    jnp_dtype = getattr(jnp, args.dtype)

    t0 = time.perf_counter()
    hf = build_hf(torch_dtype)
    jl = HookedTransformer.from_pretrained_no_processing(copy.deepcopy(hf).float(), dtype=jnp_dtype)
    br = None if args.no_tl else boot_tl(hf, torch_dtype)
    hf_eager = copy.deepcopy(hf)
    hf_eager.set_attn_implementation("eager")
    print(f"models built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    load_start = os.getloadavg()
    rows = []  # (tokens, library, what, median ms, min ms, median CPU ms)
    rng = np.random.RandomState(0)
    for n in lengths:
        tokens = rng.randint(1, GPT2_SMALL["vocab_size"], (1, n))
        with torch.no_grad():
            ref = hf(torch.as_tensor(tokens)).logits.float().numpy()
        err = float(np.abs(np.asarray(jl(tokens), np.float32) - ref).max())
        tol = 1e-3 if args.dtype == "float32" else 0.5
        assert err < tol, f"jaxlens and HF logits differ by {err} at {n} tokens: not the same model"
        print(f"{n} tokens: |jaxlens - HF| logits max {err:.2e}", file=sys.stderr)
        thunks = {**jaxlens_thunks(jl, tokens), **hf_thunks(hf, hf_eager, tokens)}
        if br is not None:
            thunks.update(tl_thunks(br, tokens))
        for (lib, what), (med, best, cpu) in measure(thunks, repeats).items():
            rows.append((n, lib, what, med, best, cpu))
            print(f"{n:>4} tokens  {lib:<16} {what:<20} {med:9.2f} ms (min {best:.2f}, CPU {cpu:.2f})",
                  file=sys.stderr)

    compile_rows = []
    for kind in () if args.no_compile else COMPILED:
        for n_layers in (12, 48):
            lower_s, compile_s = compile_seconds(jl.cfg, n_layers, lengths[0], jnp_dtype, kind)
            compile_rows.append((n_layers, COMPILED[kind], lower_s, compile_s))
            print(f"{n_layers} layers, {kind}: lower {lower_s:.2f} s, compile {compile_s:.2f} s",
                  file=sys.stderr)
    for n_layers in () if args.no_compile else args.unroll_depths:
        lower_s, compile_s = compile_seconds(jl.cfg, n_layers, lengths[0], jnp_dtype, "unrolled")
        compile_rows.append((n_layers, UNROLLED, lower_s, compile_s))
        print(f"{n_layers} layers, unrolled: lower {lower_s:.2f} s, compile {compile_s:.2f} s",
              file=sys.stderr)

    report = render(args, argv, rows, compile_rows, repeats, br is not None, lengths[0])
    if args.json is not None:
        write_json(args.json, {
            "command": "python benchmarks/bench_forward.py "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "unroll_max_layers": layout.UNROLL_MAX_LAYERS, "dtype": args.dtype, "repeats": repeats,
            "timings": [dict(tokens=n, library=lib, operation=what, median_ms=med, min_ms=best,
                             median_cpu_ms=cpu) for n, lib, what, med, best, cpu in rows],
            "compile": [dict(layers=n, function=what, lower_s=lo, compile_s=co)
                        for n, what, lo, co in compile_rows]})
        print(f"wrote {args.json}", file=sys.stderr)
    print(report)
    if not args.no_append:
        append(args.out, report)
        print(f"appended to {args.out}", file=sys.stderr)
    return report


def render(args, argv, rows, compile_rows, repeats, with_tl, compile_tokens) -> str:
    cmd = "python benchmarks/bench_forward.py " + " ".join(sys.argv[1:] if argv is None else argv)
    versions = f"jax {jax.__version__}"
    import torch
    import transformers

    versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
    if with_tl:
        from importlib.metadata import version

        versions += f", transformer-lens {version('transformer-lens')}"
    lines = [
        f"### Core forward ({args.dtype}, {datetime.date.today().isoformat()})",
        "",
        f"- Command: `{cmd.strip()}`",
        f"- Machine: {machine()}; torch threads {args.threads}; {versions}",
        f"- GPT-2-small shape, random weights (identical in every library), batch 1, median and min of "
        f"{repeats} interleaved runs after 2 warm-up runs. Ratio: median / jaxlens's median for the same "
        "operation (forward vs forward; run_with_cache and HF hidden+attn vs jaxlens run_with_cache). "
        "TransformerLens: 4.x TransformerBridge, compatibility mode (processed weights, eager attention); "
        "its run_with_cache records its bridge-only hooks too.",
        "",
        "| tokens | library | operation | median ms | min ms | median vs jaxlens | CPU ms | CPU vs jaxlens |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    jl = {(n, what): (ms, cpu) for n, lib, what, ms, _, cpu in rows if lib == "jaxlens"}
    for n, lib, what, ms, best, cpu in rows:
        base, base_cpu = jl[(n, "run_with_cache" if ("cache" in what or "hidden" in what) else "forward")]
        lines.append(f"| {n} | {lib} | {what} | {ms:.2f} | {best:.2f} | {ms / base:.2f}x | {cpu:.1f} | "
                     f"{cpu / base_cpu:.2f}x |")
    lines += ["", f"Compile time, `jax.jit(f).lower(abstract shapes).compile()`, {compile_tokens} tokens:",
              "",
              "| layers | function | lower s | compile s |", "|---:|---|---:|---:|"]
    lines += [f"| {n} | {what} | {lo:.2f} | {co:.2f} |" for n, what, lo, co in compile_rows]
    return "\n".join(lines) + "\n"


SECTION = "## Core forward"


def append(path: Path, report: str) -> None:
    """Add `report` at the end of the "Core forward" section of BENCHMARKS.md (before the next `## ` section),
    creating the section, and the file with a short header, if missing. Nothing else is rewritten."""
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nMeasured timings of jaxlens against Hugging Face transformers and TransformerLens. "
        "Each entry names the command that produced it, the machine and the date; entries are appended, "
        "never rewritten.\n")
    if SECTION not in text:
        text = (text.rstrip("\n") + f"\n\n{SECTION}\n\n`benchmarks/bench_forward.py`: one forward and one "
                "run_with_cache, jaxlens vs HF vs TransformerLens, plus compile time against depth.\n")
    start = text.index(SECTION) + len(SECTION)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    head, tail = text[:end].rstrip("\n"), text[end:]
    path.write_text(head + "\n\n" + report + ("\n" + tail if tail else ""))


if __name__ == "__main__":
    main()
