"""Sweep analysis for `bench_patching.py`: the metric, timing helpers, and a sweep planned and compiled afresh
with XLA's cost and memory analyses next to the plan's analytic FLOPs."""

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp

import jaxlens
from jaxlens import patching
from jaxlens.patching.cost import block_flops, unembed_flops

ANSWER, WRONG = 100, 200  # the metric's two vocabulary ids


def metric(logits):
    """Logit difference of two answers at the last position, mean over the batch (an IOI-style metric)."""
    return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()


def timed(fn):
    """(result, wall s, process CPU s) of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def med(xs):
    return float(statistics.median(xs))


# -- the matmul reference ------------------------------------------------------------------------------------
def matmul_fn(n: int, dtype):
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    return lambda: jax.block_until_ready(f(a, b)), 2.0 * n ** 3


def matmul_round(mm, flops, min_s: float = 0.5) -> tuple[float, float]:
    """(FLOP/s by wall time, FLOP/s per CPU second) over repeated matmuls for at least min_s seconds."""
    walls, cpus = [], []
    t_end = time.perf_counter() + min_s
    while time.perf_counter() < t_end or len(walls) < 3:
        _, w, c = timed(mm)
        walls.append(w)
        cpus.append(c)
    return flops / med(walls), flops / max(med(cpus), 1e-9)


def cost(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))


@dataclasses.dataclass
class SweepInfo:
    plan: patching.SweepPlan
    specs: dict  # program -> dict(window, chunk, lower_s, compile_s, flops, temp_bytes, arg_bytes)
    prep_compile_s: float
    prep_compile_cpu_s: float
    flops_xla: float  # the whole sweep, loop body x trips
    flops_analytic: float
    naive_flops_xla: float  # one full forward per cell, all cells of the grid
    naive_flops_analytic: float
    block_xla: float  # one block over all positions, per cell (XLA)
    block_analytic: float


def analyse_sweep(params, cfg, tokens, clean_cache, hook, axes, *, reuse=True, budget=None, chunk_size=None,
                  compile_prep=True, metric_fn=metric) -> SweepInfo:
    """Plan the sweep (`patching.plan_sweep`, as `patching.sweep` plans it) and compile its chunk functions
    afresh (`SweepPlan.lower`): timing, XLA's cost and memory analyses; the analytic FLOPs are the plan's."""
    toks = jnp.asarray(tokens)
    plan = patching.plan_sweep(params, cfg, toks, clean_cache, metric_fn, hook=hook, axes=axes,
                               prefix_reuse=reuse, memory_budget=budget, chunk_size=chunk_size)
    prep_s = prep_cpu = float("nan")
    if compile_prep:
        k = "blocks.attn.hook_rot_k" if cfg.positional_embedding_type == "rotary" else "blocks.attn.hook_k"
        names = tuple(dict.fromkeys((plan.hook, f"blocks.{cfg.n_layers - 1}.hook_resid_post",
                                     "blocks.hook_resid_pre", k, "blocks.attn.hook_v")))

        def prep_fn(p, t):  # a fresh function: nothing from jit's cache
            return jaxlens.model.forward.run(p, cfg, t, cache_names=names)[:2]

        _, prep_s, prep_cpu = timed(lambda: jax.jit(prep_fn).lower(params, toks).compile())
    P = plan.n_pos
    read_flops = unembed_flops(cfg, plan.n_logits)  # per cell: the logits the metric reads
    specs = {}
    for k_, prog in enumerate(plan.programs):
        low, lower_s, lower_cpu = timed(functools.partial(plan.lower, k_))
        comp, compile_s, compile_cpu = timed(low.compile)
        ma = comp.memory_analysis()
        specs[k_] = dict(window=prog.window, chunk=prog.chunk_size, lower_s=lower_s, compile_s=compile_s,
                         cpu_s=lower_cpu + compile_cpu, flops=cost(comp), point=prog.point,
                         temp_bytes=int(getattr(ma, "temp_size_in_bytes", -1)),
                         arg_bytes=int(getattr(ma, "argument_size_in_bytes", -1)))
        if prog.point:  # the same chunk with the patched block over the window: its loop body's FLOPs
            specs[k_]["window_block_flops"] = cost(plan.lower(k_, point_layer=False).compile()) - \
                prog.chunk_size * read_flops
        if prog.last_queries:  # the last layer on the read positions: FLOPs beyond a chunk without it
            without = cost(plan.lower(k_, last_layer=False).compile())
            specs[k_]["last_layer_flops"] = specs[k_]["flops"] - without
    # one block over all P positions per cell, as XLA counts it: a reuse chunk of window P, one cell
    comp_full = plan.lower(window=P, chunk_size=1, point_layer=False, prefix_reuse=True).compile()
    block_xla = cost(comp_full) - read_flops
    fwd = jax.jit(lambda p, t: jaxlens.forward(p, cfg, t)[0]).lower(params, toks).compile()
    fwd_once = cost(fwd)  # embedding + one block (the scanned body) + full unembedding
    naive_xla = plan.n_cells * (fwd_once + (cfg.n_layers - 1) * block_xla)
    flops_xla = 0.0
    for ch in plan.chunks:
        sp = specs[ch.bucket]
        C = sp["chunk"]
        trips = cfg.n_layers - ch.layer if reuse else cfg.n_layers
        if reuse and sp["point"] and "last_layer_flops" in sp:  # once: the one-position block, the loop
            # body (layers l+1 .. L-2) and the last layer on the read positions (not run for l = L-1)
            body, last = sp["window_block_flops"], sp["last_layer_flops"]
            flops_xla += sp["flops"] + (trips - 3) * body if trips >= 2 else sp["flops"] - body - last
        elif reuse and sp["point"]:  # counted once: the one-position block and the loop body (trips - 1 runs)
            flops_xla += sp["flops"] + (trips - 2) * sp["window_block_flops"]
        elif reuse:
            flops_xla += sp["flops"] * trips
        else:  # the naive chunk scans every layer; XLA counts its body once
            flops_xla += sp["flops"] + C * (cfg.n_layers - 1) * block_xla
    return SweepInfo(plan, specs, prep_s, prep_cpu, flops_xla, plan.flops, naive_xla, plan.naive_flops,
                     block_xla, block_flops(cfg, P, P))


def windows(info: SweepInfo) -> list[int]:
    return [p.window for p in info.plan.programs]


def chunk_sizes(info: SweepInfo) -> list[int]:
    return [p.chunk_size for p in info.plan.programs]


def compile_totals(info: SweepInfo) -> tuple[float, float]:
    """(wall s, CPU s) to lower and compile the corrupted forward and every chunk function, in turn."""
    return (info.prep_compile_s + sum(s["lower_s"] + s["compile_s"] for s in info.specs.values()),
            info.prep_compile_cpu_s + sum(s["cpu_s"] for s in info.specs.values()))


# -- TransformerLens -----------------------------------------------------------------------------------------
