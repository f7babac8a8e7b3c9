"""jaxlens's patching functions against TransformerLens 4.3's own on the same random Hugging Face GPT-2.

TransformerLens boots the saved directory through `TransformerBridge` in compatibility mode without weight
processing; jaxlens loads it with `from_pretrained_no_processing`. Each side builds its own clean cache and
runs its own patching function; the grids must agree to 1e-4. Skips when transformer_lens is not installed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
tl_patching = pytest.importorskip("transformer_lens.patching")
pytestmark = pytest.mark.slow  # importing TransformerLens (pandas, datasets, pyarrow) and booting a bridge

from jaxlens import HookedTransformer, patching, testing  # noqa: E402

HF_CONFIG = dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=300, n_positions=16, bos_token_id=0,
                 eos_token_id=0)
ATOL = 1e-4


def metric(logits):
    """Works on torch and jax logits alike."""
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_patching_tl")
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=5, **HF_CONFIG)
    # GPT-2's init (std 0.02) barely lets a patch move the metric: scale the matrices up
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    testing.save_hf_model(hf, path, testing.train_tiny_tokenizer(path))
    br = bridge_mod.TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    br.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    br.eval()
    jl = HookedTransformer.from_pretrained_no_processing(path)
    clean = np.random.default_rng(0).integers(1, 300, (2, 6)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 1] = (clean[:, 1] + 17) % 300
    corrupted[:, 3] = (clean[:, 3] + 31) % 300
    with torch.no_grad():
        _, tl_cache = br.run_with_cache(torch.from_numpy(clean).long())
        _, tl_corr_cache = br.run_with_cache(torch.from_numpy(corrupted).long())
    _, jl_cache = jl.run_with_cache(clean,
                                    names_filter=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
    return br, jl, clean, corrupted, tl_cache, tl_corr_cache, jl_cache


@pytest.mark.parametrize("name", ["get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"])
def test_matches_transformer_lens(both, name):
    br, jl, clean, corrupted, tl_cache, _, jl_cache = both
    with torch.no_grad():
        want = getattr(tl_patching, name)(br, torch.from_numpy(corrupted).long(), tl_cache, metric)
    got = getattr(patching, name)(jl, corrupted, jl_cache, metric, progress=False)
    want = want.detach().numpy()
    assert np.asarray(got).shape == want.shape
    assert np.ptp(want) > 1e-3
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_direct_path_matches_transformer_lens(both):
    br, jl, clean, corrupted, tl_cache, tl_corr_cache, jl_cache = both
    with torch.no_grad():
        want = tl_patching.get_act_patch_direct_path(br, torch.from_numpy(corrupted).long(), tl_cache,
                                                     tl_corr_cache, metric, src_layer=0, src_head=2,
                                                     component="q", verbose=False)
    got = patching.get_act_patch_direct_path(jl, corrupted, jl_cache, None, metric, src_layer=0, src_head=2,
                                             component="q", verbose=False)
    want = want.detach().numpy()
    assert np.asarray(got).shape == want.shape == (2, 4)
    assert np.ptp(want[1]) > 1e-4
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def per_example(logits):
    return logits[:, -1, 3] - logits[:, -1, 7]


def log_prob_3(logits):
    last = logits[:, -1]
    return last[:, 3] - (last.logsumexp(-1) if hasattr(last, "logsumexp") else _logsumexp(last))


def _logsumexp(x):
    import jax

    return jax.nn.logsumexp(x, axis=-1)


def test_reduce_none_baseline_and_metric_mapping_match_transformer_lens(both):
    """TL 4.3's typed result: per-example values [metric, layer, pos, batch], the corrupted baseline, and the
    statistics on top (standard error; the sign-flip p-value, exact for a batch of 2)."""
    br, jl, clean, corrupted, tl_cache, _, jl_cache = both
    metrics = {"ld": per_example, "lp": log_prob_3}
    with torch.no_grad():
        want = tl_patching.get_act_patch_resid_pre(br, torch.from_numpy(corrupted).long(), tl_cache, metrics,
                                                   reduce="none", baseline=True)
        tl_clean = torch.stack([torch.as_tensor(f(br(torch.from_numpy(clean).long())))
                                for f in metrics.values()])
    got = patching.get_act_patch_resid_pre(jl, corrupted, jl_cache, metrics, reduce="none", baseline=True,
                                           progress=False)
    assert isinstance(got, patching.PatchingResult)
    assert got.values.shape == tuple(want.values.shape) == (2, 2, 6, 2)
    assert got.axis_names == want.axis_names and got.metric_names == want.metric_names
    assert got.has_metric_axis and not got.reduced
    np.testing.assert_allclose(got.values, want.values.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.baseline, want.baseline.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.mean(), want.mean().numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.stderr(), want.stderr().numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.effect(), want.effect().numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.permutation_pvalue(), want.permutation_pvalue().numpy(), atol=1e-6)
    clean_base = tl_clean.numpy()
    np.testing.assert_allclose(got.normalized(clean_base), want.normalized(tl_clean).numpy(), atol=1e-3,
                               rtol=1e-3)
    one = got["ld"]
    assert one.values.shape == (2, 6, 2) and not one.has_metric_axis
    np.testing.assert_allclose(one.values, want["ld"].values.numpy(), atol=ATOL, rtol=0)
    df = got.to_dataframe()
    assert len(df) == 2 * 12 * 2 and set(df.columns) >= {"metric", "layer", "pos", "example", "value"}
    assert list(got.index_df.columns) == ["layer", "pos"] and len(got.index_df) == 12


def test_reduce_mean_and_every_helper_with_baseline_match_transformer_lens(both):
    br, jl, clean, corrupted, tl_cache, _, jl_cache = both
    with torch.no_grad():
        want_mean = tl_patching.get_act_patch_attn_head_out_all_pos(br, torch.from_numpy(corrupted).long(),
                                                                    tl_cache, per_example, reduce="mean")
        want_every = tl_patching.get_act_patch_block_every(br, torch.from_numpy(corrupted).long(), tl_cache,
                                                           per_example, reduce="none", baseline=True)
    got_mean = patching.get_act_patch_attn_head_out_all_pos(jl, corrupted, jl_cache, per_example,
                                                            reduce="mean", progress=False)
    np.testing.assert_allclose(np.asarray(got_mean), want_mean.numpy(), atol=ATOL, rtol=0)
    # clean token ids in place of a cache: jaxlens runs the clean model for each part's activation
    got_every = patching.get_act_patch_block_every(jl, corrupted, clean, per_example, reduce="none",
                                                   baseline=True, progress=False)
    assert got_every.values.shape == tuple(want_every.values.shape) == (3, 2, 6, 2)
    assert got_every.axis_names == want_every.axis_names
    assert got_every.patch_type_names == want_every.patch_type_names
    np.testing.assert_allclose(got_every.values, want_every.values.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got_every.baseline, want_every.baseline.numpy(), atol=ATOL, rtol=0)


def test_index_df_rows_match_transformer_lens(both):
    import pandas as pd

    br, jl, clean, corrupted, tl_cache, _, jl_cache = both
    rows = pd.DataFrame([[1, 5, 2], [0, 3, 0], [1, 1, 3], [1, 5, 1]], columns=["layer", "pos", "head_index"])
    with torch.no_grad():
        want = tl_patching.generic_activation_patch(
            br, torch.from_numpy(corrupted).long(), tl_cache, metric,
            tl_patching.layer_pos_head_vector_patch_setter, "z", index_df=rows)
    got, df = patching.generic_activation_patch(jl, corrupted, jl_cache, metric,
                                                tl_patching.layer_pos_head_vector_patch_setter, "z",
                                                index_df=rows, return_index_df=True, progress=False)
    assert np.asarray(got).shape == (4,)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=ATOL, rtol=0)
    assert df.equals(rows)


def test_direct_path_all_sources_matches_transformer_lens(both):
    br, jl, clean, corrupted, tl_cache, tl_corr_cache, jl_cache = both
    with torch.no_grad():
        want = tl_patching.get_act_patch_direct_path_all_sources(br, torch.from_numpy(corrupted).long(),
                                                                 tl_cache, tl_corr_cache, metric,
                                                                 component="v", verbose=False)
    got = patching.get_act_patch_direct_path_all_sources(jl, corrupted, jl_cache, None, metric, component="v",
                                                         verbose=False)
    want = want.numpy()
    assert np.asarray(got).shape == want.shape == (2, 4, 2, 4)
    assert np.ptp(want[0, :, 1]) > 1e-4
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
