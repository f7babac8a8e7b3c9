"""TransformerLens 4.3's calling conventions on the patching functions: `reduce`, `baseline`, a mapping of
metrics, `index_df` rows, and the statistics of `PatchResult`, against the plain one-forward-per-cell
reference and hand computations (test_tl_reference.py checks the same against TransformerLens itself)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import patching
from jaxlens.errors import InputError
from jaxlens.patching import PatchResult

N_POS = 7  # tests/patching/conftest.py prompts


def per_example(logits):
    return logits[:, -1, 3] - logits[:, -1, 7]


def top_logit(logits):
    return logits[:, -1].max(-1)


def test_per_example_values_baseline_and_mapping_equal_the_reference(gpt2, ref):
    s = gpt2
    L = s.cfg.n_layers
    cells = [((l, p), l, (slice(None), p)) for l, p in itertools.product(range(L), range(N_POS))]
    want_ld = ref(s, "hook_resid_pre", cells, metric=per_example)  # [layer pos batch]
    want_top = ref(s, "hook_resid_pre", cells, metric=top_logit)
    res = patching.get_act_patch_resid_pre(s.model, s.corrupted, s.cache,
                                           {"ld": per_example, "top": top_logit},
                                           reduce="none", baseline=True, progress=False)
    assert res.values.shape == (2, L, N_POS, 2) and res.metric_names == ["ld", "top"]
    np.testing.assert_allclose(res.values[0], want_ld, atol=1e-5)
    np.testing.assert_allclose(res.values[1], want_top, atol=1e-5)
    logits = s.model(s.corrupted)
    np.testing.assert_allclose(res.baseline, np.stack([per_example(logits), top_logit(logits)]), atol=1e-5)
    # reduce="mean" is the batch mean, as an array; a single metric has no metric axis
    mean = patching.get_act_patch_resid_pre(s.model, s.corrupted, s.cache, per_example, reduce="mean",
                                            progress=False)
    np.testing.assert_allclose(np.asarray(mean), want_ld.mean(-1), atol=1e-5)
    one = patching.get_act_patch_resid_pre(s.model, s.corrupted, s.cache, per_example, reduce="none",
                                           progress=False)
    assert not one.has_metric_axis and one.baseline is None and one.values.shape == (L, N_POS, 2)


def test_statistics_by_hand():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 4, 5)).astype(np.float32)
    base = np.float32(0.25) * np.ones(5, np.float32)
    r = PatchResult(v, ("layer", "pos", "example"), baseline=base, name="m")
    np.testing.assert_allclose(r.stderr(), v.std(-1, ddof=1) / np.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(r.effect(), v - 0.25, rtol=1e-6)
    np.testing.assert_allclose(r.normalized(np.full(5, 1.25, np.float32)), v - 0.25, rtol=1e-5, atol=1e-6)
    # exact sign-flip p-value of one cell, written out over all 2**5 patterns
    e = v[1, 2] - 0.25
    null = np.array([np.mean(e * np.array(sg)) for sg in itertools.product((1, -1), repeat=5)])
    assert r.permutation_pvalue()[1, 2] == pytest.approx(np.mean(np.abs(null) >= abs(e.mean()) * (1 - 1e-5)))
    low, high = r.bootstrap_ci(seed=3)
    assert low.shape == (3, 4) and (low <= v.mean(-1) + 1e-6).all() and (v.mean(-1) <= high + 1e-6).all()
    np.testing.assert_array_equal(r.bootstrap_ci(seed=3)[0], low)  # seeded: reproducible
    # a constant sample resamples to itself: the interval is a point
    const = PatchResult(np.full((2, 6), 0.5, np.float32), ("layer", "example"), name="m")
    lo, hi = const.bootstrap_ci()
    np.testing.assert_allclose(lo, 0.5)
    np.testing.assert_allclose(hi, 0.5)
    # Monte Carlo (n > 12): all-equal positive effects are extreme (2 of 2**20 patterns tie),
    # symmetric ones are not
    big = PatchResult(np.stack([np.ones(20), np.tile([1.0, -1.0], 10)]).astype(np.float32),
                      ("layer", "example"), baseline=np.zeros(20, np.float32), name="m")
    p = big.permutation_pvalue(n_permutations=999)
    assert p[0] == pytest.approx(1 / 1000) and p[1] == pytest.approx(1.0)
    assert list(r.index_df.itertuples(index=False, name=None))[:3] == [(0, 0), (0, 1), (0, 2)]


def test_index_df_rows_equal_the_full_grid(gpt2):
    pd = pytest.importorskip("pandas")
    s = gpt2
    grid = np.asarray(patching.get_act_patch_attn_head_out_by_pos(s.model, s.corrupted, s.cache, s.metric,
                                                                  progress=False))
    rows = pd.DataFrame([[1, 6, 2], [0, 4, 0], [1, 0, 3]], columns=["layer", "pos", "head"])
    got, df = patching.get_act_patch_attn_head_out_by_pos(s.model, s.corrupted, s.cache, s.metric,
                                                          index_df=rows, return_index_df=True, progress=False)
    np.testing.assert_allclose(np.asarray(got), grid[rows["layer"], rows["pos"], rows["head"]], atol=1e-6)
    assert df.equals(rows)
    typed = patching.get_act_patch_attn_head_out_by_pos(s.model, s.corrupted, s.cache, per_example,
                                                        index_df=rows, reduce="none", progress=False)
    assert typed.values.shape == (3, 2) and typed.axis_names == [] and typed.index_df.equals(rows)


def test_bad_tl_options_are_clear_errors(gpt2):
    pd = pytest.importorskip("pandas")
    s = gpt2
    call = lambda metric=per_example, **kw: patching.get_act_patch_resid_pre(
        s.model, s.corrupted, s.cache, metric, progress=False, **kw)
    with pytest.raises(InputError, match="reduce must be one of"):
        call(reduce="sum")
    with pytest.raises(InputError, match=r"must return a \[batch\] array of length 2.*found shape \(\)"):
        call(s.metric, reduce="mean")
    with pytest.raises(InputError, match="must return a scalar"):
        call({"ld": per_example})
    with pytest.raises(InputError, match="mapping of patching metrics is empty"):
        call({})
    with pytest.raises(InputError, match="return_index_df applies to the array result only"):
        call(reduce="none", return_index_df=True)
    with pytest.raises(InputError, match=r"columns \['layer', 'pos'\]"):
        call(s.metric, index_df=pd.DataFrame([[0, 1]], columns=["layer", "head"]))
    with pytest.raises(InputError, match="outside the grid"):
        call(s.metric, index_df=pd.DataFrame([[0, N_POS]], columns=["layer", "pos"]))
    with pytest.raises(InputError, match="has 3 layers"):
        call(s.metric, index_df=pd.DataFrame([[5, 0]], columns=["layer", "pos"]))
    with pytest.raises(InputError, match="index_df and return_index_df apply"):
        patching.get_act_patch_block_every(s.model, s.corrupted, s.cache, s.metric, return_index_df=True)
    reduced = call(s.metric, baseline=True)
    assert reduced.reduced and reduced.baseline.shape == ()
    with pytest.raises(InputError, match="needs per-example values"):
        reduced.stderr()
    no_base = call(reduce="none")
    with pytest.raises(InputError, match="baseline=True"):
        no_base.effect()
    with pytest.raises(InputError, match="clean_baseline must have the baseline's shape"):
        call(reduce="none", baseline=True).normalized(jnp.zeros(3))
