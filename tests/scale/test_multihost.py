"""Multi-process sweeps: 2 processes x 4 simulated CPU devices on localhost (`jax.distributed`, gloo
collectives) give the single-process result; a process killed mid-sweep and a restart compute only the missing
chunks; bad layouts and foreign checkpoint directories are refused.

The workers (multihost_worker.py) share a persistent compilation cache, so only the first launch compiles.
The single-process reference runs here, on the 8 devices of tests/conftest.py, with the same chunks.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import multihost_worker as worker
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlens
from jaxlens import Patch, patching
from jaxlens.circuits.chunks import map_chunks
from jaxlens.errors import InputError
from jaxlens.scale import distributed, make_mesh, replicated

N_CHUNKS = 6  # 40 computed cells (2 layers x 4 positions x 5 heads) in chunks of 8 cells of one layer


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference():
    """The same sweep and map_chunks in this one process (8 devices, chunks of 8)."""
    params, cfg, corrupted, clean, kw, args, items = worker.problem()
    res = patching.sweep(params, cfg, corrupted, clean, worker.metric, **kw)
    mapped = map_chunks(worker.item_fn, args, items, chunk_size=worker.CHUNK)
    return res, mapped


def test_reference_is_the_plain_patched_forward(reference):
    """The single-process reference against one hand-made patched forward per cell (a few cells)."""
    params, cfg, corrupted, clean, kw, args, items = worker.problem()
    res, mapped = reference
    _, cache = jaxlens.forward(params, cfg, jnp.asarray(clean), cache_names=("blocks.attn.hook_z",))
    z = cache["blocks.attn.hook_z"]  # [layer batch pos head d_head]
    for layer, pos, head in [(0, 2, 1), (1, 3, 4), (0, 5, 0)]:
        mask = np.zeros(z.shape, bool)
        mask[layer, :, pos, head] = True
        patch = {"blocks.attn.hook_z": Patch(value=z, mask=jnp.asarray(mask))}
        logits, _ = jaxlens.forward(params, cfg, jnp.asarray(corrupted), interventions=patch)
        np.testing.assert_allclose(res.values[layer, pos, head], float(worker.metric(logits)), rtol=1e-5,
                                   atol=1e-7)
    assert np.ptp(res.values[:, 2:]) > 1e-3  # the cells differ: a result equal to the baseline would fail
    want = np.tanh(items.astype(np.float64) @ args["W"].T.astype(np.float64)).sum(1)
    np.testing.assert_allclose(mapped, want, rtol=1e-5)


def test_two_processes_give_the_single_process_result(tmp_path, jax_cache, reference):
    res, mapped = reference
    ckpt = tmp_path / "ckpt"
    outs = worker.launch(tmp_path, jax_cache, ["--ckpt", str(ckpt), "--other-sweep"])
    for i, out in enumerate(outs):
        assert int(out["process_count"]) == 2 and int(out["device_count"]) == 8
        np.testing.assert_allclose(out["values"], res.values, rtol=1e-6, atol=1e-7, err_msg=f"process {i}")
        np.testing.assert_allclose(out["map"], mapped, rtol=1e-6, atol=1e-7, err_msg=f"process {i}")
        assert int(out["chunks_run"]) == N_CHUNKS
        # another sweep in the same directory: refused on both processes, none hangs
        assert "holds a different sweep" in str(out["other_error"]), str(out["other_error"])
    first = str(outs[0]["other_error"])
    assert "fingerprint" in first and "Use a new directory" in first, first
    assert len(list((ckpt / "sweep").glob("chunk_*.npz"))) == N_CHUNKS
    assert len(list((ckpt / "map").glob("chunk_*.npz"))) == 3
    assert not list(ckpt.rglob(".*tmp"))
    # the directory is not tied to a process count: one process resumes it and computes nothing
    params, cfg, corrupted, clean, kw, *_ = worker.problem()
    calls = []
    again = patching.sweep(params, cfg, corrupted, clean, worker.metric, checkpoint_dir=ckpt / "sweep",
                           on_chunk=lambda d, t: calls.append(d), **kw)
    assert calls == []
    np.testing.assert_array_equal(again.values, outs[0]["values"])


def test_killed_process_then_restart_computes_only_missing_chunks(tmp_path, jax_cache, reference):
    res, _ = reference
    ckpt = tmp_path / "ckpt"
    # then process 1, stuck waiting for its peer, is killed too
    codes, logs = worker.launch(tmp_path, jax_cache, ["--ckpt", str(ckpt), "--kill-after", "2"],
                                expect_ok=False, grace=2)
    assert codes[0] == -signal.SIGKILL, logs[0][-3000:]  # process 0 was killed after storing its 2nd chunk
    stored = sorted(p.name for p in (ckpt / "sweep").glob("chunk_*.npz"))
    assert stored == ["chunk_000000.npz", "chunk_000001.npz"]
    outs = worker.launch(tmp_path, jax_cache, ["--ckpt", str(ckpt)])
    for i, out in enumerate(outs):
        assert int(out["chunks_run"]) == N_CHUNKS - 2, f"process {i} recomputed stored chunks"
        np.testing.assert_allclose(out["values"], res.values, rtol=1e-6, atol=1e-7, err_msg=f"process {i}")
    assert len(list((ckpt / "sweep").glob("chunk_*.npz"))) == N_CHUNKS


def test_process_count_that_does_not_match_the_coordinator(tmp_path, jax_cache):
    # process 1 is told 3 processes, the coordinator (process 0) 2: both raise, quickly
    codes, logs = worker.launch(tmp_path, jax_cache, ["--init-only", "--timeout", "20"], counts=(2, 3),
                                expect_ok=False, timeout=90)
    for code, log in zip(codes, logs, strict=True):
        assert code == 1, log[-3000:]
        assert "InputError: The processes disagree on num_processes (process 0: 2, process 1: 3)" in log, log
    # a coordinator told 2 processes, only one launched: a clear message, then JAX stops it (no hang)
    start = time.monotonic()
    codes, logs = worker.launch(tmp_path, jax_cache, ["--init-only", "--timeout", "2"], counts=(2,),
                                expect_ok=False, timeout=90)
    assert codes[0] != 0 and time.monotonic() - start < 60
    assert "not every process connected within 2 s" in logs[0] and "num_processes=2" in logs[0], logs[0]


def test_initialize_refuses_bad_arguments(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(InputError, match=r"JAX_NUM_PROCESSES must be an integer \(num_processes\); found 't"):
        distributed.initialize("localhost:1", None, 0)
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    with pytest.raises(InputError, match=r"process_id must be in 0 \.\. 1 \(num_processes=2\); found 2"):
        distributed.initialize("localhost:1", 2, 2)
    with pytest.raises(InputError, match="num_processes must be at least 1; found 0"):
        distributed.initialize("localhost:1", 0, 0)
    with pytest.raises(InputError, match=r"process_id must be an integer; found True \(bool\)"):
        distributed.initialize("localhost:1", 2, True)
    jax.devices()  # this process's devices have started: too late to join a job
    with pytest.raises(InputError, match="must run before anything uses a JAX device"):
        distributed.initialize("localhost:1", 2, 0)


def test_initialize_without_a_coordinator_says_what_is_missing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}
    code = "from jaxlens.scale import distributed; distributed.initialize(num_processes=2, process_id=0)"
    p = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert "InputError: Cannot start a multi-process job with coordinator_address=None" in p.stderr, p.stderr
    assert "JAX_COORDINATOR_ADDRESS" in p.stderr


def test_mesh_with_a_model_axis_keeps_params_sharded_on_it(reference):
    """Cells over `data` (4), weights over `model` (2): a leaf already sharded on the mesh is not re-placed,
    and the sweep and map_chunks equal the reference."""
    res, mapped = reference
    params, cfg, corrupted, clean, kw, args, items = worker.problem()
    mesh = make_mesh(model=2)
    w_in = jax.device_put(params["blocks"]["mlp"]["W_in"], NamedSharding(mesh, P(None, None, "model")))
    params = {**params, "blocks": {**params["blocks"], "mlp": {**params["blocks"]["mlp"], "W_in": w_in}}}
    placed = distributed.place(params, replicated(mesh))
    assert placed["blocks"]["mlp"]["W_in"] is w_in
    assert placed["blocks"]["attn"]["W_Q"].sharding == replicated(mesh)
    got = patching.sweep(params, cfg, corrupted, clean, worker.metric, mesh=mesh, **kw)
    np.testing.assert_allclose(got.values, res.values, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(map_chunks(worker.item_fn, args, items, chunk_size=worker.CHUNK, mesh=mesh),
                               mapped, rtol=1e-6, atol=1e-7)


def test_mesh_and_devices_together_are_refused():
    params, cfg, corrupted, clean, kw, *_ = worker.problem()
    with pytest.raises(InputError, match="Pass either `mesh` or `devices`, not both"):
        patching.sweep(params, cfg, corrupted, clean, worker.metric, mesh=make_mesh(),
                       devices=jax.devices()[:1], **kw)
