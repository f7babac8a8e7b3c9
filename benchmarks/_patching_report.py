"""The Markdown report of `bench_patching.py` (its results dict rendered as BENCHMARKS.md tables)."""


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
            f"**{tl['speedup_wall']:.1f}x**; {tl['speedup_cpu']:.1f}x", ">= 30x")
        row("max abs diff jaxlens vs TL on the cells TL ran", f"{tl['max_abs_diff_vs_jaxlens']:.1e}")
    hb = g.get("tl_hand_batched")
    if hb:
        row(f"hand-batched TL loop ({hb['batch']} patches per forward through hooks; first "
            f"{hb['forwards_timed']} forwards, median of {hb['rounds']} rounds), per cell",
            f"{hb['wall_per_cell_ms']:.1f} ms wall, {hb['cpu_per_cell_ms']:.1f} ms CPU")
        row("**speedup vs the hand-batched TL loop** (wall; CPU time); max abs diff",
            f"**{hb['speedup_wall']:.1f}x**; {hb['speedup_cpu']:.1f}x; {hb['max_abs_diff_vs_jaxlens']:.1e}",
            ">= 8x")
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
        row("compile by program, 12 layers (corrupted forward; chunk functions by window), wall",
            f"{c['layers_12']['corrupted_forward_s']:.2f} s; " + ", ".join(
                f"{w}: {t:.2f} s" for w, t in zip(c["layers_12"]["windows"],
                                                  c["layers_12"]["chunk_functions_s"], strict=True)))
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
        st = s.get("tl")
        if st:
            row(f"SmolLM2 ({s.get('tokens')} tokens, IOI pair): TransformerLens per cell "
                f"(first {st['cells_timed']} cells)", f"{st['wall_per_cell_ms']:.1f} ms wall, "
                f"{st['cpu_per_cell_ms']:.1f} ms CPU; max abs diff {st['max_abs_diff_vs_jaxlens']:.1e}")
            row("**SmolLM2 speedup vs TransformerLens** (wall; CPU time)",
                f"**{st['speedup_wall']:.0f}x**; {st['speedup_cpu']:.0f}x", ">= 100x")
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
