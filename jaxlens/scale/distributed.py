"""Several processes, one program: `jax.distributed` set up, and the few helpers a multi-host sweep needs.

In multi-controller JAX (JAX's own distributed runtime; no other engine) every process runs the same program.
After `initialize`, `jax.devices()` lists the devices of every process, so `jaxlens.scale.make_mesh()` and the
sweeps (`jaxlens.patching.sweep`, `jaxlens.circuits.chunks.map_chunks`) split their cells over all of them.
Inputs are global arrays made from values that are equal on every process (`place`); results sharded across
processes come back to every process with `gather`; files are written by process 0 alone (`is_writer`).

    from jaxlens.scale import distributed
    distributed.initialize()            # first thing: before anything touches a jax device
    result = patching.sweep(...)        # every process: the same call, the same result
    if distributed.is_writer():
        result.to_dataframe().to_csv("result.csv")

The launch recipes (TPU pod slice, SLURM, plain environment variables, localhost) are in
docs/guides/multihost.md.
"""

import os
import sys
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxlens.errors import InputError
from jaxlens.scale.mesh import make_mesh


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None, *,
               timeout: float = 300) -> None:
    """Join this process to a multi-process JAX job (`jax.distributed.initialize`), checking its layout.

    Each argument left None is read from the environment: JAX_COORDINATOR_ADDRESS ("host:port" of process 0),
    JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS ("0,1"); what is still missing is left to JAX's
    own cluster detection (SLURM, Open MPI, a Cloud TPU pod slice, Kubernetes), which needs none of them.
    A second call in the same process does nothing.

    After connecting, the processes compare their `num_processes`; a process told another count than the
    coordinator's raises on every process. A coordinator that waits for processes that never come (fewer
    launched than `num_processes`, or started elsewhere) cannot raise: after `timeout` seconds this prints
    what is wrong to stderr and JAX then stops the process (exit status 134, "DEADLINE_EXCEEDED").

    Args:
        coordinator_address: "host:port" of process 0, reachable from every process.
        num_processes: processes in the job.
        process_id: this process's number, 0 .. num_processes - 1.
        local_device_ids: the local devices this process uses (GPU jobs with one process per device).
        timeout: seconds to wait for every process to connect.

    Raises:
        InputError: arguments or environment variables that are missing (and not detected), not integers or
            out of range; a call after JAX already started its devices; processes that disagree on the
            process count.
    """
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _int_or_env(num_processes, "num_processes", "JAX_NUM_PROCESSES")
    process_id = _int_or_env(process_id, "process_id", "JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise InputError(f"num_processes must be at least 1; found {num_processes}.")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise InputError(f"process_id must be in 0 .. {num_processes - 1} (num_processes={num_processes}); "
                         f"found {process_id}. Number the processes 0, 1, ..., num_processes - 1.")
    where = (f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, "
             f"process_id={process_id}")
    done = threading.Event()
    watch = threading.Thread(target=_warn_if_stuck, args=(done, float(timeout), where), daemon=True)
    watch.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                                   initialization_timeout=max(1, round(timeout)))
    except (ValueError, TypeError) as e:  # jax's own checks, made before anything starts
        raise InputError(
            f"Cannot start a multi-process job with {where}: {e} Pass the missing values (or set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID), or launch under SLURM, Open MPI "
            "or on a TPU pod slice, where JAX finds them itself.") from e
    except RuntimeError as e:
        if "must be called before" not in str(e):
            raise
        raise InputError("jaxlens.scale.distributed.initialize must run before anything uses a JAX device "
                         "(jax.devices(), an array, a jit call, loading a model); call it first.") from e
    finally:
        done.set()
    if num_processes is not None:
        counts = np.asarray(multihost_utils.process_allgather(np.int32(num_processes))).reshape(-1)
        if (counts != jax.process_count()).any():
            told = ", ".join(f"process {i}: {int(c)}" for i, c in enumerate(counts))
            raise InputError(
                f"The processes disagree on num_processes ({told}); the coordinator at {coordinator_address} "
                f"has {jax.process_count()} processes. Start every process with the same num_processes "
                "(JAX_NUM_PROCESSES), equal to the number launched.")


def is_writer() -> bool:
    """True on the process that writes shared files (process 0); every process computes the same results."""
    return jax.process_index() == 0


def data_mesh(mesh: Mesh | None = None, devices: Sequence | None = None) -> Mesh:
    """The mesh a sweep splits its cells over, along `data`: `mesh` itself, a `data` x 1 mesh over `devices`,
    or by default over every device of every process (`make_mesh()`; one process: its local devices).

    Raises:
        InputError: both `mesh` and `devices`, or a mesh without a `data` axis.
    """
    if mesh is None:
        return make_mesh(devices=devices)
    if devices is not None:
        raise InputError("Pass either `mesh` or `devices`, not both: with a mesh, the cells are split over "
                         "its `data` axis.")
    if "data" not in mesh.axis_names:
        raise InputError(f"The mesh has axes {mesh.axis_names}; sweeps split their cells over a `data` axis. "
                         "Build it with jaxlens.scale.make_mesh.")
    return mesh


def place(tree, sharding: NamedSharding):
    """Every leaf as a global array with `sharding`, from values equal on every process. A leaf already
    sharded on `sharding.mesh` (weights split over `model`, say) is kept as it is.
    """
    mesh = sharding.mesh

    def one(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree_util.tree_map(one, tree)


def gather(x: jax.Array) -> np.ndarray:
    """The whole value of `x` on every process (`process_allgather` when its shards span processes)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast(tree):
    """Process 0's values of a pytree of numpy arrays (same shapes and dtypes everywhere) on every process."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)


def check_same(digest: str, what: str) -> None:
    """Raise unless every process computed the same hex `digest` of `what` (a sweep's plan, say): in
    multi-controller JAX, processes that disagree would run different programs and hang.

    Raises:
        InputError: a process whose digest differs from process 0's.
    """
    if jax.process_count() == 1:
        return
    words = np.frombuffer(bytes.fromhex(digest[:32].ljust(32, "0")), np.int32)
    every = np.asarray(multihost_utils.process_allgather(words)).reshape(jax.process_count(), -1)
    odd = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if odd:
        raise InputError(f"Process(es) {odd} computed a different {what} than process 0. Every process must "
                         "make the same call with the same values (params, prompts, seeds, options).")


def min_over_processes(n: int) -> int:
    """The smallest of `n` (a non-negative byte count) over every process, to KiB."""
    if jax.process_count() == 1:
        return n
    kib = np.int32(min(n // 1024, 2**31 - 1))
    return int(np.asarray(multihost_utils.process_allgather(kib)).min()) * 1024


def _int_or_env(value, name: str, env: str) -> int | None:
    if value is None:
        text = os.environ.get(env, "").strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{env} must be an integer ({name}); found {text!r}.") from None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{name} must be an integer; found {value!r} ({type(value).__name__}).")
    return int(value)


def _warn_if_stuck(done: threading.Event, timeout: float, where: str) -> None:
    if done.wait(timeout):
        return
    sys.stderr.write(
        f"jaxlens.scale.distributed.initialize: not every process connected within {timeout:g} s ({where}). "
        "The coordinator waits for num_processes processes: check that exactly that many were launched, "
        "with process ids 0 .. num_processes - 1, all pointing at the same coordinator address (process 0's "
        "host and a free port), and that the port is reachable. JAX will now stop this process.\n")
    sys.stderr.flush()
