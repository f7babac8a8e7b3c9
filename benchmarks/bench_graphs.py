"""Attribution graphs on the real SmolLM2-135M: jaxlens against circuit-tracer 0.5.0, same model, same
transcoders, same 16 tokens, in the same run.

    python benchmarks/bench_graphs.py                       # writes benchmarks/results/graphs.json
    python benchmarks/bench_graphs.py --max-feature-nodes 0 --batch-size 128   # every active feature
    python benchmarks/bench_graphs.py --jaxlens-batch-size 16 --skip-circuit-tracer  # jaxlens, less memory
    python benchmarks/bench_graphs.py --bucketing   # two prompts of one bucket: results/graphs_bucketing.json

`--bucketing` (jaxlens only) times `attribute` on this prompt (16 tokens, first call: it compiles the bucket's
programs), then on `PROMPT_SHORT` (another length, the same bucket of 16: no compile), then on the short
prompt without padding (pad_to=None: compiles, as every new length did before bucketing) and both again, warm
(the cost of computing at the padded length); it counts XLA compiles per call and compares the two graphs.

The transcoders are the trained set under ~/.cache/jaxlens/transcoders/ when one exists (a folder with
config.yaml, e.g. from `jaxlens train-transcoders`), else random ones of the trained set's shape and sparsity
(per-layer JumpReLU, d_sae 2304, thresholds set so that about 32 features fire per token and layer on the
prompt, as BatchTopK k=32); the output says which. Both libraries read the same files: jaxlens's
`load_circuit_tracer`, circuit-tracer's `load_transcoder_set` with the hooks of the folder's config.yaml
(`ln2.hook_normalized` -> `hook_mlp_out` for jaxlens's sets).

circuit-tracer runs in its cached venv (tests/ref_envs.py; transformers 4.57.3, torch CPU) on a Hugging Face
Llama folder made once from the packaged GGUF: transformers loads the GGUF (`gguf_file=`, which needs the
`gguf` package: installed into that venv here if missing), and since it refuses `save_pretrained` on a
GGUF-loaded model, a plain LlamaForCausalLM is rebuilt from its config and dequantised weights and saved
(../shared/REFERENCES.md). TransformerLens's Llama config drops `rope_theta`, so the script sets
`rotary_base` from the Hugging Face config. Both graphs get the same token ids.

Time is the wall time of one `attribute` call (jaxlens: also a first call, which compiles, reported apart;
circuit-tracer: one call), and the CPU time of the process during it (every thread's: on a loaded machine
the wall-time ratio follows the other jobs, the CPU-time ratio much less). Memory is the process's resident
set size, sampled every 5 ms during that call: its peak and its rise above the size just before the call. Run
it on an idle machine; the load average is recorded with the results.
"""

import argparse
import datetime
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "dictionaries"))

PROMPT = "When Mary and John went to the big store, John gave a drink to"  # 15 tokens + BOS
PROMPT_SHORT = "When Mary and John went to the store, John gave it to"  # fewer tokens, the same bucket
D_SAE, K = 2304, 32
TRAINED = Path("~/.cache/jaxlens/transcoders").expanduser()

def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measured(fn):
    """(result, seconds, CPU seconds of the process, peak RSS MiB during the call, RSS MiB just before)."""
    before, peak, done = _rss_mib(), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    t.join()
    return out, secs, cpu, max(peak[0], _rss_mib()), before


#: The same sampler in the circuit-tracer process.
SAMPLER = "import threading, time\n" + inspect.getsource(_rss_mib) + inspect.getsource(measured)

#: Builds the Hugging Face Llama folder meta["hf_dir"] from the GGUF meta["gguf"] once (in any venv with
#: transformers and gguf; `meta`, `Path` and `torch` defined before it). Also run by bench_circuits.py.
HF_FOLDER = r'''
hf_dir = Path(meta["hf_dir"])
if not (hf_dir / "config.json").is_file():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    gguf = Path(meta["gguf"])
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    conf = q.config.to_dict()
    conf.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**conf))
    plain.load_state_dict(q.state_dict(), strict=False)
    plain.to(torch.float32)
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(hf_dir)
'''

