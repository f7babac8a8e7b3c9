"""Patching benchmark: jaxlens's head x position patching sweep vs TransformerLens 4.3; FLOPs, rate, memory.

One random GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257), 16 tokens,
batch 1. With TransformerLens, the weights are a random `transformers` GPT2LMHeadModel saved to a temporary
folder and loaded, unprocessed, into both TransformerLens 4.3 (`TransformerBridge.boot_transformers` +
`enable_compatibility_mode(no_processing=True)`) and jaxlens (`from_pretrained_no_processing`); without
(--skip-tl, no torch needed: GPU machines) they are `jaxlens.init_params`. Measured in one run:

- `get_act_patch_attn_head_out_by_pos` (2,304 cells): jaxlens's whole grid (median of --repeats warm runs)
  vs TransformerLens on its first --tl-cells cells (a counting metric stops TL's loop there; each round is
  timed, the per-cell median extrapolated to the grid). Ratios are of wall time and of process CPU time (the
  CPU machine is shared: CPU time is less sensitive to other processes). TL's values on those cells are
  checked against jaxlens's.
- FLOPs: per chunk function, XLA's `compile().cost_analysis()["flops"]` counts the body of the layer loop
  once, so the sweep's total is sum over chunks of that count x the layers the chunk runs (when the patched
  layer runs on the patched position only, that block once plus the loop body, counted from the same chunk
  compiled with the block over the window, x the layers after it); an analytic count
  (matmuls and attention) is given beside it. The reference is a naive sweep: one full forward (full
  unembedding) per cell. The same sweep with `prefix_reuse=False` is timed and counted too.
- Achieved FLOP rate of the sweep vs a plain square jitted matmul (2048 on CPU, 8192 on GPU) timed in
  interleaved rounds with the sweep in the same run; the ratio is the median over rounds.
- Compile time of the sweep's functions (fresh `jax.jit(...).lower(...).compile()` of the corrupted forward
  and every window's chunk function, as the sweep compiles them) at 12 and 30 layers.
- Memory: the budget, the chunk sizes the planner chose, the compiled temp size (`memory_analysis()`),
  peak RSS.
- Attribution patching (`patching.attribution_patch`) time vs TL's exact sweep and vs jaxlens's exact sweep,
  with its correlation to the exact grid.
- The same sweep on SmolLM2-135M (30 layers x 9 heads, 3 kv heads; the real packaged weights when
  `from_pretrained("smollm2-135m")` loads, else random weights of that shape).

    python benchmarks/bench_patching.py           # CPU: writes benchmarks/results/patching_cpu.json
    python benchmarks/bench_patching.py --quick --skip-tl
    python benchmarks/bench_patching.py --skip-tl --device-kind h100 --dtype bfloat16   # on a GPU
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's progress bar

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxlens  # noqa: E402
from jaxlens import HookedTransformer, patching  # noqa: E402
from jaxlens.patching import CellStatus  # noqa: E402
from jaxlens.patching.cost import block_flops, unembed_flops  # noqa: E402
from jaxlens.patching.plan import default_budget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024)
GPT2_CFG = jaxlens.Config(d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
                          n_ctx=1024)
SMOL_CFG = jaxlens.Config(d_model=576, n_layers=30, n_heads=9, d_head=64, d_mlp=1536, d_vocab=49152,
                          n_ctx=2048, n_key_value_heads=3, act_fn="silu", normalization_type="RMS", eps=1e-5,
                          positional_embedding_type="rotary", rotary_dim=64, rotary_base=100000.0,
                          gated_mlp=True, default_prepend_bos=False)
N_POS = 16
ANSWER, WRONG = 100, 200  # the metric's two vocabulary ids


def metric(logits):
    """Logit difference of two answers at the last position, mean over the batch (an IOI-style metric)."""
    return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()


def prompts(d_vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clean and corrupted token ids [1, 16]: random, differing at positions 1 and 9 (two swapped names), so
    only the cells at position 0 are no-ops for a causal patch."""
    rng = np.random.RandomState(seed)
    clean = rng.randint(1, d_vocab, (1, N_POS)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[0, 1], corrupted[0, 9] = clean[0, 9], clean[0, 1]
    corrupted[0, 1] = corrupted[0, 1] if corrupted[0, 1] != clean[0, 1] else (clean[0, 1] % (d_vocab - 1)) + 1
    return clean, corrupted


# -- timing --------------------------------------------------------------------------------------------------
def timed(fn):
    """(result, wall s, process CPU s) of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def med(xs):
    return float(statistics.median(xs))


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


# -- models --------------------------------------------------------------------------------------------------
def build_gpt2(args, workdir: Path):
    """(jaxlens model, TL bridge or None) on the same random GPT-2-small weights."""
    dtype = getattr(jnp, args.dtype)
    if args.skip_tl:
        cfg = GPT2_CFG.replace(n_layers=args.layers)
        return HookedTransformer(cfg, jaxlens.init_params(cfg, jax.random.key(0), dtype=dtype)), None
    import torch
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from jaxlens import testing

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(**{**GPT2_SMALL, "n_layer": args.layers}, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    testing.perturb_hf_model(hf.float().eval(), scale=0.02)
    testing.save_hf_model(hf, workdir, testing.train_tiny_tokenizer(workdir))
    del hf
    model = HookedTransformer.from_pretrained_no_processing(str(workdir), dtype=dtype)
    br = TransformerBridge.boot_transformers(str(workdir), device="cpu", dtype=getattr(torch, args.dtype))
    br.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    br.eval()
    return model, br


def build_smollm2(args):
    """(model, source): the packaged SmolLM2-135M if it loads, else random weights of its shape."""
    dtype = getattr(jnp, args.dtype)
    try:
        m = HookedTransformer.from_pretrained_no_processing("smollm2-135m", dtype=dtype)
        return m, "real SmolLM2-135M-Instruct weights (packaged GGUF, dequantised), unprocessed"
    except Exception as e:  # noqa: BLE001 - fall back to the shape only
        print(f"smollm2-135m did not load ({type(e).__name__}: {e}); using random weights", file=sys.stderr)
        params = jaxlens.init_params(SMOL_CFG, jax.random.key(0), dtype=dtype)
        return HookedTransformer(SMOL_CFG, params), "random weights of SmolLM2-135M's shape"


# -- FLOPs and compiled functions ---------------------------------------------------------------------------
# The analytic counts (matmuls and attention) are the package's own (`jaxlens.patching.cost`), which
# `patching.plan_sweep` reports.
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
                  compile_prep=True) -> SweepInfo:
    """Plan the sweep (`patching.plan_sweep`, as `patching.sweep` plans it) and compile its chunk functions
    afresh (`SweepPlan.lower`): timing, XLA's cost and memory analyses; the analytic FLOPs are the plan's."""
    toks = jnp.asarray(tokens)
    plan = patching.plan_sweep(params, cfg, toks, clean_cache, metric, hook=hook, axes=axes,
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
        if reuse and sp["point"]:  # counted once: the one-position block and the loop body (trips - 1 runs)
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
class _Stop(Exception):
    pass


def tl_sweep_cells(br, corrupted, clean_cache, n_cells: int):
    """Run TL's get_act_patch_attn_head_out_by_pos until n_cells cells are done: (values, wall s, CPU s)."""
    import torch
    from transformer_lens import patching as tlp

    vals = []

    def tl_metric(logits):
        v = (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()
        vals.append(float(v.detach()))
        if len(vals) >= n_cells:
            raise _Stop
        return v

    toks = torch.as_tensor(corrupted, dtype=torch.long)

    def go():
        try:
            with torch.no_grad():
                tlp.get_act_patch_attn_head_out_by_pos(br, toks, clean_cache, tl_metric)
        except _Stop:
            pass

    _, w, c = timed(go)
    if len(vals) != n_cells:
        raise RuntimeError(f"TL ran {len(vals)} cells, expected {n_cells}")
    return np.asarray(vals), w, c


# -- the benchmark -------------------------------------------------------------------------------------------
def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    dev = jax.devices()[0]
    return dict(nproc=os.cpu_count(), cpu=model, backend=jax.default_backend(), device=str(dev.device_kind),
                n_devices=jax.device_count(), jax=jax.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                load_average_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


def sweep_thunk(model, corrupted, cache, **kw):
    def run():
        return np.asarray(patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric,
                                                                      progress=False, **kw))
    return run


def bench_gpt2(args, R: dict, log):
    on_gpu = jax.default_backend() != "cpu"
    dtype = getattr(jnp, args.dtype)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        model, br = build_gpt2(args, Path(d))
        log(f"GPT-2-small models built in {time.perf_counter() - t0:.1f} s")
    cfg = model.cfg
    clean, corrupted = prompts(cfg.d_vocab)
    _, cache = model.run_with_cache(clean)
    n_cells = cfg.n_layers * N_POS * cfg.n_heads
    R["gpt2"] = g = dict(cells=n_cells, tokens=N_POS, layers=cfg.n_layers, heads=cfg.n_heads)

    if br is not None:  # same model in both?
        import torch

        with torch.no_grad():
            tl_logits = br(torch.as_tensor(clean, dtype=torch.long)).float().numpy()
            _, tl_cache = br.run_with_cache(torch.as_tensor(clean, dtype=torch.long))
        err = float(np.abs(np.asarray(model(clean), np.float32) - tl_logits).max())
        g["logits_max_abs_diff_vs_tl"] = err
        log(f"|jaxlens - TL| clean logits: {err:.2e}")
        assert err < (1e-3 if args.dtype == "float32" else 0.5), "TL and jaxlens do not run the same model"

    # compile + first run (cold), then the plan and compiled functions afresh
    exact = sweep_thunk(model, corrupted, cache)
    grid, w_cold, _ = timed(exact)
    info = analyse_sweep(model.params, cfg, corrupted, cache, "attn.hook_z", ("layer", "pos", "head"))
    g["cold_first_call_s"] = w_cold
    g["plan"] = dict(windows=windows(info), chunk_sizes=chunk_sizes(info), n_chunks=info.plan.n_chunks,
                     computed=info.plan.counts[CellStatus.COMPUTED], noop=info.plan.counts[CellStatus.NO_OP],
                     summary=str(info.plan))
    g["chunk_functions"] = list(info.specs.values())
    g["compile_s"], g["compile_cpu_s"] = compile_totals(info)
    log(f"plan {g['plan']}; compile {g['compile_s']:.2f} s (CPU {g['compile_cpu_s']:.2f} s); "
        f"cold call {w_cold:.1f} s")

    # naive form (prefix_reuse=False): FLOPs, and its time
    info_naive = analyse_sweep(model.params, cfg, corrupted, cache, "attn.hook_z", ("layer", "pos", "head"),
                               reuse=False, compile_prep=False)
    g["flops"] = dict(
        naive_full_forward_per_cell_xla=info.naive_flops_xla,
        naive_full_forward_per_cell_analytic=info.naive_flops_analytic,
        reuse_xla=info.flops_xla, reuse_analytic=info.flops_analytic,
        no_reuse_xla=info_naive.flops_xla, no_reuse_analytic=info_naive.flops_analytic,
        block_16_pos_xla=info.block_xla, block_16_pos_analytic=info.block_analytic)
    g["flops"]["ratio_reuse_vs_naive_xla"] = info.flops_xla / info.naive_flops_xla
    g["flops"]["ratio_reuse_vs_naive_analytic"] = info.flops_analytic / info.naive_flops_analytic
    g["flops"]["ratio_no_reuse_vs_naive_xla"] = info_naive.flops_xla / info.naive_flops_xla
    g["flops"]["ratio_no_reuse_vs_naive_analytic"] = info_naive.flops_analytic / info.naive_flops_analytic
    log(f"FLOPs: {json.dumps(g['flops'], indent=None)}")

    # memory: the default budget and a small one
    budget = default_budget(jax.local_devices()[0])
    small = 64 * 2**20
    info_small = analyse_sweep(model.params, cfg, corrupted, cache, "attn.hook_z", ("layer", "pos", "head"),
                               budget=small, compile_prep=False)
    g["memory"] = dict(
        default_budget_bytes=budget, default_chunk_sizes=chunk_sizes(info),
        default_temp_bytes=[s["temp_bytes"] for s in info.specs.values()],
        small_budget_bytes=small, small_chunk_sizes=chunk_sizes(info_small),
        small_temp_bytes=[s["temp_bytes"] for s in info_small.specs.values()],
        argument_bytes=max(s["arg_bytes"] for s in info.specs.values()))
    log(f"memory {g['memory']}")

    # interleaved rounds: matmul peak, exact sweep (and TL's first cells)
    mm_n = args.matmul_n or (8192 if on_gpu else 2048)
    mm, mm_flops = matmul_fn(mm_n, dtype)
    sweep_w, sweep_c, mm_w, mm_c, tl_w, tl_c = [], [], [], [], [], []
    tl_vals = None
    tl_n = args.tl_cells
    if br is not None:
        tl_sweep_cells(br, corrupted, tl_cache, 4)  # warm-up (first-call overheads), not timed
    for r in range(args.repeats):
        a, b = matmul_round(mm, mm_flops)
        mm_w.append(a)
        mm_c.append(b)
        out, w, c = timed(exact)
        assert np.array_equal(out, grid)
        sweep_w.append(w)
        sweep_c.append(c)
        if br is not None and r < args.tl_rounds:
            tl_vals, w, c = tl_sweep_cells(br, corrupted, tl_cache, tl_n)
            tl_w.append(w / tl_n)
            tl_c.append(c / tl_n)
        tl_msg = f", TL {tl_w[-1] * 1e3:.1f} ms/cell" if br is not None and r < args.tl_rounds else ""
        log(f"round {r}: sweep {sweep_w[-1]:.2f} s, matmul {a / 1e9:.1f} GFLOP/s{tl_msg}")
    g["exact_sweep"] = dict(wall_s=med(sweep_w), cpu_s=med(sweep_c), wall_all=sweep_w, cpu_all=sweep_c,
                            wall_per_cell_ms=1e3 * med(sweep_w) / n_cells,
                            compile_overhead_cold_minus_warm_s=w_cold - med(sweep_w))
    mm_rate = med(mm_w)
    rates = [info.flops_xla / w / m for w, m in zip(sweep_w, mm_w, strict=True)]
    rates_cpu = [info.flops_xla / c / m for c, m in zip(sweep_c, mm_c, strict=True)]
    g["rate"] = dict(matmul_n=mm_n, matmul_flops_per_s=mm_rate, matmul_flops_per_cpu_s=med(mm_c),
                     sweep_flops_per_s=info.flops_xla / med(sweep_w),
                     fraction_of_matmul=med(rates), fraction_of_matmul_cpu_time=med(rates_cpu))
    log(f"rate {g['rate']}")

    # naive form (every cell costs the same): timed on the first layers' cells, extrapolated to the grid
    nl = min(args.naive_layers, cfg.n_layers)
    naive = sweep_thunk(model, corrupted, cache, prefix_reuse=False, layers=tuple(range(nl)))
    grid_naive, w_nc, _ = timed(naive)
    nw, nc = [], []
    for _ in range(args.naive_repeats):
        _, w, c = timed(naive)
        nw.append(w * cfg.n_layers / nl)
        nc.append(c * cfg.n_layers / nl)
    tol = 1e-4 if args.dtype == "float32" else 0.25
    g["no_reuse_sweep"] = dict(wall_s=med(nw), cpu_s=med(nc), cold_s=w_nc, layers_timed=nl,
                               max_abs_diff_vs_reuse=float(np.abs(grid_naive[:nl] - grid[:nl]).max()))
    assert g["no_reuse_sweep"]["max_abs_diff_vs_reuse"] < tol, g["no_reuse_sweep"]
    g["rate"]["no_reuse_sweep_flops_per_s"] = info_naive.flops_xla / med(nw)
    log(f"no reuse: {g['no_reuse_sweep']}")

    # attribution patching
    def attr():
        return np.asarray(patching.attribution_patch(model, corrupted, cache, metric, "attn_head_out_by_pos"))

    est, w_ac, _ = timed(attr)
    aw, ac = [], []
    for _ in range(max(3, args.repeats)):
        _, w, c = timed(attr)
        aw.append(w)
        ac.append(c)
    rep = patching.compare(est, grid)
    g["attribution"] = dict(wall_s=med(aw), cpu_s=med(ac), cold_s=w_ac,
                            correlation_with_exact=rep.correlation,
                            max_abs_error=rep.max_abs_error, speedup_vs_jaxlens_exact=med(sweep_w) / med(aw))

    if tl_w:
        flat = grid.reshape(-1)[:tl_n]
        tl_cell_w, tl_cell_c = med(tl_w), med(tl_c)
        g["tl"] = dict(cells_timed=tl_n, rounds=len(tl_w), wall_per_cell_ms=1e3 * tl_cell_w,
                       cpu_per_cell_ms=1e3 * tl_cell_c, extrapolated_full_grid_wall_s=tl_cell_w * n_cells,
                       extrapolated_full_grid_cpu_s=tl_cell_c * n_cells,
                       max_abs_diff_vs_jaxlens=float(np.abs(tl_vals - flat).max()),
                       speedup_wall=tl_cell_w * n_cells / med(sweep_w),
                       speedup_cpu=tl_cell_c * n_cells / med(sweep_c),
                       attribution_speedup_wall=tl_cell_w * n_cells / med(aw),
                       attribution_speedup_cpu=tl_cell_c * n_cells / med(ac),
                       no_reuse_speedup_wall=tl_cell_w * n_cells / med(nw))
        log(f"TL: {g['tl']}")
    return model


def bench_compile_depth(args, R: dict, log):
    """Fresh compile of the sweep's functions at 12 and 30 layers (GPT-2-small widths, random weights)."""
    dtype = getattr(jnp, args.dtype)
    out = {}
    for L in (12, 30):
        cfg = GPT2_CFG.replace(n_layers=L)
        params = jaxlens.init_params(cfg, jax.random.key(0), dtype=dtype)
        clean, corrupted = prompts(cfg.d_vocab)
        _, cache = HookedTransformer(cfg, params).run_with_cache(clean)
        info = analyse_sweep(params, cfg, corrupted, cache, "attn.hook_z", ("layer", "pos", "head"))
        total, total_cpu = compile_totals(info)
        out[L] = dict(total_s=total, total_cpu_s=total_cpu, corrupted_forward_s=info.prep_compile_s,
                      chunk_functions_s=[s["lower_s"] + s["compile_s"] for s in info.specs.values()],
                      windows=windows(info))
        log(f"compile at {L} layers: {out[L]}")
        del params, cache
    R["compile"] = dict(layers_12=out[12], layers_30=out[30],
                        ratio_30_vs_12=out[30]["total_s"] / out[12]["total_s"],
                        ratio_30_vs_12_cpu=out[30]["total_cpu_s"] / out[12]["total_cpu_s"])


def bench_smollm2(args, R: dict, log):
    model, source = build_smollm2(args)
    cfg = model.cfg
    clean, corrupted = prompts(cfg.d_vocab, seed=1)
    _, cache = model.run_with_cache(clean)
    exact = sweep_thunk(model, corrupted, cache)
    grid, w_cold, _ = timed(exact)
    info = analyse_sweep(model.params, cfg, corrupted, cache, "attn.hook_z", ("layer", "pos", "head"))
    ws, cs = [], []
    for _ in range(args.smol_repeats):
        out, w, c = timed(exact)
        ws.append(w)
        cs.append(c)
    n_cells = cfg.n_layers * N_POS * cfg.n_heads
    R["smollm2"] = dict(source=source, cells=n_cells, layers=cfg.n_layers, heads=cfg.n_heads,
                        kv_heads=cfg.n_key_value_heads, d_model=cfg.d_model, wall_s=med(ws), cpu_s=med(cs),
                        wall_per_cell_ms=1e3 * med(ws) / n_cells, cold_first_call_s=w_cold,
                        compile_s=compile_totals(info)[0], compile_cpu_s=compile_totals(info)[1],
                        windows=windows(info), chunk_sizes=chunk_sizes(info),
                        flops_reuse_xla=info.flops_xla, flops_naive_xla=info.naive_flops_xla,
                        ratio_reuse_vs_naive_xla=info.flops_xla / info.naive_flops_xla,
                        ratio_reuse_vs_naive_analytic=info.flops_analytic / info.naive_flops_analytic,
                        sweep_flops_per_s=info.flops_xla / med(ws))
    log(f"SmolLM2: {R['smollm2']}")


# -- report --------------------------------------------------------------------------------------------------
def fmt_s(x):
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def render(R: dict, cmd: str) -> str:
    m, g = R["machine"], R["gpt2"]
    ex, fl, rt, mem = g["exact_sweep"], g["flops"], g["rate"], g["memory"]
    tl, at, nr = g.get("tl"), g["attribution"], g["no_reuse_sweep"]
    lines = [
        f"### Activation patching, head x position ({R['dtype']}, {R['device_kind']}, {m['date']})",
        "",
        f"- Command: `{cmd}`",
        f"- Machine: {m['nproc']} x {m['cpu']}; JAX backend {m['backend']} ({m['device']}, {m['n_devices']} "
        f"device(s)); jax {m['jax']}; load average {m['load_average_start']:.1f} at start"
        + (f"; transformer-lens {R['versions'].get('transformer-lens')}, torch {R['versions'].get('torch')} "
           f"({R['threads']} threads)" if tl else ""),
        f"- GPT-2-small shape, random weights, batch 1, {g['tokens']} tokens, {g['cells']} cells "
        f"(`get_act_patch_attn_head_out_by_pos`, metric: logit difference at the last position); clean and "
        f"corrupted differ at positions 1 and 9 ({g['plan']['noop']} cells found to be no-ops and skipped; "
        "TL computes every cell). Times: median of "
        f"{len(ex['wall_all'])} warm runs; ratios from the same run.",
        "",
        "| quantity | value | target |",
        "|---|---:|---:|",
    ]
    row = lambda a, b, c="": lines.append(f"| {a} | {b} | {c} |")  # noqa: E731
    row("jaxlens exact sweep, wall (per cell)", f"{fmt_s(ex['wall_s'])} ({ex['wall_per_cell_ms']:.2f} ms)")
    row("jaxlens exact sweep, process CPU time", fmt_s(ex["cpu_s"]))
    if tl:
        row(f"TransformerLens 4.3, per cell (first {tl['cells_timed']} cells, median of {tl['rounds']} "
            "rounds)",
            f"{tl['wall_per_cell_ms']:.1f} ms wall, {tl['cpu_per_cell_ms']:.1f} ms CPU")
        row("TransformerLens, whole grid (extrapolated per cell)",
            f"{fmt_s(tl['extrapolated_full_grid_wall_s'])} wall")
        row("**speedup vs TransformerLens** (wall; CPU time)",
            f"**{tl['speedup_wall']:.1f}x**; {tl['speedup_cpu']:.1f}x", ">= 20x")
        row("max abs diff jaxlens vs TL on the cells TL ran", f"{tl['max_abs_diff_vs_jaxlens']:.1e}")
    row("FLOPs: naive sweep (one full forward per cell), XLA / analytic",
        f"{fl['naive_full_forward_per_cell_xla'] / 1e12:.2f} / "
        f"{fl['naive_full_forward_per_cell_analytic'] / 1e12:.2f} TFLOP")
    row("FLOPs: jaxlens sweep, XLA / analytic",
        f"{fl['reuse_xla'] / 1e12:.3f} / {fl['reuse_analytic'] / 1e12:.3f} TFLOP")
    row("**FLOPs jaxlens / naive** (XLA; analytic)",
        f"**{100 * fl['ratio_reuse_vs_naive_xla']:.1f}%**; {100 * fl['ratio_reuse_vs_naive_analytic']:.1f}%",
        "<= 35%")
    row("FLOPs with `prefix_reuse=False` / naive (XLA; analytic)",
        f"{100 * fl['ratio_no_reuse_vs_naive_xla']:.1f}%; "
        f"{100 * fl['ratio_no_reuse_vs_naive_analytic']:.1f}%")
    row(f"`prefix_reuse=False` sweep, wall (first {nr['layers_timed']} layers' cells, extrapolated); "
        "CPU ratio", f"{fmt_s(nr['wall_s'])} ({nr['wall_s'] / ex['wall_s']:.2f}x the reuse sweep); "
        f"{nr['cpu_s'] / ex['cpu_s']:.2f}x")
    row(f"plain {rt['matmul_n']}^3 matmul rate (median of rounds)",
        f"{rt['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    row("jaxlens sweep rate (XLA FLOPs / wall)", f"{rt['sweep_flops_per_s'] / 1e9:.1f} GFLOP/s")
    row("**sweep rate / matmul rate** (per round, wall; CPU time)",
        f"**{100 * rt['fraction_of_matmul']:.0f}%**; {100 * rt['fraction_of_matmul_cpu_time']:.0f}%",
        ">= 70%")
    c = R.get("compile")
    if c:
        n_fn = len(c["layers_12"]["chunk_functions_s"])
        row(f"**compile**, 12 layers (corrupted forward + {n_fn} chunk functions), wall; CPU",
            f"**{c['layers_12']['total_s']:.2f} s**; {c['layers_12']['total_cpu_s']:.2f} s", "<= 5 s")
        row("**compile**, 30 layers, wall; CPU (ratio to 12 layers, wall; CPU)",
            f"**{c['layers_30']['total_s']:.2f} s**; {c['layers_30']['total_cpu_s']:.2f} s "
            f"(**{c['ratio_30_vs_12']:.2f}x**; {c['ratio_30_vs_12_cpu']:.2f}x)", "<= 1.3x")
    row("first call minus warm call (compile + tracing, 12 layers)",
        f"{ex['compile_overhead_cold_minus_warm_s']:.1f} s")
    row("windows (positions computed) / chunk sizes",
        f"{g['plan']['windows']} / {mem['default_chunk_sizes']}")
    row("memory budget (default) -> compiled temp per chunk function",
        f"{mem['default_budget_bytes'] / 2**20:.0f} MiB -> max "
        f"{max(mem['default_temp_bytes']) / 2**20:.0f} MiB")
    row("memory budget 64 MiB -> chunk sizes, compiled temp",
        f"{mem['small_chunk_sizes']}, max {max(mem['small_temp_bytes']) / 2**20:.0f} MiB")
    row("weights + cached activations (arguments)", f"{mem['argument_bytes'] / 2**20:.0f} MiB")
    row("peak RSS of the whole process", f"{R['peak_rss_bytes'] / 2**30:.2f} GiB")
    row("attribution patching (whole grid), wall", f"{1e3 * at['wall_s']:.0f} ms")
    if tl:
        row("**attribution vs TL exact sweep** (wall; CPU)",
            f"**{tl['attribution_speedup_wall']:.0f}x**; {tl['attribution_speedup_cpu']:.0f}x", ">= 200x")
    row("attribution vs jaxlens exact sweep; correlation with exact",
        f"{at['speedup_vs_jaxlens_exact']:.0f}x; {at['correlation_with_exact']:.3f}")
    s = R.get("smollm2")
    if s:
        row(f"SmolLM2-135M shape ({s['layers']}x{s['heads']} heads, {s['kv_heads']} kv), {s['cells']} cells, "
            "wall",
            f"{fmt_s(s['wall_s'])} ({s['wall_per_cell_ms']:.2f} ms/cell)")
        row("SmolLM2: FLOPs / naive (XLA; analytic); compile; rate",
            f"{100 * s['ratio_reuse_vs_naive_xla']:.1f}%; {100 * s['ratio_reuse_vs_naive_analytic']:.1f}%; "
            f"{s['compile_s']:.2f} s; {s['sweep_flops_per_s'] / 1e9:.1f} GFLOP/s")
    lines += ["", "Notes: " + " ".join(R["notes"])]
    return "\n".join(lines) + "\n"


NOTES = [
    "XLA's cost analysis counts the body of the layer loop once, so the sweep's XLA FLOPs are each chunk "
    "function's count times the layers it runs (and for the naive reference: one compiled forward plus "
    "n_layers - 1 compiled blocks); the analytic count is matmuls plus attention (QK and AV over all 16 "
    "keys).",
    "TransformerLens was timed on its own function, under torch.no_grad(), stopping after the first cells "
    "(layer 0, all positions and heads from the start) by a metric that raises; its per-cell time is the "
    "same "
    "for every cell (each is a full forward), so the grid time is that times the number of cells.",
    "The machine may be shared: wall ratios use timings interleaved in the same run; CPU-time ratios count "
    "the process's CPU seconds (all threads).",
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device-kind", default=None, help="label for the machine (default: cpu or the backend)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--skip-tl", action="store_true",
                    help="no TransformerLens/torch (random jaxlens weights)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and TL cells; no SmolLM2 repeats")
    ap.add_argument("--repeats", type=int, default=None,
                    help="warm runs of the exact sweep (default 3, quick 1)")
    ap.add_argument("--tl-cells", type=int, default=None, help="TL cells per round (default 96, quick 12)")
    ap.add_argument("--tl-rounds", type=int, default=None, help="TL rounds (default 3, quick 1)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="warm runs of the prefix_reuse=False sweep")
    ap.add_argument("--naive-layers", type=int, default=2, help="layers timed with prefix_reuse=False")
    ap.add_argument("--smol-repeats", type=int, default=None,
                    help="warm runs of the SmolLM2 sweep (default 2)")
    ap.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 2048 CPU, 8192 GPU)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for TransformerLens")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--layers", type=int, default=12, help="GPT-2 depth (12; fewer only for a smoke test)")
    ap.add_argument("--skip-compile-depth", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/patching_<kind>.json)")
    args = ap.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 3)
    args.tl_cells = args.tl_cells or (12 if q else 96)
    args.tl_rounds = args.tl_rounds or (1 if q else 3)
    args.smol_repeats = args.smol_repeats or (1 if q else 2)
    kind = args.device_kind or ("cpu" if jax.default_backend() == "cpu" else jax.default_backend())
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    out = args.out or ROOT / "benchmarks" / "results" / f"patching_{kind}{suffix}{'_quick' if q else ''}.json"
    cmd = "python benchmarks/bench_patching.py " + " ".join(sys.argv[1:] if argv is None else argv)

    t_start = time.perf_counter()
    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    R = dict(command=cmd.strip(), device_kind=kind, dtype=args.dtype, machine=machine(), threads=args.threads,
             versions={"jax": jax.__version__}, notes=NOTES)
    if not args.skip_tl:
        from importlib.metadata import version

        import torch
        R["versions"].update({"torch": torch.__version__, "transformer-lens": version("transformer-lens")})
    log(f"machine {R['machine']}")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        R["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        R["total_s"] = time.perf_counter() - t_start
        R["markdown"] = render(R, R["command"])
        out.write_text(json.dumps(R, indent=1, default=float) + "\n")

    bench_gpt2(args, R, log)
    save()
    for skip, stage, fn in ((args.skip_compile_depth, "compile", bench_compile_depth),
                            (args.skip_smollm2, "smollm2", bench_smollm2)):
        if skip:
            continue
        try:
            fn(args, R, log)
        except Exception as e:  # noqa: BLE001 - keep the stages already measured
            R[f"{stage}_error"] = f"{type(e).__name__}: {e}"
            log(f"{stage} failed: {R[f'{stage}_error']}")
        save()
    print(R["markdown"])
    log(f"wrote {out}")
    return R


if __name__ == "__main__":
    main()
