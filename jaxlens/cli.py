"""The `jaxlens` command: argument parsing for `demo` (the main job), `sweep` (one named patching sweep) and
`convert`; the work is in `jaxlens.demo` (the two pipelines) and `jaxlens.converters` (the checkpoint format).

    jaxlens demo [--out DIR] [--small] [--model NAME_OR_PATH]
    jaxlens sweep --model NAME_OR_PATH --clean TEXT --corrupt TEXT --answer TOK --wrong TOK --kind KIND \
                  --out DIR
    jaxlens convert NAME_OR_PATH --out DIR_OR_FILE.safetensors
    jaxlens train-sae --model NAME --hook HOOK --architecture topk --k 32 --d-sae N --tokens T --out DIR
    jaxlens train-transcoders --model NAME --activation batchtopk --k 32 --d-sae N --tokens T --out DIR
    jaxlens circuit --model NAME --task ioi --out DIR
    jaxlens graph "PROMPT" --model NAME --transcoders DIR --out DIR

Every command works offline. Outputs are written to a temporary name and renamed into place, so an interrupted
run never leaves a half-written folder or file. Bad arguments exit with status 2 and a message saying what was
wrong; a model that cannot be found or loaded exits with status 1.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxlens import converters, demo, hub
from jaxlens.errors import InputError, JaxlensError


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
    kinds = sorted(demo.sweep_kinds())
    model_help = "packaged model name, Hugging Face folder, .gguf file or `jaxlens convert` checkpoint"
    parser = argparse.ArgumentParser(prog="jaxlens",
                                     description="Mechanistic interpretability in JAX, offline.")
    sub = parser.add_subparsers(dest="command",
                                metavar="{demo,sweep,convert,train-sae,train-transcoders,circuit,graph}")

    run = sub.add_parser("demo", help="find induction heads and an IOI circuit in SmolLM2-135M",
                         description="Induction heads and an IOI-style patching analysis on a real model; "
                                     "writes PNG heatmaps, results.json and index.html.")
    run.add_argument("--out", default="jaxlens_out", type=Path, help="output folder (default: ./jaxlens_out)")
    run.add_argument("--small", action="store_true", help="small settings (short sequences, few prompts)")
    run.add_argument("--model", default="smollm2-135m", help=model_help + " (default: smollm2-135m)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_demo, subparser=run)

    sweep = sub.add_parser("sweep", help="one activation-patching sweep on a clean/corrupted prompt pair",
                           description="Patch the clean run's activations into the corrupted run and record "
                                       "the logit difference answer - wrong at the last position.")
    sweep.add_argument("--model", required=True, help=model_help)
    sweep.add_argument("--clean", required=True, help="the clean prompt")
    sweep.add_argument("--corrupt", required=True, help="the corrupted prompt (same number of tokens)")
    sweep.add_argument("--answer", required=True, help="the clean answer, a single token (e.g. ' Mary')")
    sweep.add_argument("--wrong", required=True, help="the competing answer, a single token (e.g. ' John')")
    sweep.add_argument("--kind", required=True, choices=kinds, metavar="KIND",
                       help="what to patch: " + ", ".join(kinds))
    sweep.add_argument("--out", required=True, type=Path, help="output folder")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=_sweep, subparser=sweep)

    convert = sub.add_parser("convert", help="convert a checkpoint to jaxlens params (safetensors + JSON)",
                             description="Read a checkpoint (Hugging Face folder, .gguf file or packaged "
                                         "name) and write its unprocessed jaxlens params as safetensors with "
                                         "a config JSON; `from_pretrained` and --model load the result.")
    convert.add_argument("source", help="packaged model name, Hugging Face folder or .gguf file")
    convert.add_argument("--out", required=True, type=Path,
                         help="output folder, or a file ending in .safetensors (config beside it as .json)")
    convert.set_defaults(func=_convert, subparser=convert)
    from jaxlens.dictionaries import train_sae  # its logic lives there

    train_sae.add_parser(sub)
    from jaxlens.dictionaries import train_transcoders  # its logic lives there

    train_transcoders.add_parser(sub)
    from jaxlens.circuits import task as circuit_task  # its logic lives there

    circuit_task.add_parser(sub)
    from jaxlens.graphs import cli as graph_cli  # its logic lives there

    graph_cli.add_parser(sub)
    return parser


def _demo(args) -> int:
    settings = demo.DemoSettings.small(args.model) if args.small else demo.DemoSettings(model=args.model)
    report = demo.run_demo(args.out, settings, progress=not args.quiet)
    print(demo.summary(report))
    return 0


def _sweep(args) -> int:
    result = demo.run_sweep(args.model, args.clean, args.corrupt, args.answer, args.wrong, args.kind,
                            args.out, progress=not args.quiet)
    print(demo.sweep_summary(result, args.out))
    return 0


def _convert(args) -> int:
    cfg, params = converters.load(args.source)  # unprocessed, as in the checkpoint
    tokenizer = converters.load_tokenizer(hub.resolve(args.source))
    written = converters.save_converted(args.out, cfg, params, tokenizer)
    print(f"Converted {args.source} ({cfg.n_layers} layers, d_model {cfg.d_model}); wrote "
          + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