#: Run in the circuit-tracer venv: `script WORKDIR` with WORKDIR/meta.json.
CT_SCRIPT = SAMPLER + r'''
import json, sys
from pathlib import Path
import torch
work = Path(sys.argv[1])
meta = json.loads((work / "meta.json").read_text())
torch.set_num_threads(meta["threads"])
''' + HF_FOLDER + r'''from transformers import AutoConfig, AutoTokenizer
from transformer_lens import loading_from_pretrained as loading
from circuit_tracer import attribute
from circuit_tracer.graph import compute_graph_scores
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

tok = AutoTokenizer.from_pretrained(hf_dir)
cfg = loading.get_pretrained_model_config(str(hf_dir), device="cpu", dtype=torch.float32, fold_ln=False)
cfg.rotary_base = AutoConfig.from_pretrained(hf_dir).rope_theta
state = loading.get_pretrained_state_dict(str(hf_dir), cfg, None, dtype=torch.float32)
model = TransformerLensReplacementModel(cfg, tok, move_to_device=False)
model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                  fold_value_biases=True, refactor_factored_attn_matrices=False)
del state
tc = Path(meta["transcoders"])
files = {l: str(tc / f"layer_{l}.safetensors") for l in range(cfg.n_layers)}
import yaml
conf = yaml.safe_load((tc / "config.yaml").read_text())
tcs = load_transcoder_set(files, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                          lazy_decoder=False, feature_input_hook=conf["feature_input_hook"],
                          feature_output_hook=conf["feature_output_hook"], scan=tc.name)
model._configure_replacement_model(tcs)
ids = meta["ids"]
opts = dict(max_n_logits=10, desired_logit_prob=0.95, batch_size=meta["batch_size"], verbose=False)
if meta["max_feature_nodes"]:
    opts["max_feature_nodes"] = meta["max_feature_nodes"]
g, secs, cpu, peak, before = measured(lambda: attribute(ids, model, **opts))
replacement, completeness = compute_graph_scores(g)
out = dict(seconds=secs, cpu_s=cpu, peak_rss_mib=peak, rss_before_mib=before,
           n_active=int(len(g.active_features)), n_selected=int(len(g.selected_features)),
           logit_tokens=g.logit_token_ids.tolist(),
           logit_probabilities=g.logit_probabilities.tolist(), replacement=replacement,
           completeness=completeness, threads=torch.get_num_threads())
(work / "result.json").write_text(json.dumps(out))
print(json.dumps(out))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-feature-nodes", type=int, default=1024, help="feature budget (0: every feature)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per batch, both libraries")
    ap.add_argument("--jaxlens-batch-size", type=int, default=None, help="jaxlens's, if not --batch-size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for circuit-tracer")
    ap.add_argument("--transcoders", type=Path, default=None, help="a transcoder folder (default: see doc)")
    ap.add_argument("--skip-circuit-tracer", action="store_true")
    ap.add_argument("--bucketing", action="store_true", help="time two prompts of one bucket (see doc)")
    ap.add_argument("--out", type=Path, default=None, help="results/graphs.json (graphs_bucketing.json)")
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "graphs_bucketing.json" if args.bucketing else "graphs.json")

    import jax
    from _machine import cpu_model

    from jaxlens import HookedTransformer, hub
    from jaxlens.dictionaries import load_circuit_tracer
    from jaxlens.graphs import attribute

    load0 = os.getloadavg()
    model = HookedTransformer.from_pretrained("smollm2-135m")
    ids = [int(i) for i in attribute_ids(model)]
    tc_dir, kind = transcoder_folder(args.transcoders, model, ids)
    print(f"transcoders: {kind} ({tc_dir}); prompt: {len(ids)} tokens; load average {load0}")
    tcs = load_circuit_tracer(tc_dir)
    budget = args.max_feature_nodes or None
    jl_batch = args.jaxlens_batch_size or args.batch_size

    def run():
        return attribute(model, tcs, ids, max_feature_nodes=budget, batch_size=jl_batch)

    if args.bucketing:
        res = bucketing(model, tcs, ids, lambda ids, pad_to: attribute(
            model, tcs, ids, max_feature_nodes=budget, batch_size=jl_batch, pad_to=pad_to))
        res.update(command=" ".join([sys.executable, *sys.argv]), date=datetime.date.today().isoformat(),
                   machine={"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load0,
                            "load_after": os.getloadavg(), "devices": [str(d) for d in jax.devices()]},
                   transcoders={"kind": kind, "path": str(tc_dir)}, max_feature_nodes=budget,
                   batch_size=jl_batch)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")
        return 0

    _, first, first_cpu, _, _ = measured(run)
    graph, secs, cpu, peak, before = measured(run)
    replacement, completeness = graph.scores()
    jl = dict(seconds=secs, cpu_s=cpu, first_call_s=first, first_call_cpu_s=first_cpu, peak_rss_mib=peak,
              rss_before_mib=before,
              n_active=len(graph.active_features), n_selected=graph.n_features,
              logit_tokens=graph.logit_tokens.tolist(),
              logit_probabilities=graph.logit_probabilities.tolist(), replacement=replacement,
              completeness=completeness)
    print(f"jaxlens: {secs:.1f} s, CPU {cpu:.1f} s (first call {first:.1f} s), peak RSS {peak:.0f} MiB "
          f"(+{peak - before:.0f}); {graph.n_features} of {len(graph.active_features)} active features; "
          f"replacement {replacement:.3f}, completeness {completeness:.3f}")
    res = {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.date.today().isoformat(),
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load0,
                       "devices": [str(d) for d in jax.devices()]},
           "transcoders": {"kind": kind, "path": str(tc_dir)}, "n_tokens": len(ids),
           "max_feature_nodes": budget, "batch_size": args.batch_size, "jaxlens_batch_size": jl_batch,
           "jaxlens": jl}
    if not args.skip_circuit_tracer:
        ct = run_circuit_tracer(hub.resolve("smollm2-135m"), tc_dir, ids, budget, args)
        res["circuit_tracer"] = ct
        res["ratios"] = {"time": ct["seconds"] / secs, "cpu_time": ct["cpu_s"] / cpu,
                         "peak_rss": ct["peak_rss_mib"] / peak,
                         "rss_rise": (ct["peak_rss_mib"] - ct["rss_before_mib"]) / max(peak - before, 1e-9)}
        print(f"circuit-tracer ({ct['threads']} threads): {ct['seconds']:.1f} s, CPU {ct['cpu_s']:.1f} s, "
              f"peak RSS {ct['peak_rss_mib']:.0f} MiB (+{ct['peak_rss_mib'] - ct['rss_before_mib']:.0f}); "
              f"{ct['n_selected']} of {ct['n_active']} active; replacement {ct['replacement']:.3f}, "
              f"completeness {ct['completeness']:.3f}")
        print(f"circuit-tracer / jaxlens: time {res['ratios']['time']:.2f}x (CPU time "
              f"{res['ratios']['cpu_time']:.2f}x), peak RSS "
              f"{res['ratios']['peak_rss']:.2f}x, RSS rise {res['ratios']['rss_rise']:.2f}x; same top "
              f"logits: {ct['logit_tokens'][:3] == jl['logit_tokens'][:3]}")
    res["machine"]["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


def bucketing(model, tcs, ids, run) -> dict:
    """Wall and CPU seconds and XLA compiles of `run(ids, pad_to)` calls: this prompt first, then the
    short one of the same bucket, padded and not, first and warm (module docstring)."""
    import jax
    import numpy as np

    from jaxlens.graphs.attribute import PAD_TO, bucket_length, prompt_tokens

    short = [int(i) for i in prompt_tokens(model, PROMPT_SHORT)]
    buckets = [bucket_length(len(x), PAD_TO, model.cfg.n_ctx) for x in (ids, short)]
    assert len(short) != len(ids) and buckets[0] == buckets[1], (len(ids), len(short), buckets)
    compiles = []
    listen = lambda event, secs, **kw: compiles.append(secs) if event.endswith("backend_compile_duration") \
        else None
    jax.monitoring.register_event_duration_secs_listener(listen)
    calls, graphs = [], {}
    for name, x, pad in [("first prompt, first call (compiles the bucket)", ids, PAD_TO),
                         ("second prompt, same bucket", short, PAD_TO),
                         ("second prompt, pad_to=None, first call", short, None),
                         ("second prompt, pad_to=None, warm", short, None),
                         ("second prompt, same bucket, warm", short, PAD_TO)]:
        compiles.clear()
        load = os.getloadavg()
        graphs[pad], secs, cpu, peak, _ = measured(lambda x=x, pad=pad: run(x, pad))
        calls.append(dict(call=name, n_tokens=len(x), pad_to=pad, seconds=secs, cpu_s=cpu, peak_rss_mib=peak,
                          xla_compiles=len(compiles), compile_s=sum(compiles), load_before=load))
        print(f"{name}: {len(x)} tokens, {secs:.1f} s (CPU {cpu:.1f} s), {len(compiles)} compiles "
              f"({sum(compiles):.1f} s), load {load[0]:.1f}")
    jax.monitoring.unregister_event_duration_listener(listen)
    a, b = graphs[PAD_TO].adjacency, graphs[None].adjacency
    same = a.shape == b.shape and bool(np.array_equal(graphs[PAD_TO].selected_features,
                                                      graphs[None].selected_features))
    ratios = {"first_call_over_same_bucket": calls[0]["seconds"] / calls[1]["seconds"],
              "first_call_over_same_bucket_cpu": calls[0]["cpu_s"] / calls[1]["cpu_s"],
              "unpadded_first_over_same_bucket": calls[2]["seconds"] / calls[1]["seconds"],
              "padded_warm_over_unpadded_warm": calls[4]["seconds"] / calls[3]["seconds"],
              "padded_warm_over_unpadded_warm_cpu": calls[4]["cpu_s"] / calls[3]["cpu_s"]}
    print(" ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return {"n_tokens": [len(ids), len(short)], "bucket": buckets[0], "calls": calls,
            "ratios": ratios, "graphs_agree": {
                "same_nodes": same, "max_abs_diff_over_max_abs": float(np.abs(a - b).max() / np.abs(b).max())
                if same else None}}


def attribute_ids(model):
    from jaxlens.graphs.attribute import prompt_tokens

    return prompt_tokens(model, PROMPT)


def transcoder_folder(given: Path | None, model, ids) -> tuple[Path, str]:
    """(folder, "trained" | "random"): `given`, else a trained set in TRAINED, else random transcoders (module
    docstring) written once to a cache folder."""
    if given is not None:
        return given, "given"
    trained = sorted(p.parent for p in TRAINED.glob("*/config.yaml"))
    if trained:
        return trained[0], "trained"
    import ref_envs

    folder = ref_envs.cache_root() / "outputs" / f"smollm2-random-transcoders-{D_SAE}-k{K}"
    if not (folder / "config.yaml").is_file():
        write_random_transcoders(model, ids, folder)
    return folder, f"random (JumpReLU, d_sae {D_SAE}, ~{K} active per token and layer)"


def write_random_transcoders(model, ids, folder: Path) -> None:
    import jax.numpy as jnp
    import numpy as np

    from jaxlens import forward
    from jaxlens.dictionaries import DictionaryConfig, init_dictionary, save_circuit_tracer

    cfg = model.cfg
    _, cache = forward(model.params, cfg, jnp.asarray(ids)[None], cache_names=["blocks.ln2.hook_normalized"])
    x = np.asarray(cache["blocks.ln2.hook_normalized"][:, 0, 1:])  # [layer pos d_model], BOS left out
    rng = np.random.RandomState(0)
    tcs = {}
    for l in range(cfg.n_layers):
        c = DictionaryConfig(architecture="transcoder", d_in=cfg.d_model, d_sae=D_SAE, activation="jumprelu",
                             hook_name=f"blocks.{l}.ln2.hook_normalized",
                             hook_name_out=f"blocks.{l}.hook_mlp_out")
        t = init_dictionary(c, l)
        W_enc = rng.randn(cfg.d_model, D_SAE).astype(np.float32) / np.sqrt(cfg.d_model)
        pre = x[l] @ W_enc
        t.W_enc[...] = jnp.asarray(W_enc)
        t.b_enc[...] = jnp.zeros(D_SAE)
        t.threshold[...] = jnp.full(D_SAE, np.quantile(pre, 1 - K / D_SAE), jnp.float32)
        t.W_dec[...] = jnp.asarray(0.1 * rng.randn(D_SAE, cfg.d_model).astype(np.float32) / np.sqrt(K))
        t.b_dec[...] = jnp.zeros(cfg.d_model)
        tcs[l] = t
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    save_circuit_tracer(tcs, tmp, model_name="smollm2-135m")
    os.replace(tmp, folder)


def hf_folder(gguf: Path) -> Path:
    """Where the Hugging Face Llama folder made from `gguf` is cached (built by `HF_FOLDER`)."""
    import ref_envs

    key = hashlib.sha256(str(gguf.resolve()).encode() + str(gguf.stat().st_size).encode()).hexdigest()[:12]
    return ref_envs.cache_root() / "outputs" / f"smollm2-hf-{key}"


def run_circuit_tracer(gguf: Path, tc_dir: Path, ids, budget, args) -> dict:
    import ref_envs
    import saelens_ref

    exe = saelens_ref.circuit_tracer_python()
    check = subprocess.run([str(exe), "-c", "import gguf"], capture_output=True)
    if check.returncode:  # transformers' GGUF loader needs it; into the reference venv only
        subprocess.run([str(exe), "-m", "pip", "install", "-q", "gguf==0.19.0"], check=True)
    hf_dir = hf_folder(gguf)
    with tempfile.TemporaryDirectory() as work:
        meta = dict(gguf=str(gguf), hf_dir=str(hf_dir), transcoders=str(tc_dir), ids=ids,
                    max_feature_nodes=budget, batch_size=args.batch_size, threads=args.threads)
        (Path(work) / "meta.json").write_text(json.dumps(meta))
        ref_envs.run_script(exe, CT_SCRIPT, work, timeout=7200,
                            env={"OMP_NUM_THREADS": str(args.threads)})
        return json.loads((Path(work) / "result.json").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
