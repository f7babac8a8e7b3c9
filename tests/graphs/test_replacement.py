"""The local replacement model: its forward is the model's, and the adjacency is exact in the frozen model.

Exactness (issue 11): with every attention pattern, norm scale and MLP output patched to its clean value by
ordinary Patch interventions (tests/graphs/graph_models.py, no replacement-model code), adding a source node's
vector (a feature's a_s W_dec_s, an error vector, a token embedding) changes every target feature's
pre-activation and every demeaned target logit by that column of A. The families and transcoder kinds cover
RMSNorm / LayerNorm (gains not 1), grouped-query attention, post-norms, a parallel block; plain, skip (with
JumpReLU) and cross-layer transcoders; and every input hook, including circuit-tracer's `mlp.hook_in` after
ln2's weights, which would fail if read before them.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import forward
from jaxlens.graphs import attribute
from jaxlens.graphs.replacement import embedding, frozen_forward, transcoder_set, zero_sources
from tests.graphs.graph_models import TOKENS, frozen_reference, random_transcoders, tiny_model

CASES = [  # family, transcoder kind, input hook, activation
    ("llama", "plt", "mlp.hook_in", "relu"),
    ("llama", "skip", "ln2.hook_normalized", "jumprelu"),
    ("llama", "clt", "hook_resid_mid", "relu"),
    ("gpt2", "skip", "mlp.hook_in", "relu"),
    ("gpt2", "clt", "mlp.hook_in", "jumprelu"),
    ("gemma2", "plt", "hook_resid_mid", "relu"),
    ("parallel", "skip", "hook_mlp_in", "relu"),
]


@pytest.mark.parametrize("family,kind,hook,act", CASES[:4])
def test_forward_equals_model(family, kind, hook, act):
    model = tiny_model(family)
    tcs = random_transcoders(model.cfg, kind, hook, activation=act)
    tokens = jnp.asarray(TOKENS)[None]
    out = frozen_forward(model.params, model.cfg, transcoder_set(tcs, model.cfg),
                         embedding(model.params, model.cfg, tokens), zero_sources(model.cfg, len(TOKENS)))
    ref, cache = forward(model.params, model.cfg, tokens, cache_names=["blocks.hook_mlp_out"])
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(out.mlp_out), np.asarray(cache["blocks.hook_mlp_out"][:, 0]))


def _source_vectors(model, tcs, hook, graph):
    """{column: (embed delta [pos d], mlp delta [layer pos d])} for a sample of source nodes, each vector
    computed from the transcoder modules and the model's own cache."""
    params, cfg = model.params, model.cfg
    L, P, D = cfg.n_layers, graph.n_pos, cfg.d_model
    from tests.graphs.graph_models import _inputs, _read_name

    _, cache = forward(params, cfg, jnp.asarray(graph.tokens)[None],
                       cache_names=["blocks.hook_mlp_out", f"blocks.{_read_name(hook)}"])
    x = _inputs(params, cfg, cache, hook)
    if isinstance(tcs, dict):
        recon = jnp.stack([tcs[l](x[l]) for l in range(L)])
    else:
        recon = jnp.moveaxis(tcs(jnp.moveaxis(x, 0, 1)), 0, 1)
    errors = np.array(cache["blocks.hook_mlp_out"][:, 0] - recon)
    errors[:, :graph.zero_positions] = 0
    zeros = lambda: (np.zeros((P, D), np.float32), np.zeros((L, P, D), np.float32))
    out = {}
    for i in np.linspace(0, graph.n_features - 1, min(6, graph.n_features)).astype(int):
        l, p, f = graph.active_features[graph.selected_features[i]]
        a = graph.activation_values[graph.selected_features[i]]
        e, m = zeros()
        if isinstance(tcs, dict):
            m[l, p] = a * np.asarray(tcs[l].W_dec[...])[f]
        else:
            m[l:, p] = a * np.asarray(tcs.W_dec[...])[l, f, l:]
        out[i] = (e, m)
    for l, p in [(0, P - 1), (L - 1, 2), (1, 1)]:
        e, m = zeros()
        m[l, p] = errors[l, p]
        out[graph.error_offset + l * P + p] = (e, m)
    for p in range(P):
        e, m = zeros()
        e[p] = np.asarray(params["embed"]["W_E"])[graph.tokens[p]]
        out[graph.token_offset + p] = (e, m)
    return out


#: The frozen model is affine, so a source added ALPHA times changes the targets ALPHA times its column; a
#: large change keeps float32's cancellation (the clean values are subtracted) far below the tolerance.
ALPHA = 1000.0


@pytest.mark.parametrize("family,kind,hook,act", CASES)
def test_adjacency_exact_in_frozen_model(family, kind, hook, act):
    model = tiny_model(family)
    tcs = random_transcoders(model.cfg, kind, hook, activation=act)
    graph = attribute(model, tcs, TOKENS, batch_size=16)
    assert graph.n_features > 10
    run = frozen_reference(model, tcs, hook, graph.tokens)
    pre0, logit0 = run(*(jnp.zeros(s) for s in ((graph.n_pos, model.cfg.d_model),
                                                (model.cfg.n_layers, graph.n_pos, model.cfg.d_model))))
    feats = graph.active_features[graph.selected_features]
    reached = 0
    for col, (e, m) in _source_vectors(model, tcs, hook, graph).items():
        pre, logit = run(jnp.asarray(ALPHA * e), jnp.asarray(ALPHA * m))
        d_feat = np.asarray(pre - pre0)[feats[:, 0], feats[:, 1], feats[:, 2]] / ALPHA
        d_logit = np.asarray(logit - logit0)[graph.logit_tokens] / ALPHA
        A = graph.adjacency
        got = np.concatenate([A[:graph.n_features, col], A[graph.logit_offset:, col]])
        want = np.concatenate([d_feat, d_logit])
        scale = np.abs(want).max()  # zero for a last-layer feature off the last position
        reached += scale > 1e-2
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(scale, 1e-2),
                                   err_msg=f"column {col}")
    assert reached >= 8
