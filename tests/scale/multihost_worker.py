"""One process of the multi-process tests (tests/scale/test_multihost.py, test_multihost_loading.py) and
benchmark: joins a localhost `jax.distributed` job, runs its modes on tiny models, and writes what it got.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/scale/multihost_worker.py \\
        --port 12345 --num-processes 2 --process-id 0 --out /tmp/p0.npz --ckpt /tmp/ckpt

Modes (--mode, repeatable, run in one launch): "sweep" (default: a patching sweep and a `map_chunks`),
"load" (`from_pretrained(mesh=...)` of the checkpoints under --ckpt, with the reads it made and the gathered
logits), "edges" (exact `attribute_edges` on the default mesh). `problem()`, `LOAD_CASES` and
`edges_problem()` are the computations, shared with the tests' single-process references; `launch()` starts
the workers (the tests' side).
"""

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

WORKER = Path(__file__).resolve()
CHUNK = 8  # cells per chunk: one per device on 8 devices (2 processes x 4, or one process with 8)
# mode "load": checkpoint folder name under --ckpt -> (mesh data, mesh model, fsdp); each folder holds an HF
# checkpoint ("hf") and its `jaxlens convert` copy ("converted")
LOAD_CASES = {"gpt2": (1, 8, False), "llama": (2, 4, True)}
LOAD_TOKENS = np.array([[3, 14, 15, 92, 65, 35], [89, 79, 32, 38, 46, 26]], np.int32)
EDGE_CHUNK = 4  # items per chunk asked for; rounded up to the `data` axis size (8 on the global mesh)


def metric(logits):
    return (logits[:, :, 7] - logits[:, :, 8]).mean()


def item_fn(args, item):
    """`map_chunks`'s function: one value per item."""
    return jnp.tanh(args["W"] @ item).sum()


def problem(n_layers: int = 2, n_pos: int = 6):
    """The sweep (params, cfg, corrupted, clean, keywords) and the map_chunks (args, items) of the tests."""
    import jaxlens
    from jaxlens import testing

    cfg = testing.tiny_config(n_layers=n_layers)
    params = jaxlens.init_params(cfg, jax.random.key(0), scale=0.1)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (2, n_pos)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 1) % cfg.d_vocab  # positions 0, 1: no-op cells
    kw = dict(hook="attn.hook_z", axes=("layer", "pos", "head"), chunk_size=CHUNK, max_windows=1,
              progress=False)
    args = {"W": rng.normal(size=(5, 7)).astype(np.float32)}
    items = rng.normal(size=(21, 7)).astype(np.float32)
    return params, cfg, corrupted, clean, kw, args, items


def edges_problem():
    """(model, clean, corrupted) of mode "edges": a tiny random decoder and a prompt pair."""
    import jaxlens
    from jaxlens import testing

    cfg = testing.tiny_config(n_layers=1)  # 28 edges: 29 items, 4 chunks of 8
    model = jaxlens.HookedTransformer(cfg, jaxlens.init_params(cfg, jax.random.key(1), scale=0.1))
    rng = np.random.default_rng(1)
    clean = rng.integers(0, cfg.d_vocab, (2, 5)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 1] = (clean[:, 1] + 3) % cfg.d_vocab
    return model, clean, corrupted


def run_load(ckpt: str, out: dict) -> None:
    """Every LOAD_CASES checkpoint, both kinds, loaded onto its mesh; the reads and the gathered logits."""
    from jaxlens import HookedTransformer
    from jaxlens.scale import distributed, make_mesh, record_reads

    for name, (data, model, fsdp) in LOAD_CASES.items():
        mesh = make_mesh(data=data, model=model)
        for kind in ("hf", "converted"):
            with record_reads() as log:
                m = HookedTransformer.from_pretrained(os.path.join(ckpt, name, kind), mesh=mesh, fsdp=fsdp)
            out[f"{name}_{kind}_logits"] = distributed.gather(m(LOAD_TOKENS))
            out[f"{name}_{kind}_reads"] = np.array(json.dumps(log.entries))  # a str array: no pickle


