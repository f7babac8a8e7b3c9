"""The `jaxlens` command: `demo` (the main job), `sweep` (one named patching sweep) and `convert`.

    jaxlens demo [--out DIR] [--small] [--model NAME_OR_PATH]
    jaxlens sweep --model NAME_OR_PATH --clean TEXT --corrupt TEXT --answer TOK --wrong TOK --kind resid_pre --out DIR
    jaxlens convert NAME_OR_PATH --out DIR_OR_FILE.safetensors

Every command works offline. Outputs are written to a temporary name and renamed into place, so an interrupted
run never leaves a half-written folder or file. Bad arguments exit with status 2 and a message saying what was
wrong; a model that cannot be found or loaded exits with status 1.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlens.errors import CheckpointError, InputError, JaxlensError

#: File names of a converted checkpoint folder (`jaxlens convert`).
PARAMS_FILE, CONFIG_FILE = "params.safetensors", "jaxlens_config.json"
FORMAT = "jaxlens-params"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxlens` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except InputError as e:
        args.subparser.error(str(e))  # exits with status 2
    except (JaxlensError, FileNotFoundError) as e:
        print(f"jaxlens {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its three sub-commands."""
    from jaxlens.demo import sweep_kinds

    parser = argparse.ArgumentParser(prog="jaxlens", description="Mechanistic interpretability in JAX, offline.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,sweep,convert}")

    demo = sub.add_parser("demo", help="find induction heads and an IOI circuit in SmolLM2-135M",
                          description="Induction heads and an IOI-style patching analysis on a real model; writes "
                                      "PNG heatmaps, results.json and index.html.")
    demo.add_argument("--out", default="jaxlens_out", type=Path, help="output folder (default: ./jaxlens_out)")
    demo.add_argument("--small", action="store_true", help="small settings (short sequences, few prompts)")
    demo.add_argument("--model", default="smollm2-135m",
                      help="packaged model name, Hugging Face folder or .gguf file (default: smollm2-135m)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo, subparser=demo)

    sweep = sub.add_parser("sweep", help="one activation-patching sweep on a clean/corrupted prompt pair",
                           description="Patch the clean run's activations into the corrupted run and record the "
                                       "logit difference answer - wrong at the last position.")
    sweep.add_argument("--model", required=True, help="packaged model name, Hugging Face folder or .gguf file")
    sweep.add_argument("--clean", required=True, help="the clean prompt")
    sweep.add_argument("--corrupt", required=True, help="the corrupted prompt (same number of tokens)")
    sweep.add_argument("--answer", required=True, help="the clean answer, a single token (e.g. ' Mary')")
    sweep.add_argument("--wrong", required=True, help="the competing answer, a single token (e.g. ' John')")
    sweep.add_argument("--kind", required=True, choices=sorted(sweep_kinds()), metavar="KIND",
                       help="what to patch: " + ", ".join(sorted(sweep_kinds())))
    sweep.add_argument("--out", required=True, type=Path, help="output folder")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=_sweep, subparser=sweep)

    convert = sub.add_parser("convert", help="convert a checkpoint to cached jaxlens params (safetensors + JSON)",
                             description="Read a checkpoint (Hugging Face folder, .gguf file or packaged name) and "
                                         "write its unprocessed jaxlens params as safetensors with a config JSON.")
    convert.add_argument("source", help="packaged model name, Hugging Face folder or .gguf file")
    convert.add_argument("--out", required=True, type=Path,
                         help="output folder, or a file ending in .safetensors (config written beside it as .json)")
    convert.set_defaults(func=_convert, subparser=convert)
    return parser


# -- commands ---------------------------------------------------------------------------------------------------
def _demo(args) -> int:
    from jaxlens.demo import DemoSettings, run_demo, summary

    settings = DemoSettings.small(args.model) if args.small else DemoSettings(model=args.model)
    report = run_demo(args.out, settings, progress=not args.quiet)
    print(summary(report))
    return 0


