"""`jaxlens train-transcoders`: a per-layer transcoder for every layer of a model (or the layers asked for),
trained together in one vmapped run, evaluated on held-out text with every MLP replaced at once, and written
as a circuit-tracer transcoder set (the input of attribution graphs).

    jaxlens train-transcoders --model smollm2-135m --d-sae 2304 --activation batchtopk --k 32 \
                              --tokens 400000 --out ~/.cache/jaxlens/transcoders/smollm2-135m-btk32

    run = train_transcoders(TrainTranscodersSettings(model="smollm2-135m", d_sae=2304, k=32, tokens=400_000),
                            "out")
    tcs = load_circuit_tracer("out")            # {layer: Transcoder}

Each transcoder reads the MLP's input, `blocks.L.ln2.hook_normalized` (on the model loaded with
TransformerLens's weight processing, `fold_ln`, the norm's weight lives in W_in, so that hook is exactly what
the MLP reads), and writes `blocks.L.hook_mlp_out` (Dunefsky et al. 2024). Architectures: a plain or skip
transcoder (`W_skip`), with a ReLU (L1 on decoder-norm-weighted activations), JumpReLU or BatchTopK
activation; BatchTopK trains with the batch's k * n_tokens largest activations and is saved as JumpReLU at its
running threshold, the form circuit-tracer reads.

The pipeline is `train_sae.py`'s (shared pieces there): one forward of the model per chunk of rows feeds
every layer's hook pair (`ActivationStore`), `train_dictionaries` updates the stack of transcoders with one
vmapped step and checkpoints it in `OUT/checkpoint` (rerunning the command resumes; the result equals an
uninterrupted run). Then `evals.evaluate_transcoder_set` measures each layer's FVU, L0 and dead features and
the CE loss recovered with every trained MLP replaced by its transcoder in the same forward, and the set is
written as `OUT/config.yaml` + `OUT/layer_{L}.safetensors` (`save_circuit_tracer`) beside `OUT/metrics.json`,
each file atomically.
"""

import argparse
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxlens import _atomic
from jaxlens.dictionaries.base import DictionaryConfig
from jaxlens.dictionaries.evals import evaluate_transcoder_set
from jaxlens.dictionaries.train import train_dictionaries
from jaxlens.dictionaries.train_sae import (
    TrainingSettings,
    activation_store,
    add_training_arguments,
    check_sizes,
    load_model_and_text,
    metadata,
    run_summary,
    settings_from_args,
    train_config,
)
from jaxlens.dictionaries.transcoder import Transcoder
from jaxlens.errors import InputError

TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder")
TRANSCODER_ACTIVATIONS = ("relu", "jumprelu", "batchtopk")


@dataclasses.dataclass
class TrainedTranscoders:
    """What `train_transcoders` returns: the set as trained ({layer: Transcoder}, scaling folded in; a
    batchtopk one keeps its running threshold) and the metrics written to metrics.json."""

    transcoders: dict[int, Transcoder]
    metrics: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainTranscodersSettings(TrainingSettings):
    """Everything `jaxlens train-transcoders` takes: the common settings (`TrainingSettings`), the layers
    (None: every layer), the architecture and activation, and the hooks read and written (relative names)."""

    layers: tuple[int, ...] | None = None
    architecture: str = "transcoder"
    activation: str = "batchtopk"
    feature_input_hook: str = "ln2.hook_normalized"
    feature_output_hook: str = "hook_mlp_out"


