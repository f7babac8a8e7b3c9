"""One process of the multi-process tests (tests/scale/test_multihost.py) and benchmark: joins a localhost
`jax.distributed` job, runs a patching sweep and a `map_chunks` on a tiny model, and writes what it got.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/scale/multihost_worker.py \\
        --port 12345 --num-processes 2 --process-id 0 --out /tmp/p0.npz --ckpt /tmp/ckpt

`problem()` is the computation, shared with the tests' single-process reference.
"""

import argparse
import io
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 8  # cells per chunk: one per device on 8 devices (2 processes x 4, or one process with 8)


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
    o = a.parse_args()
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_default_matmul_precision", "highest")

    from jaxlens import _atomic, patching
    from jaxlens.circuits.chunks import map_chunks
    from jaxlens.errors import InputError
    from jaxlens.scale import distributed

    distributed.initialize(f"localhost:{o.port}", o.num_processes, o.process_id, timeout=o.timeout)
    out = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    if not o.init_only:
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


if __name__ == "__main__":
    sys.exit(main())
