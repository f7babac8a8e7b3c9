"""`jaxlens graph`: the attribution graph of one prompt on a model with a transcoder set, written as
circuit-tracer's frontend files, jaxlens's lossless graph file and the offline viewer page.

    jaxlens graph "The capital of France is" --model smollm2-135m \
                  --transcoders ~/.cache/jaxlens/transcoders/smollm2-135m-btk32-2304 --out graphs/

writes, in OUT (created if missing), each file atomically:

- `<slug>.json` and `graph-metadata.json`: circuit-tracer's frontend JSON
  (`AttributionGraph.save_circuit_tracer`; open them with circuit-tracer's server or Neuronpedia);
- `<slug>.graph.npz`: the whole unpruned graph (`AttributionGraph.save`; read it back with
  `AttributionGraph.load`);
- `<slug>.html`: the pruned graph in jaxlens's self-contained viewer (`AttributionGraph.save_html`);

and prints the replacement and completeness scores and the top logits. The model is loaded with
TransformerLens's weight processing, as `jaxlens train-transcoders` trains on it, unless --no-processing is
given or the transcoders read circuit-tracer's `mlp.hook_in` (the MLP input after ln2's weights, which the
processing folds away).
"""

import argparse
import re
import time
from pathlib import Path

from jaxlens.errors import InputError
from jaxlens.graphs.export import check_slug
from jaxlens.graphs.prune import check_threshold

#: circuit-tracer's command-line default for the feature budget.
MAX_FEATURE_NODES = 7500


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `graph` sub-command to an argparse sub-parsers object; returns its parser."""
    p = sub.add_parser("graph", help="the attribution graph of a prompt on a transcoder set",
                       description="Build the attribution graph of PROMPT (the local replacement model with "
                                   "the transcoders in place of the MLPs), prune it, and write "
                                   "circuit-tracer's JSON, a .graph.npz file and an offline HTML viewer.")
    p.add_argument("prompt", help="the prompt (a special token, BOS, is prepended)")
    p.add_argument("--model", required=True, help="packaged model name, Hugging Face folder or .gguf file")
    p.add_argument("--transcoders", required=True, type=Path,
                   help="a circuit-tracer transcoder folder (e.g. written by `jaxlens train-transcoders`)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--slug", default=None, help="the graph's name and file stem (default: from the prompt)")
    p.add_argument("--max-feature-nodes", type=int, default=MAX_FEATURE_NODES,
                   help=f"feature node budget, 0 for every active feature (default {MAX_FEATURE_NODES})")
    p.add_argument("--node-threshold", type=float, default=0.8, help="node influence kept (default 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="edge influence kept (default 0.98)")
    p.add_argument("--max-n-logits", type=int, default=10, help="at most this many logit nodes (default 10)")
    p.add_argument("--desired-logit-prob", type=float, default=0.95,
                   help="logit nodes until this cumulative probability (default 0.95)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: fit 1 GiB)")
    p.add_argument("--no-processing", action="store_true",
                   help="load the model without TransformerLens's weight processing (circuit-tracer's sets)")
    p.set_defaults(func=run, subparser=p)
    return p


def run(args) -> int:
    """The `graph` command (see the module docstring); returns the exit status."""
    from jaxlens.dictionaries import load_circuit_tracer
    from jaxlens.graphs import attribute
    from jaxlens.hooked_transformer import HookedTransformer

    t0 = time.perf_counter()
    slug = args.slug if args.slug is not None else slug_of(args.prompt)
    check_slug(slug)
    check_threshold("--node-threshold", args.node_threshold)
    check_threshold("--edge-threshold", args.edge_threshold)
    if args.max_feature_nodes < 0:
        raise InputError(f"--max-feature-nodes must be 0 (every active feature) or more; found "
                         f"{args.max_feature_nodes}.")
    folder = args.transcoders.expanduser()
    if not folder.is_dir():
        raise InputError(f"--transcoders {folder}: no such folder. Give a circuit-tracer transcoder folder "
                         "(layer_<i>.safetensors with config.yaml), e.g. one written by `jaxlens "
                         f"train-transcoders --model {args.model} --out {folder}`.")
    out = args.out.expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder; choose another one.")
    transcoders = load_circuit_tracer(folder)
    sets = transcoders.values() if isinstance(transcoders, dict) else [transcoders]
    unprocessed = args.no_processing or any(t.cfg.hook_name.endswith(".mlp.hook_in") for t in sets)
    ht = HookedTransformer
    model = (ht.from_pretrained_no_processing if unprocessed else ht.from_pretrained)(args.model)
    graph = attribute(model, transcoders, args.prompt, max_n_logits=args.max_n_logits,
                      desired_logit_prob=args.desired_logit_prob,
                      max_feature_nodes=args.max_feature_nodes or None, batch_size=args.batch_size)
    graph.model_name = graph.model_name or str(args.model)
    graph.transcoder_name = folder.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    written = [graph.save_circuit_tracer(out, slug, args.node_threshold, args.edge_threshold),
               out / "graph-metadata.json", graph.save(out / f"{slug}.graph.npz"),
               graph.save_html(out / f"{slug}.html", node_threshold=args.node_threshold,
                               edge_threshold=args.edge_threshold)]
    print(summary(graph, time.perf_counter() - t0))
    print("Wrote " + ", ".join(str(p) for p in written))
    return 0


def summary(graph, seconds: float) -> str:
    """The lines `jaxlens graph` prints: sizes, scores, top logits."""
    replacement, completeness = graph.scores()
    logits = ", ".join(f"{s!r} {p:.3f}" for s, p in zip(graph.logit_strings, graph.logit_probabilities,
                                                         strict=True))
    return (f"Attribution graph of {graph.n_pos} tokens: {graph.n_features} feature nodes (of "
            f"{len(graph.active_features)} active), {graph.n_layers * graph.n_pos} error nodes, "
            f"{graph.n_logits} logit nodes, in {seconds:.1f} s.\n"
            f"Replacement score {replacement:.3f}, completeness score {completeness:.3f}.\n"
            f"Top logits: {logits}")


def slug_of(prompt: str) -> str:
    """A file-name slug from the prompt: its words, lower case, joined by '-', at most 48 characters."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    return "-".join(words)[:48].strip("-") or "graph"
