"""TopK SAE training throughput and memory, jaxlens against SAELens 6.54.12, on the same stored activations
in the same run (issue 9: target >= 3x SAELens's activations per second on CPU, final MSE and L0 within 10%).

    python benchmarks/bench_sae_vs_saelens.py                    # SmolLM2 activations (cached after once)
    python benchmarks/bench_sae_vs_saelens.py --data synthetic   # a stated synthetic array instead

The activations: SmolLM2-135M `blocks.15.hook_resid_post` over the training corpus (Debian's fortunes), from
jaxlens's ActivationStore (rows of 128 tokens, BOS left out, shuffled), `--steps` training batches of
`--batch-size` and two more batches held out; or, with `--data synthetic`, vectors of width 576 built from a
sparse ground truth (4608 random unit directions, 32 active per vector with magnitudes 0.5-1.5, noise 0.01).
The array is written once as .npy (atomically) under `--cache` and reused.

Both libraries train the same SAE on the same batches in the same order: TopK, d_in 576, d_sae 4608, k 32,
pre-activations rescaled by the decoder norms (SAELens's training default), AuxK coefficient 1, dead-feature
window 1000, Adam (lr 3e-4, betas 0.9/0.999) after global-norm clipping at 1, constant learning rate, inputs
scaled to mean norm sqrt(576) with the factor estimated on the first `--norm-batches` batches and folded in
at the end. jaxlens runs `train_dictionaries`; SAELens runs its own `SAETrainer.step` (the step `fit` calls:
the activation scaler, `TopKTrainingSAE.training_forward_pass`, dead-feature counts, backward, clipping,
Adam, the schedulers) directly on the tensors, without its LM runner. Each library lives in its own process
(the SAELens one in the reference venv of tests/ref_envs.py, torch at 2 threads); the parent hands the two
processes one training step at a time, alternating which goes first, so load on the machine hits both
alike. A step is timed from the hand-over to the end of the library's step (batch read, step, the metrics
the trainer pulls to the host); the first `--warmup` steps (compilation) are left out; activations/s is
batch size / median step time. Peak RSS is each process's ru_maxrss (batches are read with plain file reads,
not memory-mapped, so the data file does not count). Final MSE (squared error summed over the width, mean
over vectors, raw units), L0 and explained variance are measured by each library's own encode/decode on the
held-out batches. One known difference in the recipes: jaxlens rescales TopK decoder rows to unit norm
after every step, SAELens 6.x does not (with the rescaling both decode relu(pre-activation) W_dec).
Results go to benchmarks/results/sae_vs_saelens.json; a markdown section for BENCHMARKS.md is printed.
"""

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model  # benchmarks/ is on sys.path when run as a script

HOOK = "blocks.15.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sae_vs_saelens.json"
D_IN = 576


