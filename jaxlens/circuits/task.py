"""`jaxlens circuit`: find a circuit for a task end to end and write DIR/circuit.json.

    jaxlens circuit --model smollm2-135m --task ioi --out DIR

On the IOI prompts of the demo (`analysis.ioi`) with the mean logit difference as the metric: EAP-IG scores
for every edge, a faithfulness curve over a geometric grid of edge budgets (one vmapped computation), and the
smallest circuit of the curve keeping at least 80% of the logit difference, refined by bisection between
grid points. circuit.json holds `edges_total`, `curve` ([[n_edges, faithfulness], ...]), `circuit_80`
({n_edges, edges, heads}), and the settings.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxlens import _atomic
from jaxlens.circuits.attribute import attribute_edges
from jaxlens.circuits.faithfulness import faithfulness
from jaxlens.errors import InputError

TASKS = ("ioi",)


@dataclasses.dataclass(frozen=True)
class CircuitSettings:
    """Settings of `find_circuit`.

    Attributes:
        task: "ioi".
        n_prompts: prompt pairs.
        method: the attribution method (`attribute_edges`).
        steps: integrated-gradient steps.
        level: the faithfulness the reported circuit must reach.
        chunk_size: circuits per compiled call (None: chosen from a memory budget).
    """

    task: str = "ioi"
    n_prompts: int = 8
    method: str = "eap-ig"
    steps: int = 5
    level: float = 0.8
    chunk_size: int | None = None


def budgets(n_edges: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below n_edges, then n_edges."""
    out, k = [], 0
    while True:
        n = (1, 2, 5)[k % 3] * 10 ** (k // 3)
        if n >= n_edges:
            return out + [n_edges]
        out.append(n)
        k += 1


def find_circuit(model, settings: CircuitSettings = CircuitSettings()) -> dict:
    """Scores, faithfulness curve and the smallest circuit reaching `settings.level`, as circuit.json's dict.

    Raises:
        InputError: an unknown task, or a model whose tokenizer cannot build the task's prompts.
    """
    if settings.task not in TASKS:
        raise InputError(f"Unknown task {settings.task!r}; choose one of {', '.join(TASKS)}.")
    from jaxlens.analysis.ioi import ioi_prompts
    from jaxlens.analysis.metrics import logit_diff_metric

    p = ioi_prompts(model, settings.n_prompts)
    metric = logit_diff_metric(p.answer_ids, p.wrong_ids)
    clean, corrupted = p.clean_tokens, p.corrupted_tokens
    graph = attribute_edges(model, clean, corrupted, metric, method=settings.method, steps=settings.steps)
    grid = budgets(graph.n_edges)
    curve = faithfulness(model, graph, clean, corrupted, metric, n_edges=grid, complement=False,
                         chunk_size=settings.chunk_size)
    best = _refine(model, graph, clean, corrupted, metric, curve, settings)
    result = {
        "model": getattr(model.cfg, "model_name", None), "task": settings.task,
        "settings": dataclasses.asdict(settings), "edges_total": graph.n_edges,
        "clean_metric": curve.clean_metric, "corrupted_metric": curve.corrupted_metric,
        "curve": curve.as_list(), "requested_n_edges": [int(n) for n in curve.n_edges],
    }
    if best is None:
        result["circuit_80"] = None
    else:
        n, f, circuit = best
        result["circuit_80"] = {"n_edges": n, "faithfulness": f, "edges": circuit.edge_names(in_graph=True),
                                "heads": [f"L{l}H{h}" for l, h in circuit.heads()]}
    return result


def write_circuit(model, out: str | Path, settings: CircuitSettings = CircuitSettings()) -> Path:
    """`find_circuit` written atomically to out/circuit.json; returns the file's path."""
    result = find_circuit(model, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return _atomic.write_text(out / "circuit.json", json.dumps(result, indent=1))


def _refine(model, graph, clean, corrupted, metric, curve, settings):
    """(edges kept, faithfulness, circuit) of the smallest top-n circuit reaching the level, bisecting the
    budget between the last grid point below it and the first above (each round one batch of circuits)."""
    hit = np.nonzero(curve.faithfulness >= settings.level)[0]
    if not len(hit):
        return None
    i = int(hit[0])
    hi = int(curve.n_edges[i])
    lo = int(curve.n_edges[i - 1]) if i > 0 else 0
    best = (int(curve.n_kept[i]), float(curve.faithfulness[i]), curve.circuits[i])
    while hi - lo > 1:
        probe = sorted({int(x) for x in np.linspace(lo, hi, 10)[1:-1]} - {lo, hi})
        if not probe:
            break
        c = faithfulness(model, graph, clean, corrupted, metric, n_edges=probe, complement=False,
                         chunk_size=settings.chunk_size)
        ok = np.nonzero(c.faithfulness >= settings.level)[0]
        if len(ok):
            j = int(ok[0])
            hi = probe[j]
            best = (int(c.n_kept[j]), float(c.faithfulness[j]), c.circuits[j])
            lo = probe[j - 1] if j > 0 else lo
        else:
            lo = probe[-1]
    return best


def add_parser(sub):
    """Add the `circuit` sub-command to an argparse sub-parsers object; returns its parser."""
    d = CircuitSettings()
    p = sub.add_parser("circuit", help="find a circuit (EAP-IG edge scores, faithfulness curve) for a task",
                       description="Score every edge of the model's graph on the task's prompts, evaluate a "
                                   "faithfulness curve and write DIR/circuit.json with the smallest circuit "
                                   "keeping the requested share of the metric.")
    p.add_argument("--model", default="smollm2-135m",
                   help="packaged model name, Hugging Face folder or .gguf file (default: smollm2-135m)")
    p.add_argument("--task", default=d.task, choices=TASKS)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n-prompts", type=int, default=d.n_prompts)
    p.add_argument("--method", default=d.method, choices=["eap", "eap-ig", "eap-ig-activations", "exact"])
    p.add_argument("--steps", type=int, default=d.steps, help="integrated-gradient steps")
    p.add_argument("--level", type=float, default=d.level, help="faithfulness of the reported circuit")
    p.set_defaults(func=_run_cli, subparser=p)
    return p


def _run_cli(args) -> int:
    from jaxlens.hooked_transformer import HookedTransformer

    if args.n_prompts < 1 or args.steps < 1:
        raise InputError(f"--n-prompts and --steps must be positive; found {args.n_prompts}, {args.steps}.")
    model = HookedTransformer.from_pretrained(args.model)
    settings = CircuitSettings(args.task, args.n_prompts, args.method, args.steps, args.level)
    path = write_circuit(model, args.out, settings)
    res = json.loads(path.read_text())
    c80 = res["circuit_80"]
    summary = (f"{c80['n_edges']} of {res['edges_total']} edges keep {c80['faithfulness']:.2f} of the "
               f"metric; heads {', '.join(c80['heads'][:12])}" if c80 else
               f"no circuit of the curve reaches {settings.level}")
    print(f"{summary}\nwrote {path.resolve()}")
    return 0
