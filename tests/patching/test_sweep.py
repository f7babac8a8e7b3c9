"""The general sweep: identical results whatever the chunking, reuse, windows and devices; resume after an
interrupt; batches of prompt pairs; the result object; bad input.

Reference values come from conftest.py's plain per-cell reference (one patched `jaxlens.forward` per cell).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import patching
from jaxlens.errors import InputError, UnknownHookError
from jaxlens.patching.plan import default_budget

ALL = slice(None)


def z_sweep(s, **kw):
    kw.setdefault("progress", False)
    return patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="attn.hook_z",
                          axes=("layer", "pos", "head"), **kw)


def test_same_values_for_chunks_windows_reuse_and_devices(llama, ref):
    """GQA + rotary model: reuse on/off, 1-2 window lengths, several chunk sizes, 1 vs 8 devices."""
    s = llama
    devs = jax.devices()
    assert len(devs) == 8, "tests/conftest.py should give 8 CPU devices"
    cfg, P = s.cfg, s.corrupted.shape[1]
    want = ref(s, "attn.hook_z", [((l, p, h), l, (ALL, p, h)) for l in range(cfg.n_layers) for p in range(P)
                                  for h in range(cfg.n_heads)])
    runs = {
        "default": z_sweep(s, max_windows=1),
        "windows2_chunk16": z_sweep(s, max_windows=2, chunk_size=16),
        "no_reuse_chunk16": z_sweep(s, prefix_reuse=False, chunk_size=16),
    }
    for name, r in runs.items():
        assert r.shape == want.shape, name
        np.testing.assert_allclose(r.values, want, atol=1e-5, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(r.values, runs["default"].values, atol=1e-6, rtol=0, err_msg=name)
    # the same chunking on 1 and on 8 devices (chunks of 8: one cell per device, or all 8 on one)
    eight = z_sweep(s, chunk_size=8, max_windows=1)
    one = z_sweep(s, chunk_size=8, max_windows=1, devices=devs[:1])
    np.testing.assert_allclose(one.values, eight.values, atol=1e-6, rtol=0)
    np.testing.assert_allclose(one.values, want, atol=1e-5, rtol=1e-5)
    # cells whose patch changes nothing (positions before the first corrupted one) are the unpatched metric
    logits, _ = jax.jit(lambda p, t: jaxlens.forward(p, cfg, t))(s.params, s.corrupted)
    np.testing.assert_allclose(runs["default"].values[:, :2], float(s.metric(logits)), atol=1e-6)


def test_resume_after_interrupt_computes_only_missing_chunks(gpt2, tmp_path):
    s = gpt2
    kw = dict(hook="hook_resid_mid", axes=("layer", "pos"), devices=jax.devices()[:1], chunk_size=2,
              max_windows=1, progress=False)
    full = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, **kw)
    calls = []

    def interrupt(done, total):
        calls.append((done, total))
        if done == 4:
            raise KeyboardInterrupt("simulated interrupt")

    with pytest.raises(KeyboardInterrupt):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, checkpoint_dir=tmp_path,
                       on_chunk=interrupt, **kw)
    total = calls[0][1]
    assert total > 4 and len(list(tmp_path.glob("chunk_*.npz"))) == 4
    calls.clear()
    resumed = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, checkpoint_dir=tmp_path,
                             on_chunk=lambda d, t: calls.append((d, t)), **kw)
    assert [t for _, t in calls] == [total - 4] * (total - 4)  # only the missing chunks ran
    assert len(list(tmp_path.glob("chunk_*.npz"))) == total and not list(tmp_path.glob(".*tmp"))
    np.testing.assert_array_equal(resumed.values, full.values)
    # a finished checkpoint computes nothing
    calls.clear()
    again = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, checkpoint_dir=tmp_path,
                           on_chunk=lambda d, t: calls.append((d, t)), **kw)
    assert calls == [] and np.array_equal(again.values, full.values)
    # another sweep in the same directory is refused
    with pytest.raises(InputError, match="holds a different sweep.*Use a new directory"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, checkpoint_dir=tmp_path,
                       **{**kw, "hook": "hook_resid_pre"})


def test_memory_budget_chunks_and_progress_bar(gpt2, capsys):
    s = gpt2
    kw = dict(hook="hook_resid_pre", axes=("layer", "pos"), max_windows=1, devices=jax.devices()[:1])
    totals = []
    roomy = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, progress=False,
                           on_chunk=lambda d, t: totals.append(t), **kw)
    n_roomy = totals[-1]
    totals.clear()
    tight = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, memory_budget=300_000,
                           on_chunk=lambda d, t: totals.append(t), **kw)
    assert totals[-1] > n_roomy  # a smaller budget: smaller chunks, more of them
    np.testing.assert_allclose(tight.values, roomy.values, atol=1e-6, rtol=0)
    err = capsys.readouterr().err
    assert "patching" in err and f"{totals[-1]}/{totals[-1]}" in err  # the tqdm bar over chunks
    assert default_budget(jax.devices()[0]) >= 2**20
    with pytest.raises(InputError,
                       match=r"memory budget of 1,000 bytes per device is too small for one patch.*"
                             r"needs about [\d,]+ bytes.*Raise memory_budget"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, memory_budget=1000, **kw)


def per_example(logits):
    return logits[:, -1, 3] - logits[:, -1, 7]


def first_example(logits):
    return logits[0, -1, 3] - logits[0, -1, 7]


def test_batch_each_index_patched_across_the_batch(gpt2):
    """A batch of two prompt pairs: patching a cell patches both; per-example metrics equal single-pair
    sweeps, and their mean equals the batch-mean metric."""
    s = gpt2
    kw = dict(hook="hook_resid_pre", axes=("layer", "pos"), progress=False, max_windows=1)
    both = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, per_example, metric_names=("ex0", "ex1"),
                          **kw)
    assert both.axes == ("layer", "pos", "metric") and both.labels[-1] == ("ex0", "ex1")
    for b in range(2):
        cache_b = {k: v[b:b + 1] for k, v in s.cache.items() if "resid_pre" in k}
        one = patching.sweep(s.params, s.cfg, s.corrupted[b:b + 1], cache_b, first_example, **kw)
        np.testing.assert_allclose(both.values[..., b], one.values, atol=2e-5, rtol=1e-5)
    mean = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, **kw)
    np.testing.assert_allclose(both.values.mean(-1), mean.values, atol=2e-5)
    assert np.ptp(both.values[..., 0] - both.values[..., 1]) > 1e-3  # the examples really differ
    top = both.top_k(3, by="max", metric="ex1")
    assert [v for v, _ in top] == sorted(both.values[..., 1].ravel())[::-1][:3]
    v, where = both.rank(by="min", metric=0)[0]
    assert v == both.values[..., 0].min() == both.values[where["layer"], where["pos"], 0]
    one_metric = both.select(metric="ex1")
    assert one_metric.axes == ("layer", "pos") and np.array_equal(one_metric.values, both.values[..., 1])
    row = both.select(metric="ex0", layer=2)
    assert row.axes == ("pos",) and np.array_equal(row.values, both.values[2, :, 0])
    fig = one_metric.plot(title="resid_pre")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "2"]
    with pytest.raises(InputError, match=r"plot\(\) draws 2-D results; this one has axes \('layer', 'pos', "
                                         r"'metric'\).*select\(metric='ex0'\)"):
        both.plot()
    with pytest.raises(InputError, match=r"select\(metric='ex9'\): not a label of 'metric'"):
        both.select(metric="ex9")


def test_clean_tokens_or_stacked_values_as_source(gpt2):
    s = gpt2
    kw = dict(hook="hook_resid_pre", axes=("layer", "pos"), progress=False, max_windows=1)
    from_cache = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, **kw)
    from_tokens = patching.sweep(s.params, s.cfg, s.corrupted, s.clean, s.metric, **kw)
    from_values = patching.sweep(s.params, s.cfg, s.corrupted, s.stacked["hook_resid_pre"], s.metric, **kw)
    np.testing.assert_allclose(from_tokens.values, from_cache.values, atol=1e-6)
    np.testing.assert_allclose(from_values.values, from_cache.values, atol=1e-6)


def test_bad_input_errors(gpt2):
    s = gpt2
    kw = dict(progress=False, max_windows=1)
    resid = s.stacked["hook_resid_pre"]
    with pytest.raises(InputError,
                       match=r"clean activation 'blocks.hook_resid_pre' has shape \(3, 2, 6, 40\), "
                             r"the corrupted run's has \(3, 2, 7, 40\).*same shape \[batch pos\]"):
        patching.sweep(s.params, s.cfg, s.corrupted, {"blocks.hook_resid_pre": resid[:, :, :6]}, s.metric,
                       hook="resid_pre", axes=("layer", "pos"), **kw)
    with pytest.raises(InputError, match=r"clean cache holds no 'blocks.hook_mlp_out'.*run_with_cache"):
        patching.sweep(s.params, s.cfg, s.corrupted, {"blocks.hook_resid_pre": resid}, s.metric,
                       hook="mlp_out", axes=("layer", "pos"), **kw)
    with pytest.raises(InputError,
                       match=r"metric must return a scalar array; found shape \(2,\).*\.mean\(\).*"
                             r"metric_names"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, per_example, hook="resid_pre",
                       axes=("layer", "pos"), **kw)
    with pytest.raises(InputError,
                       match=r"scalar array of shape \(3,\); found shape \(2,\).*3 values, one per"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, per_example, hook="resid_pre",
                       axes=("layer", "pos"), metric_names=("a", "b", "c"), **kw)
    with pytest.raises(InputError, match=r"found a float"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, lambda x: 1.0, hook="resid_pre",
                       axes=("layer", "pos"), **kw)
    with pytest.raises(UnknownHookError,
                       match=r"No hook point named 'attn.hook_zz'.*Did you mean 'attn.hook_z'"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="attn.hook_zz", axes=("layer",),
                       **kw)
    with pytest.raises(InputError, match=r"Cannot sweep axis 'd_vocab' of 'attn.hook_z'.*axes batch pos "
                                         r"head_index d_head"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="attn.hook_z",
                       axes=("layer", "d_vocab"), **kw)
    with pytest.raises(InputError, match=r"per-layer hook: include 'layer'"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="attn.hook_z", axes=("head",),
                       **kw)
    with pytest.raises(InputError, match=r"names one layer.*layers="):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="blocks.1.attn.hook_z",
                       axes=("layer",), **kw)
    with pytest.raises(InputError, match=r"labels\['pos'\] has 2 entries for an axis of size 7"):
        patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="resid_pre",
                       axes=("layer", "pos"), labels={"pos": ["a", "b"]}, **kw)
    with pytest.raises(InputError, match=r"rank\(by=...\) must be 'abs', 'max' or 'min'; found 'median'"):
        patching.PatchResult(np.zeros((2,)), ("pos",), ((0, 1),)).rank("median")


def test_embedding_hook_without_layer_axis(gpt2):
    """A hook outside the blocks (hook_embed), swept by position only; the clean embedding is W_E[clean]."""
    s = gpt2
    clean_embed = s.params["embed"]["W_E"][s.clean]  # [batch pos d_model], by hand
    res = patching.sweep(s.params, s.cfg, s.corrupted, clean_embed, s.metric, hook="hook_embed",
                         axes=("pos",), progress=False, max_windows=1)
    assert res.axes == ("pos",) and res.shape == (s.corrupted.shape[1],)
    patched = jax.jit(lambda mask: s.metric(jaxlens.forward(
        s.params, s.cfg, s.corrupted, interventions={"hook_embed": jaxlens.Patch(clean_embed, mask)})[0]))
    want = []
    for p in range(s.corrupted.shape[1]):
        mask = np.zeros(clean_embed.shape, bool)
        mask[:, p] = True
        want.append(float(patched(jnp.asarray(mask))))
    np.testing.assert_allclose(res.values, want, atol=1e-5)
    assert abs(want[2] - want[0]) > 1e-3


def test_rounding_noise_in_the_clean_cache_does_not_count_as_a_change(gpt2):
    """A clean cache from another compiled program differs by rounding at the positions the prompts share:
    those cells are still no-ops (the unpatched metric, not recomputed), while a real change is patched."""
    s = gpt2
    cfg = s.cfg
    src = np.asarray(s.stacked["hook_resid_pre"])  # [layer batch pos d_model]
    # first changed pos
    shared = int(np.flatnonzero((np.asarray(s.corrupted) != np.asarray(s.clean)).any(0))[0])
    noisy = src * (1 + 1e-7 * np.random.default_rng(0).standard_normal(src.shape)).astype(np.float32)
    kw = dict(hook="hook_resid_pre", axes=("layer", "pos"), progress=False, max_windows=1)
    exact = patching.sweep(s.params, cfg, s.corrupted, src, s.metric, **kw)
    rounded = patching.sweep(s.params, cfg, s.corrupted, noisy, s.metric, **kw)
    logits, _ = jax.jit(lambda p, t: jaxlens.forward(p, cfg, t))(s.params, s.corrupted)
    base = float(s.metric(logits))
    assert shared > 0
    assert (rounded.values[:, :shared] == np.float32(base)).all(), "rounding noise was patched as a change"
    np.testing.assert_allclose(rounded.values, exact.values, atol=1e-5)
    assert not np.allclose(exact.values[:, shared], base, atol=1e-3), "the changed position is patched"


def test_one_position_patched_block_where_only_that_position_can_change(gpt2):
    """Hooks after the layer's keys and values (z, q, pattern rows, attention/MLP outputs) patched at one
    position run the patched block on that position only; keys, values, the residual entering the layer, and
    sweeps that patch every position keep the window block (a key at p changes every later query in layer l).
    The values of both forms are checked against the plain reference in test_patching_activation.py."""
    from jaxlens.patching.compute import ChunkSpec
    from jaxlens.patching.plan import resolve_target

    cfg = gpt2.cfg

    def point(hook, axes, reuse=True):
        return ChunkSpec(resolve_target(cfg, hook, axes), 4, 7, reuse, gpt2.metric, None).point

    assert point("z", ("layer", "pos", "head")) and point("q", ("layer", "pos", "head"))
    assert point("pattern", ("layer", "head_index", "dest_pos")) and point("mlp_out", ("layer", "pos"))
    assert point("attn_out", ("layer", "pos")) and point("resid_mid", ("layer", "pos"))
    assert not point("k", ("layer", "pos", "head")) and not point("v", ("layer", "pos", "head"))
    assert not point("resid_pre", ("layer", "pos")) and not point("z", ("layer", "head"))
    assert not point("pattern", ("layer", "head_index"))
    assert not point("z", ("layer", "pos", "head"), reuse=False)