def run_edges(out: dict) -> None:
    """Exact `attribute_edges` (its chunks counted), every process on the default mesh (the gradient methods
    use no mesh)."""
    from jaxlens.circuits import attribute_edges

    model, clean, corrupted = edges_problem()
    totals = []
    exact = attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=EDGE_CHUNK,
                            on_chunk=lambda done, total: totals.append(total))
    out["exact"], out["exact_chunks"] = exact.scores, totals[-1]


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--num-processes", type=int, required=True)
    a.add_argument("--process-id", type=int, required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--ckpt", default=None)
    a.add_argument("--kill-after", type=int, default=0, help="process 0 SIGKILLs itself after N chunks")
    a.add_argument("--other-sweep", action="store_true", help="then try another sweep in --ckpt (refused)")
    a.add_argument("--init-only", action="store_true")
    a.add_argument("--timeout", type=int, default=60)
    a.add_argument("--repeat", action="store_true", help="time the sweep again, compiled (benchmark)")
    a.add_argument("--n-layers", type=int, default=2)
    a.add_argument("--n-pos", type=int, default=6)
    a.add_argument("--mode", choices=("sweep", "load", "edges"), action="append")
    o = a.parse_args()
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_default_matmul_precision", "highest")

    from jaxlens import _atomic, patching
    from jaxlens.circuits.chunks import map_chunks
    from jaxlens.errors import InputError
    from jaxlens.scale import distributed

    distributed.initialize(f"localhost:{o.port}", o.num_processes, o.process_id, timeout=o.timeout)
    out = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    modes = o.mode or ["sweep"]
    if "load" in modes:
        run_load(o.ckpt, out)
    if "edges" in modes:
        run_edges(out)
    if "sweep" in modes and not o.init_only:
        params, cfg, corrupted, clean, kw, args, items = problem(o.n_layers, o.n_pos)
        chunks_run = []

        def on_chunk(done, total):
            chunks_run.append(total)
            if o.kill_after and done == o.kill_after and jax.process_index() == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # a host lost mid-sweep: no clean-up of any kind

        ckpt = None if o.ckpt is None else os.path.join(o.ckpt, "sweep")
        start = time.perf_counter()
        res = patching.sweep(params, cfg, corrupted, clean, metric, checkpoint_dir=ckpt, on_chunk=on_chunk,
                             **kw)
        out["seconds"] = time.perf_counter() - start
        out["values"], out["chunks_run"] = res.values, len(chunks_run)
        if o.repeat:
            start = time.perf_counter()
            patching.sweep(params, cfg, corrupted, clean, metric, **kw)
            out["seconds_warm"] = time.perf_counter() - start
        ckpt_map = None if o.ckpt is None else os.path.join(o.ckpt, "map")
        out["map"] = map_chunks(item_fn, args, items, chunk_size=CHUNK, checkpoint_dir=ckpt_map,
                                fingerprint="worker-map")
        if o.other_sweep:
            try:
                patching.sweep(params, cfg, corrupted, clean, metric, checkpoint_dir=ckpt, layers=(1,), **kw)
                out["other_error"] = ""
            except InputError as e:
                out["other_error"] = str(e)
    buf = io.BytesIO()
    np.savez(buf, **out)
    _atomic.write_bytes(o.out, buf.getvalue())
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)


# -- launching workers (the tests' side) ---------------------------------------------------------------------
def launch(tmp_path: Path, jax_cache: Path, extra: list[str], *, counts=(2, 2), expect_ok: bool = True,
         timeout: float = 240, grace: float = 60):
    """Launch one worker per entry of `counts` (its --num-processes) on a free localhost port and wait.

    Returns each process's output (expect_ok) or (return codes, logs). Every worker still running at the end
    (a failure, a timeout, a survivor of a killed peer) is killed: no orphans.
    """
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(jax_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "PYTHONUNBUFFERED": "1"}
    outs = [tmp_path / f"out{i}.npz" for i in range(len(counts))]
    logs = [tmp_path / f"log{i}.txt" for i in range(len(counts))]
    for f in outs:
        f.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        procs = []
        for i, n in enumerate(counts):
            log = stack.enter_context(open(logs[i], "w"))
            cmd = [sys.executable, str(WORKER), "--port", str(port), "--num-processes", str(n),
                   "--process-id", str(i), "--out", str(outs[i]), *extra]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            codes = wait_all(procs, timeout, grace)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    texts = [f.read_text() for f in logs]
    if not expect_ok:
        return codes, texts
    for code, text in zip(codes, texts, strict=True):
        assert code == 0, text[-4000:]
    return [dict(np.load(f)) for f in outs]


def wait_all(procs, timeout: float, grace: float) -> list:
    """Return codes once every process has ended; once one has ended badly, the others get `grace` seconds
    (to report their own error; a survivor of a killed peer may wait on it) before they are killed."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.2)
    return [p.returncode for p in procs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