def _sweep(args) -> int:
    from jaxlens.demo import atomic_dir, load_model, logit_diff_metric, patch_sweep, write_json

    t0 = time.perf_counter()
    model = load_model(args.model)
    clean, corrupt = model.to_tokens(args.clean), model.to_tokens(args.corrupt)
    if clean.shape != corrupt.shape:
        raise InputError(
            f"--clean and --corrupt must have the same number of tokens to patch position by position; found "
            f"{clean.shape[1]} {model.to_str_tokens(args.clean)} and {corrupt.shape[1]} "
            f"{model.to_str_tokens(args.corrupt)}. Reword one of them."
        )
    answer, wrong = model.to_single_token(args.answer), model.to_single_token(args.wrong)
    metric = logit_diff_metric(jnp.asarray([answer]), jnp.asarray([wrong]))
    clean_logits, clean_cache = model.run_with_cache(clean)
    clean_ld, corrupt_ld = float(metric(clean_logits)), float(metric(model(corrupt)))
    values = patch_sweep(args.kind, model, corrupt, clean_cache, metric, progress=not args.quiet)
    denom = clean_ld - corrupt_ld
    normalised = (values - corrupt_ld) / (denom if abs(denom) > 1e-6 else 1e-6)
    tokens = model.to_str_tokens(args.clean)
    axes = _axes(args.kind)
    result = {"model": args.model, "kind": args.kind, "clean": args.clean, "corrupt": args.corrupt,
              "answer": args.answer, "wrong": args.wrong, "clean_tokens": tokens,
              "metric": "logit(answer) - logit(wrong) at the last position",
              "clean_logit_diff": clean_ld, "corrupted_logit_diff": corrupt_ld, "axes": list(axes),
              "values": values.tolist(), "normalised": normalised.tolist(),
              "seconds": round(time.perf_counter() - t0, 3)}
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "sweep.json", result)
        _sweep_picture(args.kind, normalised, tokens, tmp / "sweep.png")
    best = np.unravel_index(np.argmax(np.abs(normalised)), normalised.shape)
    where = ", ".join(f"{a} {i}" + (f" ({tokens[i]!r})" if a == "pos" else "") for a, i in zip(axes, best))
    print(f"Logit difference: clean {clean_ld:.3f}, corrupted {corrupt_ld:.3f}\n"
          f"Largest effect of patching {args.kind}: {normalised[best]:+.3f} (normalised) at {where}\n"
          f"Wrote sweep.json and sweep.png to {args.out.absolute()}")
    return 0


def _convert(args) -> int:
    from jaxlens.hooked_transformer import HookedTransformer

    model = HookedTransformer.from_pretrained_no_processing(args.source)
    written = save_converted(args.out, model.cfg, model.params, model.tokenizer)
    print(f"Converted {args.source} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}); wrote "
          + ", ".join(str(p) for p in written))
    return 0


# -- converted checkpoints --------------------------------------------------------------------------------------
def save_converted(out: str | Path, cfg, params, tokenizer=None) -> list[Path]:
    """Write params (flattened as "blocks.attn.W_Q", ...) to safetensors and the Config to JSON, atomically.

    `out` is a folder (params.safetensors, jaxlens_config.json and the tokenizer's files) or a path ending in
    `.safetensors` (the config goes to the same name with `.json`; no tokenizer).
    """
    from safetensors.numpy import save_file

    from jaxlens.demo import atomic_dir, write_json

    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in _flatten(params).items()}
    meta = {"format": FORMAT, "version": 1, "config": dataclasses.asdict(cfg)}
    out = Path(out)
    if out.suffix == ".safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        config_path = out.with_suffix(".json")
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            save_file(flat, tmp, metadata={"format": FORMAT})
            _make_public(Path(tmp))
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
        write_json(config_path, meta)
        return [out, config_path]
    with atomic_dir(out) as tmp:
        save_file(flat, str(tmp / PARAMS_FILE), metadata={"format": FORMAT})
        _make_public(tmp / PARAMS_FILE)
        write_json(tmp / CONFIG_FILE, meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return [out / PARAMS_FILE, out / CONFIG_FILE]


def load_converted(path: str | Path) -> tuple[Any, dict]:
    """(Config, numpy params) from what `save_converted` wrote (a folder or a .safetensors file).

    Raises:
        CheckpointError: the files are missing or not a jaxlens conversion.
    """
    from safetensors.numpy import load_file

    from jaxlens.config import Config
    from jaxlens.params import check_params

    path = Path(path)
    params_path, config_path = ((path / PARAMS_FILE, path / CONFIG_FILE) if path.is_dir()
                                else (path, path.with_suffix(".json")))
    if not params_path.is_file() or not config_path.is_file():
        raise CheckpointError(f"{path} is not a converted jaxlens checkpoint: expected {params_path} and "
                              f"{config_path} (written by `jaxlens convert`).")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a jaxlens params config (format {meta.get('format')!r}).")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    cfg = Config(**fields)
    params: dict = {}
    for key, value in load_file(str(params_path)).items():
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    check_params(params, cfg)
    return cfg, params


def is_converted(path: str | Path) -> bool:
    """True if `path` is a folder or .safetensors file written by `save_converted`."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() if path.is_dir() else (
        path.suffix == ".safetensors" and path.with_suffix(".json").is_file())


def _make_public(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _axes(kind: str) -> tuple[str, ...]:
    from jaxlens.demo import sweep_kinds

    return sweep_kinds()[kind]


def _sweep_picture(kind: str, values: np.ndarray, tokens: list[str], path: Path) -> None:
    """A heatmap fitting the sweep's axes: layer x pos, layer x head, or small multiples per head."""
    from jaxlens import viz

    axes, title, label = _axes(kind), f"Patching {kind}", "normalised logit diff"
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


if __name__ == "__main__":
    sys.exit(main())
