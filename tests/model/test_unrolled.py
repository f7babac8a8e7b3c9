"""The unrolled fast path (`layout.prepare`: per-layer weight views, transposed unembedding) against the scan:
same logits, same cached activations under every name, same interventions and layer bounds, on GPT-2-like,
Llama-like (GQA, rotary, windows) and MoE / parallel-attention configs; the layout's views alias the stacked
buffers and its knobs and limits hold."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import Add, Fn, Patch, Scale, hook_names, testing
from jaxlens.errors import InputError
from jaxlens.model import layout
from jaxlens.model.attention import KVState, _project
from jaxlens.model.forward import run, unembed

CONFIGS = {
    "gpt2": testing.tiny_config(),
    "llama": testing.tiny_config(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                                 act_fn="silu", n_key_value_heads=1, window_sizes=(None, 3, None)),
    "moe_parallel": testing.tiny_config(normalization_type="RMS", positional_embedding_type="rotary",
                                        gated_mlp=True, act_fn="silu", parallel_attn_mlp=True, num_experts=3,
                                        experts_per_token=2),
}
RUN = jax.jit(lambda params, lay, tokens, ivs, cfg, names, start, stop: run(
    params, cfg, tokens, interventions=ivs, cache_names=names, start_at_layer=start, stop_at_layer=stop,
    layout=lay)[:2], static_argnames=("cfg", "names", "start", "stop"))


@pytest.fixture(autouse=True)
def _transpose_tiny_unembeddings(monkeypatch):
    monkeypatch.setattr(layout, "TRANSPOSED_UNEMBED_MIN_BYTES", 0)  # tiny models take the transposed W_U too
    monkeypatch.setattr(layout, "UNROLL_MIN_LAYER_BYTES", 0)  # and unroll by default


def both(params, cfg, tokens, ivs=None, names=(), start=None, stop=None):
    """(scan result, unrolled result) of the same call."""
    lay = layout.prepare(params, cfg, unroll=True)
    assert lay is not None and len(lay.layers) == cfg.n_layers
    kw = dict(cfg=cfg, names=tuple(names), start=start, stop=stop)
    return RUN(params, None, tokens, ivs or {}, **kw), RUN(params, lay, tokens, ivs or {}, **kw)


def assert_same(a, b):
    """Trees equal to float32 rounding (different summation orders, 1e-5 relative)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(x, y)
        else:
            finite = np.abs(x[np.isfinite(x)])  # attention scores are -inf where masked
            scale = max(1.0, float(finite.max())) if finite.size else 1.0
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * scale)


def setup(family, shape):
    cfg = CONFIGS[family]
    params = jaxlens.init_params(cfg, jax.random.key(1), scale=0.3)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.d_vocab, shape))
    return cfg, params, tokens


# (1, 5): batch * pos < d_head, the head-batched projections; (2, 7): the plain einsum
@pytest.mark.parametrize("family,shape", [("gpt2", (1, 5)), ("gpt2", (2, 7)), ("llama", (1, 5)),
                                          ("moe_parallel", (1, 5))])
def test_every_cached_activation_and_the_logits_agree(family, shape):
    cfg, params, tokens = setup(family, shape)
    table = hook_names.decoder_table(cfg)
    every = family == "gpt2" and shape == (1, 5)  # the optional hooks too (split inputs, per-head results)
    names = (*(table.all_names() if every else table.default_names()), "blocks.1.attn.hook_result",
             "blocks.attn.hook_pattern", "blocks.hook_mlp_out")
    (want, cache_s), (got, cache_u) = both(params, cfg, tokens, names=names)
    assert set(cache_s) == set(names)
    assert_same(want, got)
    assert_same(cache_s, cache_u)
    assert float(jnp.abs(want).max()) > 0.1  # not a trivially zero model


@pytest.mark.parametrize("family,bounds", [("gpt2", ((1, None), (None, 2))), ("llama", ((-2, -1),)),
                                           ("moe_parallel", ((1, 2),))])
