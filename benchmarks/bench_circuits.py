"""Circuit discovery on the real SmolLM2-135M (IOI prompts of the demo): jaxlens timings and memory.

Measured, each after a first call that compiles (its time reported separately):

- EAP-IG (5 steps) over every edge of the graph on a batch of IOI prompts (`attribute_edges`);
- exact edge patching of the 1,000 edges EAP-IG ranks highest (`attribute_edges(method="exact", edges=...)`),
  per edge;
- the faithfulness curve of the top-n circuits (`faithfulness`), and the smallest circuit of the curve
  keeping 80% of the logit difference, with its heads.

    python benchmarks/bench_circuits.py                     # writes benchmarks/results/circuits.json
    python benchmarks/bench_circuits.py --prompts 4 --top 200 --out /tmp/circuits.json

Peak memory is the process's maximum resident set size (`ru_maxrss`) after each stage. The PyTorch baseline
the issue asks for (hooks per edge on TransformerLens, as hannamw/EAP-IG does it) is not part of this script
yet. Run it on an idle machine: the exact stage runs 1,000 patched forwards of the whole model.
"""

import argparse
import datetime
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="IOI prompt pairs")
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    ap.add_argument("--top", type=int, default=1000, help="edges patched exactly")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "circuits.json")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from _machine import cpu_model

    from jaxlens import HookedTransformer
    from jaxlens.analysis.ioi import ioi_prompts
    from jaxlens.analysis.metrics import logit_diff_metric
    from jaxlens.circuits import attribute_edges, faithfulness
    from jaxlens.circuits.task import budgets

    model = HookedTransformer.from_pretrained(args.model)
    p = ioi_prompts(model, args.prompts)
    metric = logit_diff_metric(p.answer_ids, p.wrong_ids)
    clean, corrupted = p.clean_tokens, p.corrupted_tokens
    res = {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load": os.getloadavg(),
                       "devices": [str(d) for d in jax.devices()]},
           "batch": list(clean.shape), "steps": args.steps}

    def ig():
        return attribute_edges(model, clean, corrupted, metric, method="eap-ig", steps=args.steps)

    graph, first = _timed(ig)
    graph, warm = _timed(ig)
    res["eap_ig"] = {"edges": graph.n_edges, "first_call_s": first, "seconds": warm,
                     "peak_rss_mib": _peak_mib()}
    print(f"EAP-IG ({args.steps} steps) over {graph.n_edges:,} edges: {warm:.2f} s "
          f"(first call {first:.1f} s)")

    top = graph.top_n(args.top, prune=False).edge_names(in_graph=True)

    def exact():
        return attribute_edges(model, clean, corrupted, metric, method="exact", edges=top, progress=True)

    ex, first = _timed(exact)
    ex, warm = _timed(exact)
    chosen = graph.edge_index(top)
    rho = float(np.corrcoef(np.argsort(np.argsort(graph.scores[chosen])),
                            np.argsort(np.argsort(ex.scores[chosen])))[0, 1])
    res["exact_top"] = {"edges": len(top), "first_call_s": first, "seconds": warm,
                        "ms_per_edge": 1e3 * warm / len(top), "spearman_vs_eap_ig": rho,
                        "peak_rss_mib": _peak_mib()}
    print(f"exact patching of {len(top)} edges: {warm:.2f} s ({1e3 * warm / len(top):.1f} ms an edge); "
          f"rank correlation with EAP-IG {rho:.3f}")

    curve, secs = _timed(lambda: faithfulness(model, graph, clean, corrupted, metric,
                                              n_edges=budgets(graph.n_edges), complement=False))
    best = curve.smallest(0.8)
    res["faithfulness"] = {"seconds": secs, "curve": curve.as_list(), "clean": curve.clean_metric,
                           "corrupted": curve.corrupted_metric,
                           "circuit_80": None if best is None else {
                               "n_edges": int(best.in_graph.sum()),
                               "heads": [f"L{l}H{h}" for l, h in best.heads()]}}
    print(f"faithfulness curve ({len(curve.n_edges)} circuits): {secs:.2f} s; " +
          ("no circuit reaches 0.8" if best is None else
           f"80% with {int(best.in_graph.sum())} edges, heads {best.heads()[:10]}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
