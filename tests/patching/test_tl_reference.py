"""jaxlens's patching functions against TransformerLens 4.3's own on the same random Hugging Face GPT-2.

TransformerLens boots the saved directory through `TransformerBridge` in compatibility mode without weight
processing; jaxlens loads it with `from_pretrained_no_processing`. Each side builds its own clean cache and runs
its own patching function; the grids must agree to 1e-4. Skips when transformer_lens is not installed.
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
    with torch.no_grad():  # GPT-2's init (std 0.02) barely lets a patch move the metric: scale the matrices up
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
    _, jl_cache = jl.run_with_cache(clean, names_filter=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
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
                                                     tl_corr_cache, metric, src_layer=0, src_head=2, component="q",
                                                     verbose=False)
    got = patching.get_act_patch_direct_path(jl, corrupted, jl_cache, None, metric, src_layer=0, src_head=2,
                                             component="q", verbose=False)
    want = want.detach().numpy()
    assert np.asarray(got).shape == want.shape == (2, 4)
    assert np.ptp(want[1]) > 1e-4
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
