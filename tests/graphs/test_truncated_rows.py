"""The truncated backward (issue 11 speed): attribution rows computed through only the layers their targets
read, with the clean run's patterns and norm scales as constants, sorted by layer and cut to a few depths,
equal the rows of one untruncated vjp of the frozen forward (stop_gradient, every layer) contracted by hand
with the sources' vectors taken from the transcoder modules and the model's own cache; and the row program at
every depth equals the full-depth one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import forward
from jaxlens.graphs import attribute
from jaxlens.graphs.attribute import _depths, _rows_jit, _site_layout, _with_error_rows
from jaxlens.graphs.replacement import (
    Sources,
    embedding,
    frozen_forward,
    numpy_decoder_rows,
    transcoder_set,
    zero_sources,
)
from tests.graphs.graph_models import TOKENS, _inputs, _read_name, random_transcoders, tiny_model

N_LAYERS = 7  # depths 1, 2, 4, 6, 7: buckets 4 and 6 round target layers 2 and 4 up

CASES = [  # family, transcoder kind, input hook (post-norms: test_frozen_constants_keep_the_jacobian)
    ("llama", "skip", "mlp.hook_in"),
    ("gpt2", "clt", "hook_resid_mid"),
]


def _reference_rows(model, tcs, hook, graph):
    """[n_features + n_logits, n_nodes] every target row by one vjp of the untruncated frozen forward
    (stop_gradient: no constants, every layer), dotted with source vectors built from the modules."""
    params, cfg = model.params, model.cfg
    L, P, D = cfg.n_layers, graph.n_pos, cfg.d_model
    ts = transcoder_set(tcs, cfg)
    tokens = jnp.asarray(graph.tokens)[None]
    resid0 = embedding(params, cfg, tokens)
    _, vjp = jax.vjp(lambda s: (lambda o: (o.inputs, o.final))(frozen_forward(params, cfg, ts, resid0, s)),
                     zero_sources(cfg, P))
    feats = graph.active_features[graph.selected_features]
    W_enc = [np.asarray(tcs[l].W_enc[...]) for l in range(L)] if isinstance(tcs, dict) else \
        np.asarray(tcs.W_enc[...])
    cts = []
    for l, p, f in feats:
        c = np.zeros((L, P, D), np.float32)
        c[l, p] = W_enc[l][:, f]
        cts.append((c, np.zeros((P, D), np.float32)))
    W_U = np.asarray(params["unembed"]["W_U"])
    for t in graph.logit_tokens:
        c = np.zeros((P, D), np.float32)
        c[P - 1] = W_U[:, t] - W_U.mean(1)
        cts.append((np.zeros((L, P, D), np.float32), c))
    stacked = (jnp.asarray(np.stack(x)) for x in zip(*cts, strict=True))
    g = jax.jit(jax.vmap(lambda a, b: vjp((a, b))[0]))(*stacked)
    g_mlp, g_embed = np.asarray(g.mlp_out, np.float64), np.asarray(g.embed, np.float64)

    _, cache = forward(params, cfg, tokens, cache_names=["blocks.hook_mlp_out", f"blocks.{_read_name(hook)}"])
    x = _inputs(params, cfg, cache, hook)
    recon = (jnp.stack([tcs[l](x[l]) for l in range(L)]) if isinstance(tcs, dict)
             else jnp.moveaxis(tcs(jnp.moveaxis(x, 0, 1)), 0, 1))
    errors = np.array(cache["blocks.hook_mlp_out"][:, 0] - recon, np.float64)
    errors[:, :graph.zero_positions] = 0
    cols = []
    for (l, p, f), a in zip(graph.active_features[graph.selected_features],
                            graph.activation_values[graph.selected_features], strict=True):
        if isinstance(tcs, dict):
            cols.append(g_mlp[:, l, p] @ (a * np.asarray(tcs[l].W_dec[...])[f]))
        else:
            W = np.asarray(tcs.W_dec[...])[l, f]  # [layer(target) d_model]
            cols.append(sum(g_mlp[:, lo, p] @ (a * W[lo]) for lo in range(l, L)))
    cols += list(np.einsum("blpd,lpd->blp", g_mlp, errors).reshape(len(cts), -1).T)
    W_E = np.asarray(params["embed"]["W_E"])
    cols += list(np.einsum("bpd,pd->bp", g_embed, W_E[graph.tokens]).T)
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("family,kind,hook", CASES)
def test_truncated_rows_equal_one_full_backward(family, kind, hook):
    model = tiny_model(family, n_layers=N_LAYERS)
    tcs = random_transcoders(model.cfg, kind, hook)
    graph = attribute(model, tcs, TOKENS, batch_size=4)  # several chunks, at every depth
    assert len(set(graph.active_features[:, 0])) == N_LAYERS  # targets at every layer
    want = _reference_rows(model, tcs, hook, graph)
    A = graph.adjacency
    got = np.concatenate([A[:graph.n_features], A[graph.logit_offset:]])[:, :graph.logit_offset]
    scale = np.abs(want).max(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale.max())
    # a feature's row vanishes on sources at or above its layer: the truncation drops nothing it needs
    f = graph.active_features
    above = f[None, :, 0] >= f[:, None, 0]
    assert not A[:graph.n_features, :graph.n_features][above].any()


def test_each_depth_equals_full_depth():
    """The row program through `depth` layers (each depth `attribute` uses that the rows' targets allow)
    gives the rows of the program through all of them, up to float32 rounding."""
    model = tiny_model("llama", n_layers=N_LAYERS)
    cfg, params = model.cfg, model.params
    ts = transcoder_set(random_transcoders(cfg, "skip", "hook_resid_mid"), cfg)
    tokens = jnp.asarray(TOKENS)[None]
    resid0 = embedding(params, cfg, tokens)
    clean = frozen_forward(params, cfg, ts, resid0, zero_sources(cfg, len(TOKENS)), keep_frozen=True)
    acts = np.asarray(jax.nn.relu(jnp.einsum("lpi,lif->lpf", clean.inputs, ts.W_enc) + ts.b_enc[:, None]))
    active = np.stack(np.nonzero(acts), axis=1)
    dec = numpy_decoder_rows(ts, active, acts[tuple(active.T)])
    rng = np.random.default_rng(0)
    errors = rng.normal(size=(cfg.n_layers, len(TOKENS), cfg.d_model)).astype(np.float32)
    n_src = len(active) + cfg.n_layers * len(TOKENS)
    arrays, below = _site_layout(_with_error_rows(dec, errors, len(active)), cfg.n_layers, len(TOKENS), n_src)
    tok = jnp.asarray(rng.normal(size=(len(TOKENS), cfg.d_model)), jnp.float32)
    vecs = jnp.asarray(rng.normal(size=(6, cfg.d_model)), jnp.float32)
    for top in range(cfg.n_layers):
        layers = jnp.asarray(np.r_[top, rng.integers(0, top + 1, size=5)], jnp.int32)  # the highest: top
        positions = jnp.asarray(rng.integers(0, len(TOKENS), size=6), jnp.int32)
        run = lambda d, layers=layers, positions=positions: np.asarray(_rows_jit(
            params, cfg, ts, resid0, clean.frozen, arrays, tok, layers, positions, vecs, len(active), d,
            int(below[d])))
        full = run(cfg.n_layers)
        for depth in [d for d in _depths(cfg.n_layers) if top < d < cfg.n_layers]:
            np.testing.assert_allclose(run(depth), full, rtol=1e-5, atol=1e-6 * np.abs(full).max(),
                                       err_msg=f"targets up to layer {top}, depth {depth}")


def test_frozen_constants_keep_the_jacobian():
    """With the clean run's patterns and norm scales patched in as constants, the frozen forward has the
    stop_gradient forward's values and Jacobian at the clean run (jvps in a random direction); truncated at
    two layers, it gives their inputs and tangents, and no logits."""
    model = tiny_model("gemma2")
    cfg, params = model.cfg, model.params
    ts = transcoder_set(random_transcoders(cfg, "plt", "hook_resid_mid"), cfg)
    resid0 = embedding(params, cfg, jnp.asarray(TOKENS)[None])
    zero = zero_sources(cfg, len(TOKENS))
    direction = Sources(*(jnp.asarray(np.random.default_rng(1).normal(size=s), jnp.float32)
                          for s in ((len(TOKENS), cfg.d_model), (cfg.n_layers, len(TOKENS), cfg.d_model))))
    clean = frozen_forward(params, cfg, ts, resid0, zero, keep_frozen=True)
    assert {"attn.hook_pattern", "ln1.hook_scale", "ln2_post.hook_scale", "ln_final.hook_scale"} <= set(
        clean.frozen)

    def jvp(frozen, n_run):
        f = lambda s: (lambda o: (o.inputs, o.final))(frozen_forward(params, cfg, ts, resid0, s, frozen))
        cut = lambda s: Sources(s.embed, s.mlp_out[:n_run])
        return jax.jvp(f, (cut(zero),), (cut(direction),))

    ((x0, f0), (dx0, df0)), ((x1, f1), (dx1, df1)), ((x2, f2), (dx2, _)) = jax.jit(lambda frozen: (
        jvp(None, cfg.n_layers), jvp(frozen, cfg.n_layers), jvp(frozen, 2)))(clean.frozen)
    for got, want in ((x1, x0), (f1, f0), (dx1, dx0), (df1, df0)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                                   atol=1e-6 * float(jnp.abs(want).max()))
    assert f2 is None and x2.shape[0] == 2
    np.testing.assert_allclose(np.asarray(dx2), np.asarray(dx0[:2]), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(dx0).max()))


def test_depths_by_hand():
    assert list(_depths(30)) == [4, 8, 15, 23, 30]  # 30 * (1/8, 1/4, 1/2, 3/4, 1), rounded up
    assert list(_depths(5)) == [1, 2, 3, 4, 5]
    assert list(_depths(3)) == [1, 2, 3]
    assert list(_depths(1)) == [1]
