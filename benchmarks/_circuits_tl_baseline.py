"""The PyTorch baseline of bench_circuits.py: EAP-IG and exact edge patching on TransformerLens 4.3 with one
hook per node, the way hannamw/EAP-IG does them, on the edge set of jaxlens's `circuits.Graph`.

What is taken from hannamw/EAP-IG (src/eap/utils.py `make_hooks_and_matrices`, attribute.py
`get_scores_eap_ig` / `get_scores_exact`, evaluate.py `evaluate_graph`):

- one [batch, pos, n_src, d_model] tensor of activation differences; a forward hook at every source's output
  hook adds that output during the corrupted run and subtracts it during the clean run, so it ends up holding
  corrupted - clean;
- EAP-IG: `steps` forward and backward passes on the clean tokens whose input-node output is replaced by
  corrupted + (k / steps) (clean - corrupted), k = 0 .. steps - 1; a backward hook at every reader input
  (`hook_q_input`, `hook_k_input`, `hook_v_input` of a whole layer, `hook_mlp_in`, the last `hook_resid_post`)
  adds einsum(diff[:, :, :prev], grad) to a dense [n_src, n_dst] score matrix; the total is divided by steps;
- exact patching: for every edge, one clean forward in which the source hooks subtract the current outputs
  from the corrupted ones, and every reader input with a patched edge gets the sum of the differences of its
  patched upstream sources added; score = that metric minus the clean metric.

Where it departs from the reference, always in the baseline's favour or neutral: the corrupted outputs are
computed once and copied for each edge (the reference reruns the corrupted prompt and prunes the whole graph
before each patched forward: twice the forwards); the weights do not require gradients; scores are not divided
by the batch size (jaxlens's convention: the metric is already a mean); the input node is
`blocks.0.hook_resid_pre` (jaxlens's graph; the reference hooks `hook_embed`, the same thing without learned
positions); key and value inputs are one reader per key/value head (jaxlens's graph, TL's split inputs without
`ungroup_grouped_query_attention`).

    python benchmarks/_circuits_tl_baseline.py WORKDIR     # WORKDIR/meta.json + inputs.npz -> result.json

The child process imports neither JAX nor jaxlens, so its memory is TransformerLens's alone.
"""

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^(?P<hook>[\w.]+?)(\[(?P<slot>\d+)\])?$")


@dataclasses.dataclass(frozen=True)
class Reader:
    """One TL hook whose output feeds destinations `dst` (one per slot of a per-head hook, else one)."""

    hook: str
    dst: np.ndarray  # [n_slots] destination indices, in slot order
    prev: int  # the sources upstream of this reader are 0 .. prev - 1
    per_head: bool


@dataclasses.dataclass(frozen=True)
class EdgeSet:
    """A circuit graph's sources, readers and edges, as TL hook names (from jaxlens `Graph`'s names)."""

    sources: tuple[tuple[str, int | None], ...]  # (hook, head slot or None), in source order
    readers: tuple[Reader, ...]
    edge_src: np.ndarray
    edge_dst: np.ndarray
    n_dst: int

    @classmethod
    def from_names(cls, src_names: Sequence[str], dst_names: Sequence[str], edge_src, edge_dst) -> "EdgeSet":
        """From `Graph.src_names()`, `Graph.dst_names()`, `Graph.edge_src`, `Graph.edge_dst`.

        Raises:
            ValueError: a destination whose upstream sources are not a prefix of the source order.
        """
        edge_src, edge_dst = np.asarray(edge_src), np.asarray(edge_dst)
        real = np.zeros((len(src_names), len(dst_names)), bool)
        real[edge_src, edge_dst] = True
        prev = real.sum(0)
        if not all(real[: prev[d], d].all() for d in range(len(dst_names))):
            raise ValueError("Every destination's sources must be a prefix of the source order "
                             "(a residual-stream graph); found one that is not.")
        groups: dict[str, list[tuple[int | None, int]]] = {}
        for d, name in enumerate(dst_names):
            m = _NAME.match(name)
            slot = m["slot"]
            groups.setdefault(m["hook"], []).append((None if slot is None else int(slot), d))
        readers = []
        for hook, items in groups.items():
            dst = np.asarray([d for _, d in sorted(items, key=lambda t: t[0] or 0)])
            readers.append(Reader(hook, dst, int(prev[dst[0]]), items[0][0] is not None))
        sources = []
        for name in src_names:
            m = _NAME.match(name)
            sources.append((m["hook"], None if m["slot"] is None else int(m["slot"])))
        return cls(tuple(sources), tuple(readers), edge_src, edge_dst, len(dst_names))

    @property
    def n_src(self) -> int:
        return len(self.sources)

    def source_hooks(self, diff: torch.Tensor, sign: float) -> list[tuple[str, Callable]]:
        """Forward hooks adding sign x each source's output into diff [batch pos n_src d_model]."""
        first: dict[str, int] = {}
        for i, (hook, _) in enumerate(self.sources):
            first.setdefault(hook, i)

        def make(start):
            def fn(acts, hook):
                a = acts.detach()
                if a.ndim == 4:  # [batch pos head d_model]: the heads are consecutive sources
                    diff[:, :, start:start + a.shape[2]] += sign * a
                else:
                    diff[:, :, start] += sign * a
            return fn

        return [(hook, make(start)) for hook, start in first.items()]


