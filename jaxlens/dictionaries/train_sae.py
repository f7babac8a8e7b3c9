"""`jaxlens train-sae`: train one dictionary on a model's activations over an offline corpus, evaluate it on
held-out text, and write a SAELens directory with `metrics.json`.

    jaxlens train-sae --model smollm2-135m --hook blocks.15.hook_resid_post --architecture topk --k 32 \
                      --d-sae 4608 --tokens 2000000 --out sae_l15

    run = train_sae(TrainSaeSettings(model="smollm2-135m", hook="blocks.15.hook_resid_post", d_sae=4608, k=32,
                                     tokens=2_000_000), "sae_l15")

The pipeline: load the model (TransformerLens's weight processing, as SAELens trains on `HookedTransformer`),
tokenise the training text (default Debian's `fortunes`) and the held-out text (default the Jargon File:
another source), stream activations with `ActivationStore`, train with `train_dictionaries` (checkpoints in
`OUT/checkpoint`), evaluate with `evals.evaluate`, then write `cfg.json` + `sae_weights.safetensors`
(`formats_saelens.save_saelens`) and `metrics.json`, each file atomically. Running the same command again
resumes from the last checkpoint; with a larger `--tokens` it continues the same run (the data order and the
optimiser state carry on, so the result equals one run of the larger budget when no LR decay is set).

Positions can be left out of training and evaluation alike (off by default, as in SAELens):
`exclude_special_tokens` (SAELens 6's option of that name: the tokenizer's BOS, EOS, PAD, SEP ids,
`store.special_token_ids`) and `exclude_norm_ratio` (positions whose norm exceeds that multiple of the median,
`store.keep_positions`); the counts go into `metrics.json` (`train_excluded`, `eval_excluded_*`). A TopK or
BatchTopK SAE trains as SAELens 6 trains it: pre-activations rescaled by the decoder norms
(`rescale_acts_by_decoder_norm`), decoder rows left free (`--normalise-decoder` restores unit-norm rows after
every step) and the norms folded into the encoder when it is saved (`TopKSAE.fold_W_dec_norm`).

The pieces every training command shares (`TrainingSettings`, `load_model_and_text`, `activation_store`,
`train_config`, `run_summary`, `add_training_arguments`, `settings_from_args`) live here too;
`train_transcoders.py` (`jaxlens train-transcoders`) builds on them.
"""

import argparse
import dataclasses
import math
import time
from pathlib import Path

from jaxlens import _atomic
from jaxlens.dictionaries import corpus as corpus_mod
from jaxlens.dictionaries.base import ARCHITECTURES, DictionaryConfig
from jaxlens.dictionaries.evals import evaluate
from jaxlens.dictionaries.store import EXCLUDE_RESERVE, ActivationStore, special_token_ids
from jaxlens.dictionaries.train import TrainConfig, train_dictionaries
from jaxlens.errors import InputError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """What every dictionary-training command takes (defaults are SAELens's where it has them)."""

    model: str
    d_sae: int = 4096
    k: int | None = 32
    tokens: int = 2_000_000
    context_size: int = 128
    batch_size: int = 4096
    buffer_sequences: int | None = None
    lr: float = 3e-4
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    l1_coefficient: float = 1.0
    sparsity_coefficient: float = 1.0
    coefficient_warm_up_steps: int = 0
    dead_feature_window: int = 1000
    topk_threshold_lr: float = 0.01
    checkpoint_every: int = 100
    seed: int = 0
    train_text: str = corpus_mod.TRAIN_SOURCE
    eval_text: str = corpus_mod.HELDOUT_SOURCE
    eval_sequences: int = 64
    exclude_special_tokens: bool = False
    exclude_norm_ratio: float | None = None
    normalise_decoder: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSaeSettings(TrainingSettings):
    """Everything `jaxlens train-sae` takes: the common settings, the hook(s) and the architecture."""

    hook: str
    architecture: str = "topk"
    hook_out: str | None = None
    rescale_acts_by_decoder_norm: bool = True