def test_interventions_and_layer_bounds_agree(family, bounds):
    cfg, params, tokens = setup(family, (1, 5))
    _, clean = jaxlens.forward(params, cfg, tokens, cache_names=["blocks.0.hook_resid_post"])
    patch = clean["blocks.0.hook_resid_post"] * 0.5
    ivs = {
        "blocks.1.hook_resid_pre": Patch(value=patch),
        "blocks.attn.hook_z": Fn(lambda z, hook: z.at[:, :, 1].multiply(  # every layer; a traced index
            0.25 + jnp.asarray(hook.layer_index, z.dtype))),
        "blocks.hook_mlp_out": Scale(factor=jnp.asarray([1.0, 0.5, 2.0])[:, None, None, None]),  # stacked
        "blocks.2.attn.hook_pattern": Fn(lambda p, hook: p * (hook.layer_index + 1.0) / 3.0),
        "hook_embed": Add(delta=jnp.full((cfg.d_model,), 0.1)),
    }
    names = ("blocks.2.hook_resid_pre", "blocks.hook_attn_out", "blocks.1.attn.hook_z")
    (want, cache_s), (got, cache_u) = both(params, cfg, tokens, ivs, names)
    assert_same((want, cache_s), (got, cache_u))
    plain, _ = jaxlens.forward(params, cfg, tokens)
    assert float(jnp.abs(want - plain).max()) > 1e-3  # the interventions changed something

    resid = clean["blocks.0.hook_resid_post"]
    bounded = {k: v for k, v in ivs.items() if k != "hook_embed"}
    bounded["blocks.hook_mlp_out"] = Scale(factor=jnp.asarray([1.0, 0.5, 2.0])[:, None, None, None])
    for start, stop in bounds:
        x = resid if start is not None else tokens
        (want, cache_s), (got, cache_u) = both(params, cfg, x, bounded, ("blocks.hook_resid_post",), start,
                                               stop)
        assert_same((want, cache_s), (got, cache_u))


def test_kv_cache_decoding_agrees():
    cfg, params, tokens = setup("llama", (2, 6))
    kv0 = KVState(*(jnp.zeros((cfg.n_layers, 2, 8, cfg.n_key_value_heads, cfg.d_head)),) * 2)
    lay = layout.prepare(params, cfg, unroll=True)
    step = jax.jit(lambda lay, toks, kv, off: run(params, cfg, toks, kv_cache=kv, pos_offset=off, layout=lay))
    out = {}
    for name, lay_ in (("scan", None), ("unrolled", lay)):
        first, _, kv = step(lay_, tokens[:, :5], kv0, 0)
        second, _, kv = step(lay_, tokens[:, 5:], kv, 5)
        out[name] = (first, second, kv)
    assert_same(out["scan"], out["unrolled"])
    full, _ = jaxlens.forward(params, cfg, tokens)
    np.testing.assert_allclose(np.asarray(out["unrolled"][1][:, 0]), np.asarray(full[:, 5]), rtol=1e-5,
                               atol=1e-5)


def test_head_batched_projection_and_transposed_unembedding_match_numpy():
    rng = np.random.RandomState(3)
    W = rng.randn(5, 40, 8).astype(np.float32)
    for shape in [(1, 3, 40), (2, 6, 40)]:  # batch * pos below and above d_head
        x = rng.randn(*shape).astype(np.float32)
        want = np.einsum("bpd,hde->bphe", x.astype(np.float64), W)
        np.testing.assert_allclose(np.asarray(_project(jnp.asarray(x), jnp.asarray(W))), want, rtol=1e-5,
                                   atol=1e-5)
    cfg = CONFIGS["gpt2"]
    params = {"unembed": {"W_U": jnp.asarray(rng.randn(40, 97), jnp.float32),
                          "b_U": jnp.asarray(rng.randn(97), jnp.float32)}}
    x = rng.randn(2, 3, 40).astype(np.float32)
    want = x.astype(np.float64) @ np.asarray(params["unembed"]["W_U"]) + np.asarray(params["unembed"]["b_U"])
    got = unembed(params, cfg, jnp.asarray(x), W_U_T=params["unembed"]["W_U"].T)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_views_alias_the_stacked_buffers_and_the_layout_is_made_once():
    cfg, params, _ = setup("gpt2", (1, 5))
    lay = layout.prepare(params, cfg)
    stacked = params["blocks"]["mlp"]["W_in"]
    per_layer = stacked[0].size * stacked.dtype.itemsize
    for l in range(cfg.n_layers):
        view = lay.layers[l]["mlp"]["W_in"]
        assert view.unsafe_buffer_pointer() - stacked.unsafe_buffer_pointer() == l * per_layer  # no copy
        np.testing.assert_array_equal(np.asarray(view), np.asarray(stacked[l]))
    np.testing.assert_array_equal(np.asarray(lay.W_U_T), np.asarray(params["unembed"]["W_U"]).T)
    assert layout.prepare(params, cfg) is lay
    other = jax.tree_util.tree_map(lambda x: x + 0, params)
    assert layout.prepare(other, cfg) is not lay


