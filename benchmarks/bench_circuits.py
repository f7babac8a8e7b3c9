"""Circuit discovery on the real SmolLM2-135M (IOI prompts of the demo): jaxlens against a TransformerLens
4.3 baseline with hooks per node (hannamw/EAP-IG's method, `_circuits_tl_baseline.py`), same weights, same
prompts, same edges, in the same run.

Measured, jaxlens each after a first call that compiles (its time reported separately):

- EAP-IG (5 steps) over every edge of the graph on a batch of IOI prompts (`attribute_edges`), and the same
  scores from the baseline, with their agreement (Pearson and Spearman correlation, largest difference);
- exact edge patching of the 1,000 edges EAP-IG ranks highest (`attribute_edges(method="exact", edges=...)`),
  per edge; the baseline runs one patched forward per edge, on the `--tl-edges` highest-ranked of them (its
  time per edge is what it would spend on each of the 1,000: every patched forward costs the same);
- the faithfulness curve of the top-n circuits (`faithfulness`), and the smallest circuit of the curve
  keeping 80% of the logit difference, with its heads (jaxlens only; `--skip-faithfulness` leaves it out).

    python benchmarks/bench_circuits.py                     # writes benchmarks/results/circuits_vs_tl.json
    python benchmarks/bench_circuits.py --prompts 4 --top 200 --tl-edges 10 --skip-faithfulness
    python benchmarks/bench_circuits.py --skip-tl           # jaxlens only: benchmarks/results/circuits.json
    python benchmarks/bench_circuits.py --prompts 4 --top 200 --tl-edges 6 --skip-faithfulness \
        --tl-exact-only --out benchmarks/results/circuits_exact_vs_tl.json   # exact patching alone

The baseline runs in a child process of the same venv that imports neither JAX nor jaxlens, on a Hugging Face
Llama folder made once from the packaged GGUF (bench_graphs.py's `HF_FOLDER`); jaxlens loads the GGUF itself.
Memory is the resident set size sampled every 5 ms during each call (bench_graphs.py's `measured`): its peak,
and its rise above the size just before the call. Run it on an idle machine; the load average is recorded.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="IOI prompt pairs")
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    ap.add_argument("--top", type=int, default=1000, help="edges patched exactly by jaxlens")
    ap.add_argument("--tl-edges", type=int, default=20, help="the best-ranked edges the baseline patches")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the baseline")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--skip-tl", action="store_true", help="jaxlens only")
    ap.add_argument("--skip-faithfulness", action="store_true")
    ap.add_argument("--tl-exact-only", action="store_true",
                    help="the baseline patches edges only (its EAP-IG scores and ratios left out)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/circuits_vs_tl.json (circuits.json with --skip-tl)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "circuits.json" if args.skip_tl else "circuits_vs_tl.json")

    import jax
    from _machine import cpu_model

    from jaxlens import HookedTransformer, _atomic
    from jaxlens.analysis.ioi import ioi_prompts
    from jaxlens.analysis.metrics import logit_diff_metric
    from jaxlens.circuits import attribute_edges, faithfulness
    from jaxlens.circuits.task import budgets

    load0 = os.getloadavg()
    model = HookedTransformer.from_pretrained(args.model)
    p = ioi_prompts(model, args.prompts)
    metric = logit_diff_metric(p.answer_ids, p.wrong_ids)
    clean, corrupted = p.clean_tokens, p.corrupted_tokens
    res = {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load0,
                       "devices": [str(d) for d in jax.devices()]},
           "batch": list(clean.shape), "steps": args.steps}

    def ig():
        return attribute_edges(model, clean, corrupted, metric, method="eap-ig", steps=args.steps)

    first = measured(ig)[1]["seconds"]
    graph, m = measured(ig)
    res["eap_ig"] = {"edges": graph.n_edges, "first_call_s": first} | m
    print(f"EAP-IG ({args.steps} steps) over {graph.n_edges:,} edges: {m['seconds']:.2f} s "
          f"(first call {first:.1f} s), peak RSS {m['peak_rss_mib']:.0f} MiB")

    top = graph.top_n(args.top, prune=False).edge_names(in_graph=True)
    chosen = graph.edge_index(top)

    def exact():
        return attribute_edges(model, clean, corrupted, metric, method="exact", edges=top, progress=True)

    first = measured(exact)[1]["seconds"]
    ex, m = measured(exact)
    rho = rank_corr(graph.scores[chosen], ex.scores[chosen])
    res["exact_top"] = {"edges": len(top), "first_call_s": first, "spearman_vs_eap_ig": rho} | \
        per_edge(m, len(top))
    print(f"exact patching of {len(top)} edges: {m['seconds']:.2f} s "
          f"({res['exact_top']['ms_per_edge']:.1f} ms an edge); rank correlation with EAP-IG {rho:.3f}")

    if not args.skip_tl:
        tl_edges = chosen[: args.tl_edges]
        tl, scores = run_baseline(args, model, graph, p, tl_edges)
        agree = agreement(graph.scores, scores["eap_ig"], ex.scores[tl_edges], scores["exact"][tl_edges])
        res["transformer_lens"] = tl | {"agreement": agree}
        res["ratios"] = ratios(res, tl)
        print(json.dumps({"transformer_lens": res["transformer_lens"], "ratios": res["ratios"]}, indent=1))

    if not args.skip_faithfulness:
        curve, m = measured(lambda: faithfulness(model, graph, clean, corrupted, metric,
                                                 n_edges=budgets(graph.n_edges), complement=False))
        secs = m["seconds"]
        best = curve.smallest(0.8)
        res["faithfulness"] = {"seconds": secs, "curve": curve.as_list(), "clean": curve.clean_metric,
                               "corrupted": curve.corrupted_metric,
                               "circuit_80": None if best is None else {
                                   "n_edges": int(best.in_graph.sum()),
                                   "heads": [f"L{l}H{h}" for l, h in best.heads()]}}
        print(f"faithfulness curve ({len(curve.n_edges)} circuits): {secs:.2f} s; " +
              ("no circuit reaches 0.8" if best is None else
               f"80% with {int(best.in_graph.sum())} edges, heads {best.heads()[:10]}"))
    res["machine"]["load_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic.write_text(out, json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


def measured(fn) -> tuple[object, dict]:
    """(fn(), {seconds, cpu_s, peak_rss_mib, rss_before_mib}): wall and process CPU time (all threads; on a
    loaded machine the steadier of the two) and bench_graphs.py's sampled resident memory."""
    from bench_graphs import measured as sampled

    cpu = time.process_time()
    got = sampled(fn)  # (out, seconds, [cpu seconds,] peak, before)
    out, secs, peak, before = got[0], got[1], got[-2], got[-1]
    return out, {"seconds": secs, "cpu_s": time.process_time() - cpu, "peak_rss_mib": peak,
                 "rss_before_mib": before}