def train_sae(settings: TrainSaeSettings, out: str | Path, *, progress: bool = True) -> dict:
    """Train, evaluate and save (see the module docstring); returns the metrics written to metrics.json.

    Raises:
        InputError: bad sizes or options; CorpusError: a missing or empty corpus; UnknownHookError: a hook
            the model lacks; NonFiniteActivationsError: NaN or inf in the activations.
    """
    from jaxlens.dictionaries.formats_saelens import save_saelens

    s, out, t0 = settings, Path(out), time.perf_counter()
    check_sizes(s)
    if s.architecture not in ARCHITECTURES or s.architecture == "clt":
        known = ", ".join(a for a in ARCHITECTURES if a != "clt")
        raise InputError(f"--architecture must be one of {known}; found {s.architecture!r}.")
    transcoder = s.architecture in ("transcoder", "skip_transcoder")
    if transcoder != (s.hook_out is not None):
        raise InputError("A transcoder reads --hook and writes --hook-out: give --hook-out with a transcoder "
                         f"architecture and only then; found --architecture {s.architecture} and --hook-out "
                         f"{s.hook_out!r}.")
    model, train_corpus, held_out = load_model_and_text(s, "train-sae")
    hooks = [s.hook] + ([s.hook_out] if transcoder else [])
    store = activation_store(model, train_corpus, hooks, s)
    topk = s.architecture in ("topk", "batchtopk")
    k = s.k if topk else None
    dcfg = DictionaryConfig(architecture=s.architecture, d_in=store.widths[s.hook], d_sae=s.d_sae, k=k,
                            d_out=store.widths[s.hook_out] if transcoder else None, hook_name=s.hook,
                            hook_name_out=s.hook_out,
                            metadata=metadata(s, s.architecture, store.exclude_token_ids),
                            topk_threshold_lr=s.topk_threshold_lr,
                            rescale_acts_by_decoder_norm=topk and s.rescale_acts_by_decoder_norm)
    tc = train_config(s)
    result = train_dictionaries(dcfg, store.batch, tc, out_dir=out, progress=progress)
    sae = result.dictionaries[0]
    if dcfg.rescale_acts_by_decoder_norm:
        sae.fold_W_dec_norm()  # SAELens folds them when it saves: unit-norm decoder rows, same outputs
    metrics = evaluate(sae, model.params, model.cfg, held_out, context_size=s.context_size,
                       n_sequences=s.eval_sequences, exclude_token_ids=store.exclude_token_ids,
                       exclude_norm_ratio=s.exclude_norm_ratio)
    metrics["eval_tokens"] = metrics.pop("tokens")
    metrics["train_excluded"] = store.exclusion_counts()
    final = result.history[-1] if result.history else {}
    metrics |= run_summary(s, tc, result, t0)
    metrics |= {"train_loss": final.get("loss", [None])[0], "train_l0": final.get("l0", [None])[0],
                "train_explained_variance": final.get("explained_variance", [None])[0],
                "model": s.model, "hook": s.hook, "hook_out": s.hook_out, "architecture": s.architecture,
                "d_sae": s.d_sae, "k": k, "train_text": s.train_text, "eval_text": s.eval_text,
                "exclude_token_ids": list(store.exclude_token_ids),
                "exclude_norm_ratio": s.exclude_norm_ratio,
                "rescale_acts_by_decoder_norm": dcfg.rescale_acts_by_decoder_norm,
                "normalise_decoder": s.normalise_decoder}
    save_saelens(sae, out)
    _atomic.write_json(out / "metrics.json", metrics)
    return metrics


# -- shared by the training commands -----------------------------------------------------------------------
def check_sizes(s: TrainingSettings) -> None:
    """Raise InputError unless the token budget, width and batch size are positive."""
    if s.tokens <= 0 or s.d_sae <= 0 or s.batch_size <= 0:
        raise InputError(f"--tokens, --d-sae and --batch-size must be positive; found {s.tokens}, {s.d_sae}, "
                         f"{s.batch_size}.")


def load_model_and_text(s: TrainingSettings, command: str):
    """(model, training corpus, held-out corpus): the model with TransformerLens's weight processing (as
    SAELens trains on `HookedTransformer`), both texts tokenised with its tokenizer."""
    from jaxlens.hooked_transformer import HookedTransformer

    model = HookedTransformer.from_pretrained(s.model)
    if model.tokenizer is None:
        raise InputError(f"The model {s.model!r} has no tokenizer beside its weights; {command} tokenises "
                         "text with it.")
    return (model, corpus_mod.load_corpus(s.train_text, model.tokenizer),
            corpus_mod.load_corpus(s.eval_text, model.tokenizer))


