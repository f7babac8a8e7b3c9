"""Attribution patching against a hand-written (clean - corrupted) . grad, and against the exact sweep.

The hand version takes `jax.grad` of the metric with respect to the value written by a `Patch` at one layer
(the corrupted activation itself, so the forward is unchanged), then contracts with clean - corrupted over
every axis the grid does not keep. The library instead differentiates zero `Add` interventions on all layers
at once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import patching
from jaxlens.errors import InputError

_MEMO: dict = {}


def _corrupted(s, t):
    """(metric of the corrupted run, its activations stacked over layers) and the gradient function."""
    if id(s) not in _MEMO:
        logits, cache = t.forward(s.params, s.cfg, s.corrupted,
                                  cache_names=tuple(f"blocks.{r}" for r in t.RELS))
        grad = jax.jit(jax.grad(t.patched_metric(s.cfg, t.RELS, s.metric), argnums=2))
        _MEMO[id(s)] = float(s.metric(logits)), {k.removeprefix("blocks."): v for k, v in cache.items()}, grad
    return _MEMO[id(s)]


def hand_attribution(s, t, rel, keep):
    """base + sum over the non-kept axes of (clean - corrupted) * dmetric/dactivation, layer by layer.

    keep: einsum output letters over the activation's letters, e.g. "bpd->p" for (layer, pos) grids.
    """
    base, corr, grad = _corrupted(s, t)
    off = {r: jnp.zeros(v.shape, bool) for r, v in corr.items()}
    rows = []
    for layer in range(s.cfg.n_layers):
        mask = jnp.zeros(corr[rel].shape, bool).at[layer].set(True)
        g = grad(s.params, s.corrupted, corr, {**off, rel: mask})[rel][layer]
        diff = s.stacked[rel][layer] - corr[rel][layer]
        rows.append(np.asarray(jnp.einsum(keep, diff * g)))
    return base + np.stack(rows)


def test_attribution_correlates_with_exact_and_compare_reports(gpt2):
    s = gpt2
    exact = np.asarray(patching.get_act_patch_resid_pre(s.model, s.corrupted, s.cache, s.metric,
                                                        progress=False, max_windows=1))
    est = np.asarray(patching.attribution_patch(s.model, s.corrupted, s.cache, s.metric, "block_every"))[0]
    report = patching.compare(est, exact, k=4)
    e, x = est.ravel(), exact.ravel()
    assert report.correlation == pytest.approx(np.corrcoef(e, x)[0, 1], abs=1e-9)
    assert report.correlation > 0.5
    assert report.max_abs_error == pytest.approx(np.abs(e - x).max())
    errs = [abs(a - b) for _, a, b in report.worst]
    assert len(errs) == 4 and errs == sorted(errs, reverse=True)
    assert errs[0] == pytest.approx(report.max_abs_error)
    where, a, b = report.worst[0]
    assert est[where] == pytest.approx(a) and exact[where] == pytest.approx(b)
    with pytest.raises(InputError,
                       match=r"Estimate of shape \(3, 7\) and exact sweep of shape \(7, 3\) differ"):
        patching.compare(est, exact.T)


def test_attribution_equals_hand_gradient_every_and_general_grids(gpt2, llama, reftools):
    s = gpt2
    every = np.asarray(patching.attribution_patch(s.model, s.corrupted, s.cache, s.metric, "block_every"))
    assert every.shape == (3, s.cfg.n_layers, s.corrupted.shape[1])
    np.testing.assert_allclose(every[0], hand_attribution(s, reftools, "hook_resid_pre", "bpd->p"), atol=1e-5)
    np.testing.assert_allclose(every[2], hand_attribution(s, reftools, "hook_mlp_out", "bpd->p"), atol=1e-5)
    s = llama
    heads = np.asarray(patching.attribution_patch(s.model, s.corrupted, s.cache, s.metric,
                                                  "attn_head_by_pos_every"))
    assert heads.shape == (5, s.cfg.n_layers, s.corrupted.shape[1], s.cfg.n_heads)
    G = s.cfg.n_key_value_heads
    np.testing.assert_allclose(heads[2, ..., :G], hand_attribution(s, reftools, "attn.hook_k", "bpge->pg"),
                               atol=1e-5)
    assert (heads[2, ..., G:] == 0).all()  # GQA keys padded to n_heads, as TransformerLens
    np.testing.assert_allclose(heads[4], hand_attribution(s, reftools, "attn.hook_pattern", "bhqk->qh"),
                               atol=1e-5)
    # the general form: any hook and axes, a vector metric; linear in the metric and additive over positions:
    # (a - b) over all positions = the sum over positions of the logit-difference by-position estimates,
    # each of which counts the unpatched value once
    two = lambda logits: jnp.stack([logits[:, -1, 3].mean(), logits[:, -1, 7].mean()])
    res = patching.attribution_sweep(s.params, s.cfg, s.corrupted, s.cache, two, hook="attn.hook_z",
                                     axes=("head", "layer"), metric_names=("a", "b"))
    assert res.axes == ("head", "layer", "metric") and res.shape == (s.cfg.n_heads, s.cfg.n_layers, 2)
    base, P = _corrupted(s, reftools)[0], s.corrupted.shape[1]
    np.testing.assert_allclose(res.values[..., 0] - res.values[..., 1], heads[0].sum(1).T - (P - 1) * base,
                               atol=1e-4)
    with pytest.raises(InputError, match=r"Unknown kind 'heads'; choose one of"):
        patching.attribution_patch(s.model, s.corrupted, s.cache, s.metric, "heads")