def per_edge(m: dict, n_edges: int) -> dict:
    """`measured`'s dict with the wall and CPU milliseconds per edge."""
    n = max(n_edges, 1)
    return m | {"ms_per_edge": 1e3 * m["seconds"] / n, "cpu_ms_per_edge": 1e3 * m["cpu_s"] / n}


def run_baseline(args, model, graph, prompts, tl_edges) -> tuple[dict, dict]:
    """The TransformerLens baseline in a child process on the same tokens and edges: (its result.json, its
    scores {"eap_ig", "exact"} as [n_edges] arrays)."""
    import numpy as np
    from bench_graphs import hf_folder

    from jaxlens import hub

    source = hub.resolve(args.model)
    hf_dir = source if source.is_dir() else hf_folder(source)
    meta = {"hf_dir": str(hf_dir), "gguf": str(source), "steps": args.steps, "threads": args.threads,
            "eap_ig": not args.tl_exact_only,
            "src_names": graph.src_names(), "dst_names": graph.dst_names()}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "meta.json").write_text(json.dumps(meta))
        np.savez(work / "inputs.npz", clean=np.asarray(prompts.clean_tokens),
                 corrupted=np.asarray(prompts.corrupted_tokens), answer_ids=np.asarray(prompts.answer_ids),
                 wrong_ids=np.asarray(prompts.wrong_ids), edge_src=graph.edge_src, edge_dst=graph.edge_dst,
                 exact_edges=np.asarray(tl_edges))
        env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_circuits_tl_baseline.py"), str(work)],
                       check=True, env=env)
        with np.load(work / "scores.npz") as z:
            scores = {k: z[k] for k in z.files}
        return json.loads((work / "result.json").read_text()), scores


def rank_corr(a, b) -> float:
    """Spearman's rank correlation of two score vectors (no ties expected)."""
    import numpy as np

    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def agreement(jl_ig, tl_ig, jl_exact, tl_exact) -> dict:
    """How closely the baseline's scores match jaxlens's: EAP-IG over every edge, exact over its edges."""
    import numpy as np

    scale = float(np.abs(jl_ig).max())
    exact = {"edges": len(jl_exact), "max_abs_diff": float(np.abs(jl_exact - tl_exact).max()),
             "max_abs_score": float(np.abs(jl_exact).max())}
    if np.isnan(tl_ig).all():  # --tl-exact-only
        return {"exact": exact}
    return {"eap_ig": {"pearson": float(np.corrcoef(jl_ig, tl_ig)[0, 1]), "spearman": rank_corr(jl_ig, tl_ig),
                       "max_abs_diff": float(np.abs(jl_ig - tl_ig).max()), "max_abs_score": scale,
                       "top_1000_overlap": int(len(np.intersect1d(np.argsort(-np.abs(jl_ig))[:1000],
                                                                  np.argsort(-np.abs(tl_ig))[:1000])))},
            "exact": exact}


def ratios(res: dict, tl: dict) -> dict:
    """Baseline / jaxlens: wall and CPU time (EAP-IG; exact per edge) and peak memory and its rise during each
    call."""
    jl_ig, jl_ex = res["eap_ig"], res["exact_top"]
    rise = lambda d: max(d["peak_rss_mib"] - d["rss_before_mib"], 1e-9)
    out = {"exact_time_per_edge": tl["exact"]["ms_per_edge"] / jl_ex["ms_per_edge"],
           "exact_cpu_time_per_edge": tl["exact"]["cpu_ms_per_edge"] / jl_ex["cpu_ms_per_edge"],
           "exact_peak_rss": tl["exact"]["peak_rss_mib"] / jl_ex["peak_rss_mib"],
           "exact_rss_rise": rise(tl["exact"]) / rise(jl_ex)}
    if tl["eap_ig"] is None:  # --tl-exact-only
        return out
    return out | {"eap_ig_time": tl["eap_ig"]["seconds"] / jl_ig["seconds"],
                  "eap_ig_cpu_time": tl["eap_ig"]["cpu_s"] / jl_ig["cpu_s"],
                  "eap_ig_peak_rss": tl["eap_ig"]["peak_rss_mib"] / jl_ig["peak_rss_mib"],
                  "eap_ig_rss_rise": rise(tl["eap_ig"]) / rise(jl_ig)}


if __name__ == "__main__":
    raise SystemExit(main())
