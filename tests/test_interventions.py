"""Interventions as data: hand-computed ablations, vmap equals one-at-a-time, stacked keys equal single-layer
keys, gradients through zero Adds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import Add, Fn, HookedTransformer, Patch, Scale, mean_ablate, testing, zero_ablate
from jaxlens.interventions import axis_mask

CFG = testing.tiny_config()
PARAMS = jaxlens.init_params(CFG, jax.random.key(0), scale=0.2)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.d_vocab, (2, 11)))


def test_zero_ablating_one_head_matches_hand_computation():
    layer, head = 1, 3
    _, cache = jaxlens.forward(PARAMS, CFG, TOKENS, cache_names=("blocks.1.attn.hook_z",
                                                                 "blocks.1.hook_resid_pre",
                                                                 "blocks.1.hook_attn_out"))
    mask = axis_mask("batch pos head_index d_head", {"head_index": CFG.n_heads}, head_index=head)
    _, abl = jaxlens.forward(PARAMS, CFG, TOKENS,
                             interventions={f"blocks.{layer}.attn.hook_z": zero_ablate(mask)},
                             cache_names=("blocks.1.attn.hook_z", "blocks.1.hook_attn_out",
                                          "blocks.1.hook_resid_pre"))
    z = np.asarray(cache["blocks.1.attn.hook_z"])
    W_O = np.asarray(PARAMS["blocks"]["attn"]["W_O"][layer])
    # by hand: attn_out loses exactly head 3's contribution z[:, :, 3] @ W_O[3]
    want = np.asarray(cache["blocks.1.hook_attn_out"]) - z[:, :, head] @ W_O[head]
    np.testing.assert_allclose(np.asarray(abl["blocks.1.hook_attn_out"]), want, atol=1e-5)
    z_abl = np.asarray(abl["blocks.1.attn.hook_z"])
    assert np.all(z_abl[:, :, head] == 0)
    np.testing.assert_array_equal(np.delete(z_abl, head, axis=2), np.delete(z, head, axis=2))
    # nothing upstream changed
    np.testing.assert_array_equal(np.asarray(abl["blocks.1.hook_resid_pre"]),
                                  np.asarray(cache["blocks.1.hook_resid_pre"]))


def test_run_with_hooks_function_equals_data_intervention(tmp_path):
    model = HookedTransformer(CFG, PARAMS)

    def ablate_head(z, hook):
        assert hook.name == "blocks.2.attn.hook_z" and hook.layer() == 2
        return z.at[:, :, 4].set(0.0)

    got = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.2.attn.hook_z", ablate_head)])
    mask = axis_mask("batch pos head_index d_head", {"head_index": CFG.n_heads}, head_index=4)
    want, _ = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={"blocks.2.attn.hook_z": zero_ablate(mask)})
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # hooks do not persist: the next plain run is the clean model
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(jaxlens.forward(PARAMS, CFG, TOKENS)[0]),
                               atol=1e-6)


def test_filter_hooks_apply_to_every_matching_layer():
    model = HookedTransformer(CFG, PARAMS)
    seen = []
    def double(x, hook):
        seen.append(hook.name)
        return x * 2
    got = model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("hook_mlp_out"), double)])
    stacked = Scale(factor=jnp.full((CFG.n_layers,), 2.0))
    want, _ = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={"blocks.hook_mlp_out": stacked})
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert sorted(set(seen)) == [f"blocks.{l}.hook_mlp_out" for l in range(CFG.n_layers)]


def test_vmap_over_patches_equals_one_at_a_time():
    _, clean = jaxlens.forward(PARAMS, CFG, TOKENS, cache_names=("blocks.hook_resid_pre",))
    corrupted = (TOKENS + 5) % CFG.d_vocab
    L, P = CFG.n_layers, TOKENS.shape[1]
    masks = jnp.zeros((L * P, L, 1, P, 1), bool)
    masks = masks.at[jnp.arange(L * P), jnp.arange(L * P) // P, 0, jnp.arange(L * P) % P, 0].set(True)
    value = clean["blocks.hook_resid_pre"]

    def run_one(mask):
        logits, _ = jaxlens.forward(PARAMS, CFG, corrupted,
                                    interventions={"blocks.hook_resid_pre": Patch(value=value, mask=mask)})
        return logits[:, -1, :7].sum()

    batched = jax.jit(jax.vmap(run_one))(masks)
    for i in [0, 7, L * P - 1]:
        l, p = divmod(i, P)
        single = jnp.zeros((1, P, 1), bool).at[0, p, 0].set(True)
        logits, _ = jaxlens.forward(PARAMS, CFG, corrupted, interventions={
            f"blocks.{l}.hook_resid_pre": Patch(value=value[l], mask=single)})
        np.testing.assert_allclose(float(batched[i]), float(logits[:, -1, :7].sum()), atol=1e-4, rtol=1e-6)


def test_patch_add_scale_semantics_at_a_global_hook():
    _, c = jaxlens.forward(PARAMS, CFG, TOKENS, cache_names=("hook_embed",))
    e = c["hook_embed"]
    delta = jnp.ones((CFG.d_model,))
    pos_mask = jnp.zeros((1, TOKENS.shape[1], 1), bool).at[0, 2, 0].set(True)
    for iv, want in [
        (Add(delta, pos_mask), e.at[:, 2].add(1.0)),
        (Scale(jnp.asarray(3.0), pos_mask), e.at[:, 2].multiply(3.0)),
        (Patch(jnp.zeros(()), pos_mask), e.at[:, 2].set(0.0)),
        (mean_ablate(e.mean(0, keepdims=True)), jnp.broadcast_to(e.mean(0, keepdims=True), e.shape)),
        ([Add(delta), Scale(jnp.asarray(2.0))], (e + 1) * 2),
    ]:
        _, got = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={"hook_embed": iv},
                                 cache_names=("hook_embed",))
        np.testing.assert_allclose(np.asarray(got["hook_embed"]), np.asarray(want), atol=1e-6)


def test_gradient_through_zero_add_matches_finite_difference():
    name = "blocks.1.hook_resid_mid"
    _, c = jaxlens.forward(PARAMS, CFG, TOKENS, cache_names=(name,))

    def metric(delta):
        logits, _ = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={name: Add(delta)})
        return logits[0, -1, 3] - logits[0, -1, 5]

    zeros = jnp.zeros_like(c[name])
    g = jax.grad(metric)(zeros)
    direction = jax.random.normal(jax.random.key(1), zeros.shape)
    eps = 1e-2
    fd = (metric(eps * direction) - metric(-eps * direction)) / (2 * eps)
    assert float(jnp.vdot(g, direction)) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)
    # later positions cannot influence earlier logits under causal attention
    assert np.all(np.asarray(g[1]) == 0)


def test_run_with_cache_incl_bwd_gives_loss_gradients():
    model = HookedTransformer(CFG, PARAMS)
    loss, cache = model.run_with_cache(TOKENS, names_filter=["blocks.2.hook_resid_pre"], incl_bwd=True,
                                       return_type="loss")
    g = cache["blocks.2.hook_resid_pre_grad"]

    def from_layer2(resid):
        logits = model.forward(resid, start_at_layer=2)
        return jaxlens.lm_cross_entropy_loss(logits, TOKENS)

    want = jax.grad(from_layer2)(cache["blocks.2.hook_resid_pre"])
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), atol=1e-6)
    assert float(loss) == pytest.approx(float(from_layer2(cache["blocks.2.hook_resid_pre"])), abs=1e-5)


def test_start_and_stop_at_layer_compose_to_full_forward():
    model = HookedTransformer(CFG, PARAMS)
    mid = model.forward(TOKENS, stop_at_layer=2)
    _, cache = model.run_with_cache(TOKENS, names_filter="blocks.2.hook_resid_pre")
    np.testing.assert_allclose(np.asarray(mid), np.asarray(cache["blocks.2.hook_resid_pre"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.forward(mid, start_at_layer=2)), np.asarray(model(TOKENS)),
                               atol=1e-5)


def test_fn_intervention_may_use_traced_layer_on_stacked_key():
    def scale_by_layer(x, hook):
        return x * (1.0 + hook.layer().astype(x.dtype))
    got, _ = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={"blocks.hook_attn_out": Fn(scale_by_layer)})
    want, _ = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={
        f"blocks.{l}.hook_attn_out": Scale(jnp.asarray(1.0 + l)) for l in range(CFG.n_layers)})
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