def boot(path, threads: int | None = None):
    """TransformerLens 4.3 on a saved HF folder, compatibility mode without weight processing, with the hook
    points of the graph switched on (split q/k/v inputs, per-head results, MLP inputs) and frozen weights."""
    from transformer_lens.model_bridge import TransformerBridge

    if threads:
        torch.set_num_threads(threads)
    model = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def logit_diff(answer_ids, wrong_ids) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean logit difference (answer - wrong) at the last position (jaxlens's `logit_diff_metric`)."""
    rows = torch.arange(len(answer_ids))
    a, w = torch.as_tensor(np.asarray(answer_ids)), torch.as_tensor(np.asarray(wrong_ids))

    def metric(logits):
        last = logits[:, -1].float()
        return (last[rows, a] - last[rows, w]).mean()

    return metric


def source_outputs(model, es: EdgeSet, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, every source's output [batch pos n_src d_model]) of one forward."""
    b, p = tokens.shape
    acts = torch.zeros((b, p, es.n_src, model.cfg.d_model))
    with torch.inference_mode(), model.hooks(fwd_hooks=es.source_hooks(acts, 1.0)):
        logits = model(tokens)
    return logits, acts


def eap_ig_scores(model, es: EdgeSet, clean, corrupted, metric: Callable, steps: int | None) -> np.ndarray:
    """[n_edges] EAP-IG scores (`steps` passes), or EAP scores (steps=None: one pass at the clean input)."""
    clean, corrupted = torch.as_tensor(np.asarray(clean)), torch.as_tensor(np.asarray(corrupted))
    _, corr = source_outputs(model, es, corrupted)
    _, cln = source_outputs(model, es, clean)
    diff = corr - cln
    scores = torch.zeros((es.n_src, es.n_dst))

    def grad_hook(reader: Reader):
        def fn(grad, hook):
            g = grad.detach()
            g = g if reader.per_head else g[:, :, None]
            scores[: reader.prev, reader.dst] += torch.einsum("bpsd,bphd->sh", diff[:, :, : reader.prev], g)
        return fn

    bwd = [(r.hook, grad_hook(r)) for r in es.readers]
    input_hook = es.sources[0][0]
    alphas = [None] if steps is None else [k / steps for k in range(steps)]
    for alpha in alphas:
        x = cln[:, :, 0] if alpha is None else corr[:, :, 0] + alpha * (cln[:, :, 0] - corr[:, :, 0])

        def start(acts, hook, x=x):  # the input node's output, a leaf the gradient flows back to
            return x.clone().requires_grad_(True)

        with model.hooks(fwd_hooks=[(input_hook, start)], bwd_hooks=bwd):
            metric(model(clean)).backward()
    scores /= len(alphas)
    return scores[es.edge_src, es.edge_dst].numpy()


def masked_metric(model, es: EdgeSet, clean: torch.Tensor, corrupted_acts: torch.Tensor, metric: Callable,
                  patched: np.ndarray) -> float:
    """The metric of the clean run with the edges where `patched` is True taking the corrupted activation
    (EAP-IG's `evaluate_graph` with a patching intervention; the corrupted outputs given)."""
    weight = np.zeros((es.n_src, es.n_dst), np.float32)
    weight[es.edge_src[patched], es.edge_dst[patched]] = 1.0
    weight = torch.as_tensor(weight)
    diff = corrupted_acts.clone()
    hooks = es.source_hooks(diff, -1.0)

    def construct(reader: Reader):
        w = weight[: reader.prev, reader.dst]

        def fn(acts, hook):
            update = torch.einsum("bpsd,sh->bphd", diff[:, :, : reader.prev], w)
            return acts + (update if reader.per_head else update[:, :, 0])
        return fn

    hooks += [(r.hook, construct(r)) for r in es.readers if weight[: r.prev, r.dst].any()]
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        return float(metric(model(clean)))


def exact_prepare(model, es: EdgeSet, clean, corrupted, metric: Callable) -> tuple:
    """What exact patching shares across edges: (clean tokens, corrupted source outputs, clean metric)."""
    clean, corrupted = torch.as_tensor(np.asarray(clean)), torch.as_tensor(np.asarray(corrupted))
    _, corr = source_outputs(model, es, corrupted)
    with torch.inference_mode():
        base = float(metric(model(clean)))
    return clean, corr, base


def exact_scores(model, es: EdgeSet, clean, corrupted, metric: Callable, edges: Sequence[int],
                 prepared: tuple | None = None) -> np.ndarray:
    """[n_edges] metric change with each edge of `edges` patched alone (NaN for the others): one patched
    forward per edge (after the two forwards of `exact_prepare`, unless `prepared` holds its result)."""
    clean, corr, base = prepared or exact_prepare(model, es, clean, corrupted, metric)
    out = np.full(len(es.edge_src), np.nan, np.float32)
    for e in edges:
        patched = np.zeros(len(es.edge_src), bool)
        patched[e] = True
        out[e] = masked_metric(model, es, clean, corr, metric, patched) - base
    return out


def main(work: Path) -> int:
    """Run the baseline on WORKDIR's inputs: EAP-IG over every edge and exact patching of the given edges,
    each timed with its peak resident memory."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_circuits import measured, per_edge
    from bench_graphs import HF_FOLDER

    meta = json.loads((work / "meta.json").read_text())
    exec(HF_FOLDER, {"meta": meta, "Path": Path, "torch": torch})  # the HF Llama folder, made once
    data = np.load(work / "inputs.npz")
    model, m = measured(lambda: boot(meta["hf_dir"], meta["threads"]))
    es = EdgeSet.from_names(meta["src_names"], meta["dst_names"], data["edge_src"], data["edge_dst"])
    metric = logit_diff(data["answer_ids"], data["wrong_ids"])
    clean, corrupted = data["clean"], data["corrupted"]
    res = {"boot_s": m["seconds"], "threads": torch.get_num_threads(), "torch": torch.__version__}
    steps = meta["steps"]
    if meta.get("eap_ig", True):
        ig, res["eap_ig"] = measured(lambda: eap_ig_scores(model, es, clean, corrupted, metric, steps))
    else:  # exact patching only (bench_circuits.py --tl-exact-only)
        ig, res["eap_ig"] = np.full(len(es.edge_src), np.nan, np.float32), None
    which = data["exact_edges"]
    prepared, m = measured(lambda: exact_prepare(model, es, clean, corrupted, metric))
    ex, m_edges = measured(lambda: exact_scores(model, es, clean, corrupted, metric, which, prepared))
    # per edge: the patched forwards alone (the shared corrupted and clean forwards given apart as "prepare")
    res["exact"] = {"edges": len(which), "prepare": m} | per_edge(m_edges, len(which))
    np.savez(work / "scores.npz", eap_ig=ig, exact=ex)  # a scratch folder the parent reads after exit
    (work / "result.json").write_text(json.dumps(res))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