def test_the_cached_layout_goes_with_its_params():
    cfg, params, _ = setup("gpt2", (1, 5))
    lay = layout.prepare(params, cfg)
    n = len(layout._cache)
    probe = weakref.ref(params["blocks"]["mlp"]["W_in"])
    del params, lay
    gc.collect()
    assert probe() is None and len(layout._cache) == n - 1


def test_when_the_layout_applies(monkeypatch):
    cfg, params, _ = setup("gpt2", (1, 5))
    assert layout.prepare(params, cfg, unroll=False) is None
    assert layout.prepare(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), cfg) is None
    assert layout.prepare(jax.tree_util.tree_map(np.asarray, params), cfg) is None  # not jax arrays
    monkeypatch.setattr(layout, "UNROLL_MAX_LAYERS", 2)  # the knob: deeper models keep the scan
    assert layout.prepare(params, cfg) is None
    monkeypatch.setattr(layout, "UNROLL_MAX_LAYERS", 3)
    assert layout.prepare(params, cfg) is not None
    monkeypatch.setattr(layout, "UNROLL_MIN_LAYER_BYTES", 1 << 20)  # the default: tiny layers keep the scan
    assert layout.prepare(params, cfg) is None
    monkeypatch.setattr(layout, "UNROLL_MIN_LAYER_BYTES", 0)
    monkeypatch.setattr(layout, "TRANSPOSED_UNEMBED_MAX_BYTES", 0)
    assert layout.prepare(params, cfg).W_U_T is None
    monkeypatch.setattr(layout, "TRANSPOSED_UNEMBED_MAX_BYTES", 1 << 30)
    monkeypatch.setattr(layout, "TRANSPOSED_UNEMBED_MIN_BYTES", 1 << 22)  # the default: small W_U kept
    lay = layout.prepare(params, cfg)
    assert lay.W_U_T is None and lay.layers is not None
    seen = []
    jax.jit(lambda p: seen.append(layout.prepare(p, cfg)) or 0)(params)  # tracers: nothing to view
    assert seen == [None]


def test_the_facade_runs_the_fast_path_with_the_same_results():
    cfg, params, tokens = setup("gpt2", (1, 5))
    model = jaxlens.HookedTransformer(cfg, params)
    assert layout.prepare(model.params, cfg) is not None
    want, cache = jaxlens.forward(params, cfg, tokens, cache_names=["blocks.1.hook_resid_post"])
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(want), rtol=1e-5, atol=1e-5)
    _, got = model.run_with_cache(tokens)
    np.testing.assert_allclose(np.asarray(got["blocks.1.hook_resid_post"]),
                               np.asarray(cache["blocks.1.hook_resid_post"]), rtol=1e-5, atol=1e-5)


def test_a_layout_for_another_depth_is_refused():
    cfg, params, tokens = setup("gpt2", (1, 5))
    lay = layout.prepare(params, cfg)
    short = layout.Layout(lay.layers[:2], lay.W_U_T)
    with pytest.raises(InputError, match="layout has 2 layers; the model has n_layers=3"):
        run(params, cfg, tokens, layout=short)