def activation_store(model, corpus, hooks, s: TrainingSettings) -> ActivationStore:
    """The store of `hooks` over `corpus`: forwards of 8 rows, a shuffle buffer of about two batches (plus the
    exclusion reserve), leaving out the positions `s` excludes."""
    forward_batch = 8
    per_row = s.context_size - 1
    ids = special_token_ids(model.tokenizer) if s.exclude_special_tokens else ()
    reserve = EXCLUDE_RESERVE if ids or s.exclude_norm_ratio is not None else 0.0
    buffer = s.buffer_sequences or forward_batch * max(1, math.ceil(2 * s.batch_size / (1 - reserve) / per_row
                                                                     / forward_batch))
    buffer = min(buffer, forward_batch * (corpus.n_sequences(s.context_size) // forward_batch))
    return ActivationStore(model.params, model.cfg, corpus, hooks, context_size=s.context_size,
                           batch_size=s.batch_size, buffer_sequences=max(buffer, forward_batch),
                           forward_batch=forward_batch, key=s.seed, exclude_token_ids=ids,
                           exclude_norm_ratio=s.exclude_norm_ratio, exclude_reserve=reserve)


def metadata(s: TrainingSettings, architecture: str, exclude_token_ids=()) -> tuple:
    """The dictionary config's metadata pairs (model, context, dataset, architecture, and SAELens's
    `exclude_special_tokens`: the ids left out, or False)."""
    return (("model_name", s.model), ("context_size", s.context_size), ("prepend_bos", True),
            ("dataset_path", s.train_text), ("training_architecture", architecture),
            ("exclude_special_tokens", tuple(exclude_token_ids) or False))


def train_config(s: TrainingSettings) -> TrainConfig:
    """The optimisation settings of `s` (steps = ceil(tokens / batch_size))."""
    return TrainConfig(steps=math.ceil(s.tokens / s.batch_size), lr=s.lr, lr_warm_up_steps=s.lr_warm_up_steps,
                       lr_decay_steps=s.lr_decay_steps,
                       coefficients=(("l1", s.l1_coefficient), ("sparsity", s.sparsity_coefficient)),
                       coefficient_warm_up_steps=s.coefficient_warm_up_steps,
                       dead_feature_window=s.dead_feature_window, checkpoint_every=s.checkpoint_every,
                       seed=s.seed, normalise_decoder=s.normalise_decoder)


def run_summary(s: TrainingSettings, tc: TrainConfig, result, t0: float) -> dict:
    """tokens, steps, seconds and steps_this_run of a finished training."""
    return {"tokens": tc.steps * s.batch_size, "steps": tc.steps, "seconds": time.perf_counter() - t0,
            "steps_this_run": len(result.history)}


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `train-sae` sub-command to an argparse sub-parsers object; returns its parser."""
    d = TrainSaeSettings(model="", hook="")
    p = sub.add_parser("train-sae", help="train an SAE or transcoder on a model's activations (resumable)",
                       description="Train a dictionary on a model's activations over offline text, evaluate "
                                   "it on held-out text of another source, write a SAELens folder and "
                                   "metrics.json. Rerunning the command resumes from its checkpoint.")
    p.add_argument("--model", required=True, help="packaged model name, Hugging Face folder or .gguf file")
    p.add_argument("--hook", required=True, help="the hook the dictionary reads (blocks.15.hook_resid_post)")
    p.add_argument("--hook-out", default=None, help="transcoders: the hook written (blocks.3.hook_mlp_out)")
    p.add_argument("--architecture", default=d.architecture,
                   choices=[a for a in ARCHITECTURES if a != "clt"])
    p.add_argument("--no-rescale-acts-by-decoder-norm", dest="rescale_acts_by_decoder_norm",
                   action="store_false",
                   help="topk/batchtopk: do not rescale by decoder norms (SAELens does)")
    add_training_arguments(p, d)
    p.set_defaults(func=_run, subparser=p)
    return p


def add_training_arguments(p: argparse.ArgumentParser, d: TrainingSettings) -> None:
    """The options every training command shares (defaults from `d`)."""
    p.add_argument("--k", type=int, default=d.k, help=f"active features per token, topk/batchtopk ({d.k})")
    p.add_argument("--d-sae", type=int, required=True, help="number of features")
    p.add_argument("--tokens", type=int, required=True, help="training activations (tokens)")
    p.add_argument("--out", required=True, type=Path, help="output folder (also holds the checkpoint)")
    p.add_argument("--context-size", type=int, default=d.context_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="activations per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-warm-up-steps", type=int, default=d.lr_warm_up_steps)
    p.add_argument("--lr-decay-steps", type=int, default=d.lr_decay_steps)
    p.add_argument("--l1-coefficient", type=float, default=d.l1_coefficient, help="standard SAEs")
    p.add_argument("--sparsity-coefficient", type=float, default=d.sparsity_coefficient, help="JumpReLU")
    p.add_argument("--coefficient-warm-up-steps", type=int, default=d.coefficient_warm_up_steps)
    p.add_argument("--dead-feature-window", type=int, default=d.dead_feature_window)
    p.add_argument("--topk-threshold-lr", type=float, default=d.topk_threshold_lr,
                   help="BatchTopK's running-threshold rate")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-text", default=d.train_text, help="registered source or text file (fortunes)")
    p.add_argument("--eval-text", default=d.eval_text, help="held-out source or text file (jargon)")
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences)
    p.add_argument("--exclude-special-tokens", action="store_true",
                   help="leave out BOS/EOS/PAD/SEP positions in training and evaluation (SAELens's option)")
    p.add_argument("--exclude-norm-ratio", type=float, default=d.exclude_norm_ratio,
                   help="leave out positions whose norm exceeds this multiple of the median")
    p.add_argument("--normalise-decoder", action="store_true",
                   help="unit-norm decoder rows after every step (topk/batchtopk; SAELens 6 does not)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_from_args(cls, args):
    """`cls` (a settings dataclass) from parsed arguments (the fields it has)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in fields})


def _run(args) -> int:
    settings = settings_from_args(TrainSaeSettings, args)
    m = train_sae(settings, args.out, progress=not args.quiet)
    print(f"Trained a {settings.architecture} dictionary ({settings.d_sae} features) at {settings.hook} on "
          f"{m['tokens']} tokens in {m['seconds']:.0f} s; held-out: explained variance "
          f"{m['explained_variance']:.3f}, L0 {m['l0']:.1f}, CE loss recovered {m['ce_loss_recovered']:.3f} "
          f"(+{m['ce_loss_increase']:.3f} nats), dead {m['dead_fraction']:.3f}. Wrote {args.out}.")
    return 0
