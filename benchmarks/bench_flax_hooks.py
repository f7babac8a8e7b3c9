"""Overhead of instrumenting a third-party Flax model (transformers 4.57's Flax GPT-2, linen) with
`jaxlens.flax.HookedFlax`: no hooks, caching every hook point, one patch, each compiled, against the model's
own jitted forward. Targets (issue 12): no hooks = no overhead after compilation; full caching within 1.3x.

    .venv/bin/python benchmarks/bench_flax_hooks.py [--layers 4 --d-model 256 --pos 64 --batch 4 --repeats 20]

transformers 5 has no Flax models, so the script re-runs itself in the `flax-gpt2` reference environment
(tests/ref_envs.py, built once and cached) with jaxlens imported from this source tree.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--pos", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inside:
        _bench(a)
    else:
        _reexec()


def _reexec() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib.util

    import ref_envs

    # the environment the GPT-2 test builds (tests/flax is not a package: load the file by path)
    spec = importlib.util.spec_from_file_location("t", ROOT / "tests" / "flax" / "test_linen_gpt2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    exe = ref_envs.ensure_env("flax-gpt2", mod.STEPS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    sys.exit(subprocess.run([str(exe), __file__, "--inside", *sys.argv[1:]], env=env).returncode)


def _time_all(runs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{label: (compile + first call seconds, median seconds)}; calls interleaved round-robin so that load
    from other processes affects every variant alike."""
    import jax

    first, times = {}, {k: [] for k in runs}
    for label, fn in runs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first[label] = time.perf_counter() - t0
    for _ in range(repeats):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[label].append(time.perf_counter() - t0)
    return {k: (first[k], sorted(v)[len(v) // 2]) for k, v in times.items()}


def _bench(a) -> None:
    import jax
    import jax.numpy as jnp
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _machine import cpu_model

    from jaxlens.flax import HookedFlax
    from jaxlens.interventions import Patch

    cfg = GPT2Config(n_embd=a.d_model, n_layer=a.layers, n_head=max(1, a.d_model // 64), vocab_size=5000,
                     n_positions=max(128, a.pos))
    model = FlaxGPT2LMHeadModel(cfg, seed=0, dtype=jnp.float32)
    module, variables = model.module, {"params": model.params}
    ids = jax.random.randint(jax.random.key(0), (a.batch, a.pos), 0, cfg.vocab_size)
    args = (ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(a.pos), ids.shape))
    hooked = HookedFlax(module, variables)
    n_hooks = len(hooked.hook_names(*args, deterministic=True))
    name = "transformer.h.1.attn.__call__[0]"
    patch = {name: Patch(jnp.zeros((a.batch, a.pos, a.d_model)), (jnp.arange(a.pos) == 3)[:, None])}

    plain = jax.jit(lambda v, *x: module.apply(v, *x, deterministic=True).logits)
    runs = {
        "plain module.apply (jit)": lambda: plain(variables, *args),
        "HookedFlax, no hooks": lambda: hooked.forward(*args, deterministic=True).logits,
        f"HookedFlax, caching all {n_hooks} hooks": lambda: hooked.run_with_cache(*args, deterministic=True),
        "HookedFlax, one patch": lambda: hooked.forward(*args, interventions=patch,
                                                        deterministic=True).logits,
    }
    print(f"Flax GPT-2 (linen, transformers 4.57): {a.layers} layers, d_model {a.d_model}, batch {a.batch} x "
          f"{a.pos} tokens; {jax.devices()[0].platform}, {cpu_model()}; median of {a.repeats}")
    base = None
    for label, (first, med) in _time_all(runs, a.repeats).items():
        base = base or med
        print(f"  {label:<40} {med * 1e3:8.2f} ms  ({med / base:4.2f}x)   first call {first:6.2f} s")


if __name__ == "__main__":
    main()
