"""Loading streams tensors: the peak memory of a load stays near one copy of the model.

A random GPT-2-shaped checkpoint (~160 MB of safetensors, ~205 MB of float32 params once the tied unembedding
is its own [d_model, d_vocab] array) is written with numpy, then loaded in a fresh subprocess that imports
jaxlens, starts the JAX backend, records its peak RSS and loads. The growth of the peak over that baseline,
divided by the bytes of the params it ends with, is the ratio checked here. The peak is the kernel's VmHWM
(/proc/self/status), which is what `resource.getrusage(...).ru_maxrss` reports too, except that ru_maxrss
starts from the parent's peak when a big process (pytest, with torch imported) spawns the child, which would
hide the growth.

Measured on the CI-like 2-core machine: from_pretrained_no_processing 1.23x (the numpy copy shrinks while the
jax copy grows, so the peak is one model plus its largest tensor); from_pretrained with TransformerLens's
weight processing 1.74x (one model, ~45 MB of XLA runtime, and the temporaries of the step that folds ln_final
into and centres the [768, 16000] unembedding: two tensors of that size). Without streaming these were 2-3x.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlens import testing

D, L, V, C = 768, 4, 16000, 1024  # GPT-2-small widths, fewer layers and a smaller vocabulary

CHILD = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from jaxlens import HookedTransformer
def peak():  # KiB: this process image's high-water mark (VmHWM), and ru_maxrss
    hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    return hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jnp.zeros(1).block_until_ready()  # start the backend before the baseline
base = peak()
load = getattr(HookedTransformer, sys.argv[2])
params = jax.block_until_ready(load(sys.argv[1]).params)
growth = peak()[0] - base[0]
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
print(json.dumps({"growth": growth * 1024, "params": nbytes}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return testing.write_random_gpt2(tmp_path_factory.mktemp("gpt2_200mb"), D, L, V, C)


def _peak_ratio(path, how: str) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one host device, as users have
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["params"] > 190e6  # big enough that the runtime's own memory is small beside it
    return r["growth"] / r["params"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc/self/status")
@pytest.mark.parametrize("how,limit", [("from_pretrained_no_processing", 1.5), ("from_pretrained", 2.0)])
def test_peak_memory_while_loading(checkpoint, how, limit):
    ratio = _peak_ratio(checkpoint, how)
    assert 0.9 < ratio <= limit, f"{how}: peak RSS grew by {ratio:.2f}x the model's size"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stream_transform_equals_the_whole_transform(dtype):
    """Batched, donating, one-step-at-a-time evaluation gives exactly `jax.jit(fn)(params)`."""
    import jax
    import jax.numpy as jnp

    from jaxlens import init_params
    from jaxlens._loading import numpy_to_jax, stream_transform
    from jaxlens.weight_processing import process_weights

    cfg = testing.tiny_config(gated_mlp=True, act_fn="silu", n_key_value_heads=1, normalization_type="RMS")
    dt = getattr(jnp, dtype)

    def fn(p):
        return jax.tree_util.tree_map(lambda x: x.astype(dt), process_weights(cfg, p)[1])

    params = init_params(cfg, jax.random.key(3))
    want = jax.jit(fn)(params)
    got = stream_transform(fn, numpy_to_jax(jax.tree_util.tree_map(np.asarray, params)))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
        assert b.dtype == dt and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