def train_transcoders(settings: TrainTranscodersSettings, out: str | Path, *, progress: bool = True,
                      on_step: Callable[[int, dict], None] | None = None) -> TrainedTranscoders:
    """Train, evaluate and save a transcoder set (see the module docstring).

    Args:
        settings: what to train.
        out: the output folder (the checkpoint lives in `out/checkpoint`; an existing one is resumed).
        progress: show a tqdm bar.
        on_step: passed to `train_dictionaries` (called after each step).

    Returns:
        TrainedTranscoders (the modules, and metrics.json's content).

    Raises:
        InputError: bad sizes, an unknown architecture or activation, a layer the model lacks.
        CorpusError: a missing or empty corpus; UnknownHookError: a hook the model lacks;
        NonFiniteActivationsError: NaN or inf in the activations.
    """
    from jaxlens.dictionaries.formats_circuit_tracer import save_circuit_tracer

    s, out, t0 = settings, Path(out), time.perf_counter()
    check_sizes(s)
    for flag, value, known in (("--architecture", s.architecture, TRANSCODER_ARCHITECTURES),
                               ("--activation", s.activation, TRANSCODER_ACTIVATIONS)):
        if value not in known:
            raise InputError(f"{flag} must be one of {', '.join(known)}; found {value!r}.")
    model, train_corpus, held_out = load_model_and_text(s, "train-transcoders")
    layers = check_layers(s.layers, model.cfg.n_layers)
    ins = [f"blocks.{l}.{s.feature_input_hook}" for l in layers]
    outs = [f"blocks.{l}.{s.feature_output_hook}" for l in layers]
    store = activation_store(model, train_corpus, ins + outs, s)
    k = s.k if s.activation == "batchtopk" else None
    cfgs = [DictionaryConfig(architecture=s.architecture, activation=s.activation, d_in=store.widths[i],
                             d_out=store.widths[o], d_sae=s.d_sae, k=k, hook_name=i, hook_name_out=o,
                             topk_threshold_lr=s.topk_threshold_lr,
                             metadata=metadata(s, f"{s.architecture}/{s.activation}"))
            for i, o in zip(ins, outs, strict=True)]
    tc = train_config(s)
    result = train_dictionaries(cfgs, store.batch, tc, out_dir=out, progress=progress, on_step=on_step)
    transcoders = dict(zip(layers, result.dictionaries, strict=True))
    metrics = evaluate_transcoder_set(transcoders, model.params, model.cfg, held_out,
                                      context_size=s.context_size, n_sequences=s.eval_sequences)
    metrics["eval_tokens"] = metrics.pop("tokens")
    final = result.history[-1] if result.history else {}
    for j, l in enumerate(layers):
        for key in ("loss", "l0", "explained_variance"):
            if key in final:
                metrics["layers"][l][f"train_{key}"] = final[key][j]
    metrics |= run_summary(s, tc, result, t0)
    metrics |= {"model": s.model, "layers_trained": list(layers), "architecture": s.architecture,
                "activation": s.activation, "d_sae": s.d_sae, "k": k,
                "feature_input_hook": s.feature_input_hook, "feature_output_hook": s.feature_output_hook,
                "train_text": s.train_text, "eval_text": s.eval_text,
                "settings": {k_: list(v) if isinstance(v, tuple) else v
                             for k_, v in dataclasses.asdict(s).items()}}
    save_circuit_tracer(transcoders, out, model_name=s.model)
    _atomic.write_json(out / "metrics.json", metrics)
    return TrainedTranscoders(transcoders, metrics)


def check_layers(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """The sorted distinct layers (every layer for None); InputError for an empty list or a missing layer."""
    if layers is None:
        return tuple(range(n_layers))
    chosen = tuple(sorted(set(int(l) for l in layers)))
    bad = [l for l in chosen if not 0 <= l < n_layers]
    if not chosen or bad:
        found = f"layer {bad[0]}" if bad else "no layers"
        raise InputError(f"--layers must name layers of the model, which has {n_layers} (0-{n_layers - 1}); "
                         f"found {found}. Give e.g. --layers 0-{n_layers - 1} or --layers 0,3,5.")
    return chosen


def parse_layers(text: str) -> tuple[int, ...]:
    """'0-29', '3', '0,3,5' or '0-5,10' -> the layer indices; InputError for anything else."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise InputError(f"--layers takes layer numbers and ranges such as '0-29' or '0,3,5'; found "
                             f"{text!r}.")
        lo = int(m.group(1))
        out += range(lo, int(m.group(2) or lo) + 1)
    return tuple(out)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `train-transcoders` sub-command to an argparse sub-parsers object; returns its parser."""
    d = TrainTranscodersSettings(model="")
    p = sub.add_parser("train-transcoders",
                       help="train a per-layer transcoder set (MLP in -> MLP out) in one run (resumable)",
                       description="Train a transcoder for every layer (or --layers) of a model together, "
                                   "evaluate the set on held-out text with every MLP replaced, write a "
                                   "circuit-tracer transcoder set and metrics.json. Rerunning the command "
                                   "resumes from its checkpoint.")
    p.add_argument("--model", required=True, help="packaged model name, Hugging Face folder or .gguf file")
    p.add_argument("--layers", default=None, help="layers to train, e.g. 0-29 or 0,3,5 (default: all)")
    p.add_argument("--architecture", default=d.architecture, help="transcoder or skip_transcoder")
    p.add_argument("--activation", default=d.activation,
                   help="relu, jumprelu or batchtopk (saved as jumprelu)")
    p.add_argument("--feature-input-hook", default=d.feature_input_hook, help="relative hook read")
    p.add_argument("--feature-output-hook", default=d.feature_output_hook, help="relative hook written")
    add_training_arguments(p, d)
    p.set_defaults(func=_run, subparser=p)
    return p


def _run(args) -> int:
    args.layers = None if args.layers is None else parse_layers(args.layers)
    settings = settings_from_args(TrainTranscodersSettings, args)
    m = train_transcoders(settings, args.out, progress=not args.quiet).metrics
    per = list(m["layers"].values())
    mean = lambda key: sum(x[key] for x in per) / len(per)  # noqa: E731
    print(f"Trained {len(per)} {settings.architecture}s ({settings.activation}, {settings.d_sae} features) "
          f"on {m['tokens']} tokens in {m['seconds']:.0f} s; held-out: mean FVU {mean('fvu'):.3f}, mean L0 "
          f"{mean('l0'):.1f}, mean dead {mean('dead_fraction'):.3f}; every MLP replaced: CE loss recovered "
          f"{m['ce_loss_recovered']:.3f} (+{m['ce_loss_increase']:.3f} nats). Wrote {args.out}.")
    return 0