def read_rows(path, start, n):
    """Rows start..start+n of a 2-D float32 .npy file, by plain reads (no memory map: RSS stays honest)."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = header(f)
        f.seek(f.tell() + start * shape[1] * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=n * shape[1]).reshape(n, shape[1])


def _child_loop(steps, warmup, batch_size, run_step):
    """The turn-taking protocol on stdin/stdout: '@@ready', then per step wait for 'go', run, '@@step'."""
    print("@@ready", flush=True)
    times = []
    for step in range(steps):
        sys.stdin.readline()
        t = time.perf_counter()
        run_step(step)
        times.append(time.perf_counter() - t)
        print(f"@@step {step} {times[-1]:.6f}", flush=True)
    return times


def _summary(times, warmup, batch_size, x, recon, acts, rss_start_kib, extra):
    steady = times[warmup:]
    err = np.square(x.astype(np.float64) - recon.astype(np.float64)).sum(-1)
    var = np.square(x - x.mean(0, dtype=np.float64)).sum(-1)
    return {"step_seconds": times, "median_step_s": statistics.median(steady),
            "activations_per_s": batch_size / statistics.median(steady),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_training_mib": rss_start_kib / 1024,
            "heldout_mse": float(err.mean()), "heldout_l0": float((acts != 0).sum(-1).mean()),
            "heldout_explained_variance": float(1 - err.sum() / var.sum()), **extra}


# -- jaxlens (run in this project's venv: `--child`) ---------------------------------------------------------
def jaxlens_child(a) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxlens.dictionaries.base import DictionaryConfig
    from jaxlens.dictionaries.train import TrainConfig, train_dictionaries

    cfg = DictionaryConfig(architecture="topk", d_in=D_IN, d_sae=a.d_sae, k=a.k, hook_name=HOOK,
                           rescale_acts_by_decoder_norm=True)
    tc = TrainConfig(steps=a.steps, lr=a.lr, adam_beta1=0.9, adam_beta2=0.999, clip_grad_norm=1.0,
                     coefficients=(("auxk", 1.0),), dead_feature_window=1000, normalise_activations=True,
                     n_batches_for_norm_estimate=a.norm_batches, seed=0)
    calls, losses = [0], []

    def batches(step):
        calls[0] += 1
        if calls[0] > a.norm_batches:  # a training step (the first calls estimate the scaling factor)
            sys.stdin.readline()
            stamps.append(time.perf_counter())
        return {HOOK: jnp.asarray(read_rows(a.data, step * a.batch_size, a.batch_size))}

    def on_step(step, m):
        times.append(time.perf_counter() - stamps[-1])
        losses.append(float(m["mse"][0]))
        print(f"@@step {step} {times[-1]:.6f}", flush=True)

    stamps, times = [], []
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("@@ready", flush=True)
    res = train_dictionaries(cfg, batches, tc, n_devices=1, on_step=on_step)
    sae = res.dictionaries[0]
    x = read_rows(a.data, a.steps * a.batch_size, 2 * a.batch_size)
    acts, recon = np.asarray(sae.encode(jnp.asarray(x))), np.asarray(sae(jnp.asarray(x)))
    return _summary(times, a.warmup, a.batch_size, x, recon, acts, rss0,
                    {"scaling_factor": float(res.scale_in[0]), "train_mse": losses,
                     "versions": {"jax": jax.__version__}})


# -- SAELens (in the reference venv; this source and read_rows, _child_loop, _summary are sent) ----------
SAELENS_MAIN = r'''
def saelens_child(a):
    import torch
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=576, d_sae=a.d_sae, k=a.k, rescale_acts_by_decoder_norm=True,
                                aux_loss_coefficient=1.0, normalize_activations="expected_average_only_in",
                                dtype="float32", device="cpu")
    sae = TopKTrainingSAE(cfg)
    tc = SAETrainerConfig(total_training_samples=a.steps * a.batch_size,
                          train_batch_size_samples=a.batch_size,
                          lr=a.lr, lr_end=a.lr, lr_scheduler_name="constant", adam_beta1=0.9,
                          adam_beta2=0.999, device="cpu", dead_feature_window=1000,
                          n_batches_for_norm_estimate=a.norm_batches)
    batch = lambda s: torch.from_numpy(read_rows(a.data, s * a.batch_size, a.batch_size))
    trainer = SAETrainer(tc, sae, data_provider=iter(()))
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=576, data_provider=(batch(s) for s in range(a.norm_batches)),
        n_batches_for_norm_estimate=a.norm_batches)
    scale = trainer.activation_scaler.scaling_factor
    losses = []

    def run_step(step):
        out = trainer.step(batch(step))
        trainer.n_training_steps += 1
        losses.append(float(out.losses["mse_loss"]))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = _child_loop(a.steps, a.warmup, a.batch_size, run_step)
    sae.fold_activation_norm_scaling_factor(scale)
    sae.eval()
    x = read_rows(a.data, a.steps * a.batch_size, 2 * a.batch_size)
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x))
        recon = sae.decode(acts).numpy()
    return _summary(times, a.warmup, a.batch_size, x, recon, acts.numpy(), rss0,
                    {"scaling_factor": float(scale), "train_mse": losses,
                     "versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__,
                                  "torch_threads": torch.get_num_threads()}})
'''


def saelens_script() -> str:
    head = "import json, resource, statistics, sys, time, types\nimport numpy as np\n"
    parts = [inspect.getsource(f) for f in (read_rows, _child_loop, _summary)]
    tail = ("a = types.SimpleNamespace(**json.loads(sys.argv[1]))\n"
            "print('@@result ' + json.dumps(saelens_child(a)), flush=True)\n")
    return "\n".join([head, *parts, SAELENS_MAIN, tail])


# -- the data ----------------------------------------------------------------------------------------------
def activations_file(a) -> Path:
    """The cached activation array [(steps + 2) * batch_size, 576] (float32), built on first use."""
    n = (a.steps + 2) * a.batch_size
    path = Path(a.cache) / f"sae_vs_saelens_{a.data_kind}_{n}.npy"
    if path.exists():
        return path
    from jaxlens._atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, D_IN))
        if a.data_kind == "synthetic":
            _synthetic(out)
        else:
            _smollm2(out, a.batch_size)
        out.flush()
        del out
    print(f"wrote {path} ({n} activations, {time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return path


def _synthetic(out, n_true=4608, active=32, seed=0):
    r = np.random.default_rng(seed)
    true = r.standard_normal((n_true, D_IN)).astype(np.float32)
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    for s in range(0, len(out), 4096):
        m = min(4096, len(out) - s)
        idx = np.argsort(r.random((m, n_true)), axis=1)[:, :active]
        mag = r.uniform(0.5, 1.5, (m, active)).astype(np.float32)
        out[s:s + m] = np.einsum("mk,mkd->md", mag, true[idx]) + 0.01 * r.standard_normal((m, D_IN))


def _smollm2(out, batch_size):
    from jaxlens.dictionaries import corpus, store
    from jaxlens.hooked_transformer import HookedTransformer

    model = HookedTransformer.from_pretrained("smollm2-135m")
    text = corpus.load_corpus(corpus.TRAIN_SOURCE, model.tokenizer)
    st = store.ActivationStore(model.params, model.cfg, text, [HOOK], context_size=128, batch_size=batch_size,
                               buffer_sequences=136, forward_batch=8, key=0)  # 136 x 127 = 4.2 batches
    for step in range(len(out) // batch_size):
        out[step * batch_size:(step + 1) * batch_size] = np.asarray(st.batch(step)[HOOK])
        print(f"  activations: batch {step + 1}/{len(out) // batch_size}", file=sys.stderr, flush=True)


# -- the parent --------------------------------------------------------------------------------------------
def run_pair(a, data: Path) -> dict:
    """Start both trainers, hand them the steps in turn, and collect their results."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "dictionaries")]
    import saelens_ref

    child = json.dumps({"data": str(data), "steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size,
                        "d_sae": a.d_sae, "k": a.k, "lr": a.lr, "norm_batches": a.norm_batches,
                        "threads": a.threads})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user gets
    logs = {name: open(Path(a.cache) / f"sae_vs_saelens_{name}.log", "w") for name in ("jaxlens", "saelens")}
    cmds = {"jaxlens": [sys.executable, str(Path(__file__).resolve()), "--child", child],
            "saelens": [str(saelens_ref.saelens_python()), "-c", saelens_script(), child]}
    procs = {name: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[name],
                                    text=True, bufsize=1, env=env, cwd=ROOT) for name, cmd in cmds.items()}
    try:
        for name in procs:
            _expect(procs, name, "@@ready", logs)
        for step in range(a.steps):
            for name in ("jaxlens", "saelens") if step % 2 == 0 else ("saelens", "jaxlens"):
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                _expect(procs, name, "@@step", logs)
        return {name: json.loads(_expect(procs, name, "@@result", logs)[len("@@result "):]) for name in procs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()


def _expect(procs, name, prefix, logs) -> str:
    for line in procs[name].stdout:
        if line.startswith(prefix):
            return line.strip()
    procs[name].wait()
    logs[name].flush()
    tail = Path(logs[name].name).read_text()[-4000:]
    raise RuntimeError(f"the {name} trainer ended (exit {procs[name].returncode}) before {prefix!r}:\n{tail}")


def report(a, res: dict, load: tuple) -> dict:
    j, s = res["jaxlens"], res["saelens"]
    ratios = {"throughput": j["activations_per_s"] / s["activations_per_s"],
              "peak_rss": j["peak_rss_mib"] / s["peak_rss_mib"],
              "heldout_mse": j["heldout_mse"] / s["heldout_mse"],
              "heldout_l0": j["heldout_l0"] / s["heldout_l0"]}
    return {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.python_version()}",
            "load_average_before_after": load, "data": a.data_kind, "hook": HOOK if a.data_kind != "synthetic"
            else None, "settings": {"d_in": D_IN, "d_sae": a.d_sae, "k": a.k, "batch_size": a.batch_size,
                                    "steps": a.steps, "warmup_steps_excluded": a.warmup, "lr": a.lr,
                                    "adam_betas": [0.9, 0.999], "clip_grad_norm": 1.0,
                                    "rescale_acts_by_decoder_norm": True, "dead_feature_window": 1000,
                                    "norm_batches": a.norm_batches, "heldout_activations": 2 * a.batch_size,
                                    "torch_threads": a.threads},
            "jaxlens": j, "saelens": s, "ratios": ratios,
            "targets": {"throughput_3x": ratios["throughput"] >= 3,
                        "mse_within_10pct": abs(ratios["heldout_mse"] - 1) <= 0.1,
                        "l0_within_10pct": abs(ratios["heldout_l0"] - 1) <= 0.1}}


