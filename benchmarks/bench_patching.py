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
  checked against jaxlens's. Also a savvy user's hand-batched TL loop (64 patches per forward through hooks,
  `_patching_tl.tl_hand_batched`) on its first --tl-batched-forwards forwards, in the same rounds.
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
- The same sweep on SmolLM2-135M (30 layers x 9 heads, 3 kv heads): on the real packaged weights (when
  `from_pretrained("smollm2-135m")` loads) with an IOI prompt pair and, beside it, TL's own sweep on the same
  weights (the Hugging Face folder `bench_graphs.hf_folder` caches); else random weights of that shape.
- Where the time goes, program by program: `profile_patching.py`.

    python benchmarks/bench_patching.py           # CPU: writes benchmarks/results/patching_cpu.json
    python benchmarks/bench_patching.py --quick --skip-tl
    python benchmarks/bench_patching.py --skip-tl --device-kind h100 --dtype bfloat16   # on a GPU
"""

import argparse
import datetime
import json
import os
import platform
import resource
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
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _patching_report import NOTES, render  # noqa: E402
from _patching_tl import smollm2_bridge, tl_hand_batched, tl_sweep_cells  # noqa: E402
from _sweep_analysis import (  # noqa: E402
    ANSWER,
    WRONG,
    analyse_sweep,
    chunk_sizes,
    compile_totals,
    matmul_fn,
    matmul_round,
    med,
    metric,
    timed,
    windows,
)

import jaxlens  # noqa: E402
from jaxlens import HookedTransformer, patching  # noqa: E402
from jaxlens.patching import CellStatus  # noqa: E402
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
def prompts(d_vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clean and corrupted token ids [1, 16]: random, differing at positions 1 and 9 (two swapped names), so
    only the cells at position 0 are no-ops for a causal patch."""
    rng = np.random.RandomState(seed)
    clean = rng.randint(1, d_vocab, (1, N_POS)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[0, 1], corrupted[0, 9] = clean[0, 9], clean[0, 1]
    corrupted[0, 1] = corrupted[0, 1] if corrupted[0, 1] != clean[0, 1] else (clean[0, 1] % (d_vocab - 1)) + 1
    return clean, corrupted


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
# -- the benchmark -------------------------------------------------------------------------------------------
def machine() -> dict:
    dev = jax.devices()[0]
    return dict(nproc=os.cpu_count(), cpu=cpu_model(), backend=jax.default_backend(),
                device=str(dev.device_kind),
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
    sweep_w, sweep_c, mm_w, mm_c, tl_w, tl_c, hb_w, hb_c = [], [], [], [], [], [], [], []
    tl_vals = hb_vals = None
    tl_n = args.tl_cells
    if br is not None:
        tl_sweep_cells(br, corrupted, tl_cache, 4)  # warm-up (first-call overheads), not timed
        tl_hand_batched(br, corrupted, tl_cache, 1)
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
            hb_vals, w, c = tl_hand_batched(br, corrupted, tl_cache, args.tl_batched_forwards)
            hb_w.append(w / len(hb_vals))
            hb_c.append(c / len(hb_vals))
        tl_msg = (f", TL {tl_w[-1] * 1e3:.1f} ms/cell, hand-batched TL {hb_w[-1] * 1e3:.1f} ms/cell"
                  if br is not None and r < args.tl_rounds else "")
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
        hb = grid.reshape(-1)[:len(hb_vals)]
        g["tl_hand_batched"] = dict(batch=64, forwards_timed=args.tl_batched_forwards, rounds=len(hb_w),
                                    wall_per_cell_ms=1e3 * med(hb_w), cpu_per_cell_ms=1e3 * med(hb_c),
                                    max_abs_diff_vs_jaxlens=float(np.abs(hb_vals - hb).max()),
                                    speedup_wall=med(hb_w) * n_cells / med(sweep_w),
                                    speedup_cpu=med(hb_c) * n_cells / med(sweep_c))
        log(f"TL hand-batched: {g['tl_hand_batched']}")
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
    """The head x position sweep on SmolLM2-135M: an IOI prompt pair on the real weights (and, with TL, TL's
    own sweep on the same weights in the same run), else random prompts on random weights of its shape."""
    model, source = build_smollm2(args)
    cfg = model.cfg
    real = source.startswith("real")
    if real:
        from jaxlens.analysis.ioi import ioi_prompts

        ioi = ioi_prompts(model, 1)
        clean, corrupted = np.asarray(ioi.clean_tokens), np.asarray(ioi.corrupted_tokens)
        a, b = int(ioi.answer_ids[0]), int(ioi.wrong_ids[0])
        prompt = f"IOI pair: {ioi.clean[0]!r} / {ioi.corrupted[0]!r}, metric logit({ioi.answers[0]!r}) - " \
                 f"logit({ioi.wrong[0]!r}) at the last position"
    else:
        (clean, corrupted), (a, b) = prompts(cfg.d_vocab, seed=1), (ANSWER, WRONG)
        prompt = "random prompts differing at positions 1 and 9, metric logit difference of two ids"

    def ioi_metric(logits):
        return (logits[:, -1, a] - logits[:, -1, b]).mean()

    _, cache = model.run_with_cache(clean)

    def exact():
        return np.asarray(patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, ioi_metric,
                                                                      progress=False))
    grid, w_cold, _ = timed(exact)
    info = analyse_sweep(model.params, cfg, corrupted, cache, "attn.hook_z", ("layer", "pos", "head"),
                         metric_fn=ioi_metric)
    br = None
    if real and not args.skip_tl:
        br, where = smollm2_bridge(args.threads)
        if br is None:
            log(f"SmolLM2 TL baseline skipped: {where}")
        else:
            import torch

            with torch.no_grad():
                _, tl_cache = br.run_with_cache(torch.as_tensor(clean, dtype=torch.long))
            tl_sweep_cells(br, corrupted, tl_cache, 2, a, b)  # warm-up
    ws, cs, tw, tc = [], [], [], []
    tl_vals = None
    for _ in range(args.smol_repeats):
        out, w, c = timed(exact)
        ws.append(w)
        cs.append(c)
        if br is not None:
            tl_vals, w, c = tl_sweep_cells(br, corrupted, tl_cache, args.smol_tl_cells, a, b)
            tw.append(w / args.smol_tl_cells)
            tc.append(c / args.smol_tl_cells)
    n_cells = int(np.prod(grid.shape))
    R["smollm2"] = dict(source=source, prompt=prompt, tokens=int(clean.shape[1]), cells=n_cells,
                        layers=cfg.n_layers, heads=cfg.n_heads, kv_heads=cfg.n_key_value_heads,
                        d_model=cfg.d_model, wall_s=med(ws), cpu_s=med(cs),
                        wall_per_cell_ms=1e3 * med(ws) / n_cells, cold_first_call_s=w_cold,
                        compile_s=compile_totals(info)[0], compile_cpu_s=compile_totals(info)[1],
                        windows=windows(info), chunk_sizes=chunk_sizes(info),
                        flops_reuse_xla=info.flops_xla, flops_naive_xla=info.naive_flops_xla,
                        ratio_reuse_vs_naive_xla=info.flops_xla / info.naive_flops_xla,
                        ratio_reuse_vs_naive_analytic=info.flops_analytic / info.naive_flops_analytic,
                        sweep_flops_per_s=info.flops_xla / med(ws))
    if tw:
        R["smollm2"]["tl"] = dict(cells_timed=args.smol_tl_cells, rounds=len(tw), hf_folder=where,
                                  wall_per_cell_ms=1e3 * med(tw), cpu_per_cell_ms=1e3 * med(tc),
                                  max_abs_diff_vs_jaxlens=float(np.abs(tl_vals - grid.reshape(-1)[
                                      :len(tl_vals)]).max()),
                                  speedup_wall=med(tw) * n_cells / med(ws),
                                  speedup_cpu=med(tc) * n_cells / med(cs))
    log(f"SmolLM2: {R['smollm2']}")


# -- report --------------------------------------------------------------------------------------------------
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
    ap.add_argument("--tl-batched-forwards", type=int, default=3,
                    help="forwards of 64 patches timed per round of the hand-batched TL loop")
    ap.add_argument("--smol-tl-cells", type=int, default=None,
                    help="TL cells per round on the real SmolLM2 (default 27, quick 9)")
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
    args.smol_tl_cells = args.smol_tl_cells or (9 if q else 27)
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
