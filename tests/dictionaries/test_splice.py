"""Splicing: SAEs as interventions (with the error term the logits are unchanged; without it, equal to a hand
reconstruction in a plain hook function), feature edits, the SAELens cache names, a stacked per-layer splice,
and the feature-patching sweep against a per-cell Python loop; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlens import HookedTransformer, init_params
from jaxlens.dictionaries import (
    DictionaryConfig,
    DictionaryError,
    Splice,
    ablate_features,
    feature_patching_sweep,
    init_dictionary,
    run_with_cache,
    spliced,
    steer_feature,
)
from jaxlens.interventions import Fn
from jaxlens.testing import tiny_config

D_SAE = 24
HOOK = "blocks.1.hook_resid_mid"


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return HookedTransformer(cfg, init_params(cfg, jax.random.key(0), scale=0.3))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 7), 0, 97)


def sae(arch, hook=HOOK, d_in=40, seed=3, **kw):
    m = init_dictionary(
        DictionaryConfig(architecture=arch, d_in=d_in, d_sae=D_SAE, hook_name=hook, **kw),
        jax.random.key(seed),
    )
    m.b_enc[...] = jax.random.normal(jax.random.key(seed + 1), (D_SAE,)) * 0.05
    m.b_dec[...] = jax.random.normal(jax.random.key(seed + 2), (d_in,)) * 0.1
    if arch == "jumprelu":
        m.threshold[...] = jnp.full((D_SAE,), 0.02)
    return m


def by_hand(m, x, edit=None, error=False):
    """encode -> edit -> decode from the raw weights, in jnp (the reference; usable inside a hook)."""
    W_enc, b_enc, W_dec, b_dec = (getattr(m, n)[...] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    h = (x - b_dec) @ W_enc + b_enc
    if m.cfg.architecture == "topk":
        kth = jnp.sort(h, -1)[..., -m.cfg.k][..., None]
        acts = jnp.where(h >= kth, jax.nn.relu(h), 0.0)
    elif m.cfg.architecture == "jumprelu":
        acts = jax.nn.relu(h) * (h > m.threshold[...]).astype(h.dtype)
    else:
        acts = jax.nn.relu(h)
    edited = acts if edit is None else edit(acts)
    out = edited @ W_dec + b_dec
    return out + (x - (acts @ W_dec + b_dec)) if error else out


def hand_hook(m, edit=None, error=False):
    return lambda x, hook: by_hand(m, x, edit, error)


@pytest.mark.parametrize("arch,kw", [("standard", {}), ("topk", dict(k=5)), ("jumprelu", {})])
def test_error_term_leaves_logits_unchanged_and_reconstruction_matches_hand(model, tokens, arch, kw):
    m = sae(arch, **kw)
    clean = model(tokens)
    np.testing.assert_allclose(
        model(tokens, interventions=spliced([m], use_error_term=True)), clean, atol=1e-5, rtol=1e-5
    )
    got = model(tokens, interventions=spliced([m]))
    want = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hand_hook(m))])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(got - clean).max()) > 1e-2  # the reconstruction does change the forward


def test_feature_edits_match_hand_edits(model, tokens):
    m = sae("topk", k=5)

    ablate = lambda a: a.at[:, 3, 7].set(0.0)
    got = model(
        tokens,
        interventions={
            HOOK: Splice(m, use_error_term=True, features=ablate_features(D_SAE, 7, pos=3, n_pos=7))
        },
    )
    want = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hand_hook(m, ablate, error=True))])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    got = model(
        tokens, interventions={HOOK: Splice(m, use_error_term=True, features=steer_feature(D_SAE, 2, 3.0))}
    )
    want = model.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, hand_hook(m, lambda a: a.at[..., 2].add(3.0), error=True))]
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_run_with_cache_has_saelens_hooks(model, tokens):
    first, second = sae("standard", hook="blocks.0.hook_resid_post", seed=5), sae("topk", k=4, seed=9)
    logits, cache = run_with_cache(model, tokens, [first, second], names_filter=[HOOK])
    # the second SAE reads the residual with the first one's reconstruction in place
    _, ref = model.run_with_cache(
        tokens, names_filter=[HOOK], interventions={"blocks.0.hook_resid_post": Fn(hand_hook(first))}
    )
    x2 = np.asarray(ref[HOOK])
    for suffix, want in [
        ("hook_sae_input", x2),
        ("hook_sae_recons", by_hand(second, x2)),
        ("hook_sae_error", x2 - by_hand(second, x2)),
    ]:
        np.testing.assert_allclose(cache[f"{HOOK}.{suffix}"], want, atol=1e-4, rtol=1e-4)
    h = (x2 - np.asarray(second.b_dec[...])) @ np.asarray(second.W_enc[...]) + np.asarray(second.b_enc[...])
    np.testing.assert_allclose(cache[f"{HOOK}.hook_sae_acts_pre"], h, atol=1e-4, rtol=1e-4)
    assert ((np.asarray(cache[f"{HOOK}.hook_sae_acts_post"]) != 0).sum(-1) == 4).all()
    want_logits = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.hook_resid_post", hand_hook(first)), (HOOK, hand_hook(second))]
    )
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cache[HOOK], by_hand(second, x2), atol=1e-4, rtol=1e-4)  # the hook's output


def test_hook_z_sae(model, tokens):
    m = sae("standard", hook="blocks.2.attn.hook_z", reshape_activations="hook_z")  # d_in = 5 heads * 8
    clean = model(tokens)
    np.testing.assert_allclose(
        model(tokens, interventions=spliced([m], use_error_term=True)), clean, atol=1e-5
    )
    flat = lambda x, hook: by_hand(m, x.reshape(*x.shape[:2], 40)).reshape(x.shape)
    want = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_z", flat)])
    np.testing.assert_allclose(model(tokens, interventions=spliced([m])), want, atol=1e-4, rtol=1e-4)


def test_stacked_splice_per_layer(model, tokens):
    cfg = DictionaryConfig(architecture="standard", d_in=40, d_sae=D_SAE, hook_name="blocks.hook_resid_post")
    keys = jax.random.split(jax.random.key(2), 3)
    graphdef = nnx.split(init_dictionary(cfg))[0]
    stacked = jax.vmap(lambda k: nnx.split(init_dictionary(cfg, k))[1])(keys)
    got = model(tokens, interventions={"blocks.hook_resid_post": Splice((graphdef, stacked))})
    per_layer = {f"blocks.{l}.hook_resid_post": Splice(init_dictionary(cfg, k)) for l, k in enumerate(keys)}
    np.testing.assert_allclose(got, model(tokens, interventions=per_layer), atol=1e-5, rtol=1e-5)


def test_feature_patching_sweep_equals_loop(model, tokens):
    m = sae("topk", k=3)
    corrupted, clean = tokens, tokens[::-1]
    metric = lambda logits: logits[:, -1, 5].mean() - logits[:, -1, 11].mean()
    cells, values = feature_patching_sweep(model, corrupted, clean, m, metric, chunk_size=8)
    _, c_clean = model.run_with_cache(clean, names_filter=[HOOK])
    _, c_corr = model.run_with_cache(corrupted, names_filter=[HOOK])
    h = (np.asarray(c_clean[HOOK]) - np.asarray(m.b_dec[...])) @ np.asarray(m.W_enc[...]) + np.asarray(
        m.b_enc[...]
    )
    kth = np.sort(h, -1)[..., -3][..., None]
    a_clean = np.where(h >= kth, np.maximum(h, 0), 0)
    h2 = (np.asarray(c_corr[HOOK]) - np.asarray(m.b_dec[...])) @ np.asarray(m.W_enc[...]) + np.asarray(
        m.b_enc[...]
    )
    kth2 = np.sort(h2, -1)[..., -3][..., None]
    active = ((a_clean != 0) | (np.where(h2 >= kth2, np.maximum(h2, 0), 0) != 0)).any(0)
    np.testing.assert_array_equal(cells, np.argwhere(active))
    assert 20 <= len(cells) <= 2 * 7 * 3
    a_clean = jnp.asarray(a_clean)
    loop = []
    for p, f in cells:
        edit = lambda a, p=int(p), f=int(f): a.at[:, p, f].set(a_clean[:, p, f])
        loop.append(
            float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(HOOK, hand_hook(m, edit, error=True))])))
        )
    np.testing.assert_allclose(values, loop, atol=1e-4, rtol=1e-4)
    base = float(metric(model(corrupted)))
    assert np.abs(np.asarray(loop) - base).max() > 1e-4  # some cell moves the metric


def test_bad_input(model, tokens):
    narrow = sae("standard", d_in=24)
    with pytest.raises(
        DictionaryError,
        match=r"reads d_in=24, but the activation there has shape \(2, 7, "
        r"40\)",
    ):
        model(tokens, interventions=spliced([narrow]))
    with pytest.raises(DictionaryError, match="the model has no such hook.*blocks.1.hook_resid_mid"):
        spliced([sae("standard", hook="blocks.1.hook_resid_mdi")], cfg=model.cfg)
    with pytest.raises(DictionaryError, match="no such hook"):
        run_with_cache(model, tokens, [sae("standard", hook="blocks.7.hook_resid_mid")])
    tc = init_dictionary(
        DictionaryConfig(
            architecture="transcoder", d_in=40, d_sae=8, hook_name=HOOK, hook_name_out="blocks.1.hook_mlp_out"
        )
    )
    with pytest.raises(DictionaryError, match="cannot be spliced at one hook"):
        Splice(tc)