def markdown(r: dict) -> str:
    j, s, q, st = r["jaxlens"], r["saelens"], r["ratios"], r["settings"]
    data = ("SmolLM2-135M `blocks.15.hook_resid_post` over the fortunes corpus" if r["data"] == "smollm2"
            else "a synthetic array (width 576, 4608 true directions, 32 active)")
    rows = [("activations/s (median step)", f"{j['activations_per_s']:.0f}", f"{s['activations_per_s']:.0f}",
             f"{q['throughput']:.2f}x"),
            ("median step (s)", f"{j['median_step_s']:.2f}", f"{s['median_step_s']:.2f}", ""),
            ("peak RSS (MiB)", f"{j['peak_rss_mib']:.0f}", f"{s['peak_rss_mib']:.0f}",
             f"{q['peak_rss']:.2f}x"),
            ("held-out MSE", f"{j['heldout_mse']:.4g}", f"{s['heldout_mse']:.4g}", f"{q['heldout_mse']:.3f}"),
            ("held-out L0", f"{j['heldout_l0']:.2f}", f"{s['heldout_l0']:.2f}", f"{q['heldout_l0']:.3f}"),
            ("held-out explained variance", f"{j['heldout_explained_variance']:.3f}",
             f"{s['heldout_explained_variance']:.3f}", "")]
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    t, (l0, l1), sv = r["targets"], r["load_average_before_after"], s["versions"]
    return f"""### SAE training against SAELens (issue 9), load {l0:.0f}-{l1:.0f}

`python benchmarks/bench_sae_vs_saelens.py` (results in `benchmarks/results/sae_vs_saelens.json`;
{r['machine']}).
TopK SAE, d_in 576, d_sae {st['d_sae']}, k {st['k']}, batch {st['batch_size']}, {st['steps']} steps on {data}
(the first {st['warmup_steps_excluded']} steps, compilation, left out of the timing), Adam 3e-4 (0.9, 0.999),
clipping 1, decoder-norm rescaling, inputs scaled to mean norm sqrt(576); jaxlens `train_dictionaries` and
SAELens {sv['sae_lens']} `SAETrainer.step` (torch {sv['torch']}, {st['torch_threads']} threads) in two
processes given the same batches one step at a time, alternating which goes first. Held-out: the next
{st['heldout_activations']} activations.

| | jaxlens | SAELens | jaxlens / SAELens |
|---|---|---|---|
{table}

Targets: throughput >= 3x {'met' if t['throughput_3x'] else 'not met'}; MSE within 10%
{'met' if t['mse_within_10pct'] else 'not met'}; L0 within 10% {'met' if t['l0_within_10pct'] else 'not met'}.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", dest="data_kind", choices=("smollm2", "synthetic"), default="smollm2")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--norm-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "jaxlens" / "bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import types

        result = jaxlens_child(types.SimpleNamespace(**json.loads(a.child)))
        print("@@result " + json.dumps(result), flush=True)
        return 0
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup}): some steps must be timed.")
    data = activations_file(a)
    load0 = os.getloadavg()[0]
    res = run_pair(a, data)
    r = report(a, res, (load0, os.getloadavg()[0]))
    from jaxlens._atomic import write_json

    write_json(a.out, r)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
