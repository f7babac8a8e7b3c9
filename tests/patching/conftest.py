"""Patching tests: tiny random models, prompt pairs and a plain reference (one patched forward per cell)."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import HookedTransformer, Patch
from jaxlens.config import Config
from jaxlens.testing import tiny_config

N_POS = 7


def gpt2_like() -> Config:
    return tiny_config()


def llama_gqa_like() -> Config:
    return Config(d_model=40, n_layers=3, n_heads=4, d_head=10, n_key_value_heads=2, d_mlp=56, d_vocab=97,
                  n_ctx=32, normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                  act_fn="silu", eps=1e-6)


def random_params(cfg: Config, seed: int):
    """Random params (numpy, fast): weights N(0, 0.16), gains 1 + N(0, 0.1), biases N(0, 0.1); large enough
    activations for patching to matter. Shapes from `jaxlens.param_shapes`."""
    rng = np.random.default_rng(seed)
    table = jaxlens.param_shapes(cfg)
    is_entry = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
    paths, tree = jax.tree_util.tree_flatten_with_path(table, is_leaf=is_entry)
    leaves = []
    for path, (_axes, shape) in paths:
        name = jax.tree_util.keystr(path)
        if name.endswith("['w']"):
            x = 1 + 0.1 * rng.standard_normal(shape)
        elif "['b" in name:
            x = 0.1 * rng.standard_normal(shape)
        else:
            x = 0.16 * rng.standard_normal(shape)
        leaves.append(jnp.asarray(x, jnp.float32))
    return jax.tree_util.tree_unflatten(tree, leaves)


def prompt_pair(cfg: Config, batch: int = 2, seed: int = 0):
    """Clean and corrupted prompts [batch N_POS] differing at positions 2 and 4."""
    clean = np.random.default_rng(seed).integers(0, cfg.d_vocab, (batch, N_POS)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 2] = (clean[:, 2] + 11) % cfg.d_vocab
    corrupted[:, 4] = (clean[:, 4] + 23) % cfg.d_vocab
    return jnp.asarray(clean), jnp.asarray(corrupted)


def logit_diff(logits):
    """Mean over the batch of logit[3] - logit[7] at the last position."""
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


RELS = ("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out", "attn.hook_z", "attn.hook_q",
        "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "mlp.hook_post")


class Setup:
    """A model, a prompt pair, the clean cache (per-layer TL names, like run_with_cache's) and the metric."""

    def __init__(self, cfg: Config, seed: int):
        self.cfg = cfg
        self.params = random_params(cfg, seed)
        self.model = HookedTransformer(cfg, self.params)
        self.clean, self.corrupted = prompt_pair(cfg, seed=seed)
        # stacked names compile faster than the per-layer ones; split them as run_with_cache would return them
        _, stacked = _forward(self.params, cfg, self.clean, cache_names=tuple(f"blocks.{r}" for r in RELS))
        self.stacked = {k.removeprefix("blocks."): v for k, v in stacked.items()}
        per_layer = {f"blocks.{l}.{r}": v[l] for r, v in self.stacked.items() for l in range(cfg.n_layers)}
        self.cache = jaxlens.ActivationCache(per_layer, cfg, self.params)
        self.metric = logit_diff


_forward = jax.jit(jaxlens.forward, static_argnames=("cfg", "cache_names"))


@pytest.fixture(scope="session")
def gpt2():
    return Setup(gpt2_like(), seed=1)


@pytest.fixture(scope="session")
def llama():
    return Setup(llama_gqa_like(), seed=2)


@pytest.fixture(scope="session")
def one_layer():
    """A one-layer GPT-2-like model (hand counts of a sweep's plan)."""
    return Setup(tiny_config(n_layers=1), seed=3)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def setup(request):
    return request.getfixturevalue(request.param)


@functools.cache
def _patched_metric(cfg: Config, rels: tuple[str, ...], metric):
    """A jitted forward with a Patch at `blocks.<rel>` for each rel (every layer's key; masks pick the cells).

    One compile serves every hook in `rels`: the hooks not under test get an all-False mask (no change)."""
    def f(params, tokens, values, masks):
        iv = {f"blocks.{r}": Patch(value=values[r], mask=masks[r]) for r in rels}
        logits, _ = jaxlens.forward(params, cfg, tokens, interventions=iv)
        return metric(logits)
    return jax.jit(f)


@pytest.fixture(scope="session")
def ref():
    """The plain reference function (see `reference`)."""
    return reference


def reference(s: Setup, rel: str, cells, source=None, metric=None):
    """Plain reference: for each (grid index, layer, activation index) one patched forward.

    The activation at blocks.<layer>.<rel> gets the clean value (or `source[layer]`, source stacked over
    layers) where the index selects; the other layers and entries keep the corrupted run's values.
    """
    rels = RELS if rel in RELS else (rel,)
    values = {r: s.stacked[r] for r in rels if r != rel}
    values[rel] = jnp.asarray(s.stacked[rel] if source is None else source)
    off = {r: jnp.zeros(v.shape, bool) for r, v in values.items()}
    fn = _patched_metric(s.cfg, rels, metric or s.metric)
    out = {}
    for where, layer, index in cells:
        mask = np.zeros(values[rel].shape, bool)
        mask[(layer,) + tuple(index)] = True
        out[where] = np.asarray(fn(s.params, s.corrupted, values, {**off, rel: jnp.asarray(mask)}),
                                np.float64)
    shape = tuple(max(w[i] for w in out) + 1 for i in range(len(next(iter(out)))))
    grid = np.zeros(shape + next(iter(out.values())).shape, np.float64)  # a trailing axis for vector metrics
    for where, v in out.items():
        grid[where] = v
    return grid


@pytest.fixture(scope="session")
def reftools():
    """The reference's pieces, for tests building on them: RELS, the jitted forward and `_patched_metric`."""
    return types.SimpleNamespace(RELS=RELS, forward=_forward, patched_metric=_patched_metric)
