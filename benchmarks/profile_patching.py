"""Where the time of a head x position sweep goes: per compiled program (one per window length) of the
GPT-2-small-shaped sweep of `bench_patching.py` (random weights, 16 tokens):

- compile: tracing + lowering, and XLA's compile, of each chunk function (and of the corrupted forward);
- XLA's cost analysis (FLOPs of one chunk, the layer loop's body counted once);
- stages: one chunk timed when patched at the last layer (the one-position block, the unembedding of the read
  logits and the metric: the fixed part), at the layer before it (plus the last layer) and at layer 0 (plus
  every window block): the difference over the extra layers is the time of one window-wide block;
- a `jax.profiler` trace of one chunk patched at layer 0, its XLA operations summed into matrix products,
  per-layer weight copies (the loop reads each layer's weights by dynamic index), reductions and the rest.

    python benchmarks/profile_patching.py                  # writes benchmarks/results/patching_profile.json
    python benchmarks/profile_patching.py --repeats 5 --out /tmp/profile.json
"""

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _sweep_analysis import cost, med, metric, timed  # (benchmarks/ is on sys.path when run as a script)
from bench_patching import GPT2_CFG, machine, prompts

import jaxlens
from jaxlens import HookedTransformer, patching
from jaxlens.model.forward import run
from jaxlens.patching.plan import resolve_target
from jaxlens.patching.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
HOOK, AXES = "attn.hook_z", ("layer", "pos", "head")


def categories(hlo: str) -> dict[str, str]:
    """HLO instruction name -> category, from the compiled module's text (the trace names instructions)."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = ([^\n]*)", hlo):
        name, rest = m.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        op = op.group(1) if op else ""
        if name.startswith("ynn_fusion"):
            out[name] = "reductions (norms, softmax, metric)" if "reduce" in op else "matrix products"
        elif "dynamic_index_in_dim" in op:
            out[name] = "per-layer weight (and key/value) copies"
        elif "reduce" in op:
            out[name] = "reductions (norms, softmax, metric)"
        else:
            out[name] = "other (elementwise, key/value scatter, transposes)"
    return out


def trace_breakdown(fn, hlo: str) -> dict:
    """Milliseconds per category of the XLA operations of one call of `fn`, from a jax.profiler trace."""
    cat = categories(hlo)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            fn()
        path = next(Path(d).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in cat:
            total[cat[e["name"]]] += e.get("dur", 0) / 1e3
    return dict(total)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per chunk and layer (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "patching_profile.json")
    args = ap.parse_args(argv)
    cfg, L = GPT2_CFG, GPT2_CFG.n_layers
    params = jaxlens.init_params(cfg, jax.random.key(0))
    clean, corrupted = prompts(cfg.d_vocab)
    _, cache = HookedTransformer(cfg, params).run_with_cache(clean)
    toks = jnp.asarray(corrupted)
    cmd = "python benchmarks/profile_patching.py " + " ".join(sys.argv[1:] if argv is None else argv)
    R = dict(command=cmd.strip(), machine=machine(), programs=[])
    plan = patching.plan_sweep(params, cfg, toks, cache, metric, hook=HOOK, axes=AXES)
    R["plan"] = str(plan)
    names = tuple(dict.fromkeys((plan.hook, f"blocks.{L - 1}.hook_resid_post", "blocks.hook_resid_pre",
                                 "blocks.attn.hook_k", "blocks.attn.hook_v")))
    _, w, c = timed(lambda: jax.jit(lambda p, t: run(p, cfg, t, cache_names=names)[:2]).lower(params, toks)
                    .compile())
    R["corrupted_forward_compile"] = dict(wall_s=w, cpu_s=c)
    data = prepare(params, cfg, toks, cache, resolve_target(cfg, HOOK, AXES), metric, None, True).data
    for k, prog in enumerate(plan.programs):
        low, lower_s, lower_cpu = timed(lambda k=k: plan.lower(k))
        comp, compile_s, compile_cpu = timed(low.compile)
        C, pos = prog.chunk_size, plan.n_pos - prog.window
        idx = np.stack([np.zeros(C), np.full(C, pos), np.arange(C) % cfg.n_heads], 1).astype(np.int32)
        at = {}
        for layer in (L - 1, L - 2, 0):
            ii = jnp.asarray(idx).at[:, 0].set(layer)
            call = lambda comp=comp, layer=layer, ii=ii: jax.block_until_ready(  # noqa: E731
                comp(params, data, np.int32(layer), ii))
            call()
            runs = [timed(call)[1:] for _ in range(args.repeats)]
            at[layer] = (med([r[0] for r in runs]), med([r[1] for r in runs]))
        per_block = [(at[0][i] - at[L - 2][i]) / (L - 2) for i in (0, 1)]
        ii = jnp.asarray(idx)
        ops = trace_breakdown(lambda comp=comp, ii=ii: jax.block_until_ready(comp(params, data, np.int32(0),
                                                                                  ii)), comp.as_text())
        R["programs"].append(dict(
            window=prog.window, chunk_size=C, last_queries=prog.last_queries, n_chunks=prog.n_chunks,
            trace_lower_s=lower_s, xla_compile_s=compile_s, compile_cpu_s=lower_cpu + compile_cpu,
            xla_flops_one_chunk=cost(comp), fixed_part_wall_cpu_s=at[L - 1],
            last_layers_wall_cpu_s=at[L - 2], layer0_wall_cpu_s=at[0], window_block_wall_cpu_s=per_block,
            window_block_gflop=C * patching.cost.block_flops(cfg, prog.window, plan.n_pos) / 1e9,
            trace_ms_by_category_layer0=ops))
        print(json.dumps(R["programs"][-1]), file=sys.stderr, flush=True)
    R["load_average_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(R, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return R


if __name__ == "__main__":
    main()
