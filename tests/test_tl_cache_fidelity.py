"""run_with_cache and ActivationCache against TransformerLens 4.3 on the same weights: what runs is cached
(layer bounds), keys in forward order, in-place remove_batch_dim, batch and position slices, neuron results,
the full residual decomposition, the split q/k/v inputs, the unembedding's hooks, the optional-hook flags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformer_lens.model_bridge")
pytestmark = pytest.mark.slow

from tl_reference import boot, close, legacy  # noqa: E402

from jaxlens import HookedTransformer, Patch, Scale, testing  # noqa: E402
from jaxlens.errors import InputError, InterventionError  # noqa: E402

HF_CONFIG = dict(n_embd=48, n_layer=3, n_head=4, n_inner=88, vocab_size=300, n_positions=40, bos_token_id=0,
                 eos_token_id=0)
@pytest.fixture(scope="module")
def both(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_cache")
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=5, **HF_CONFIG)
    testing.save_hf_model(hf, path, testing.train_tiny_tokenizer(path))
    br = boot(path)
    tokens = np.random.RandomState(2).randint(0, HF_CONFIG["vocab_size"], (2, 9))
    return br, HookedTransformer.from_pretrained(path), tokens


def tl_cache(br, x, **kw):
    with torch.no_grad():
        return br.run_with_cache(torch.as_tensor(x), **kw)


def test_keys_in_forward_order_and_unembed_hooks(both):
    br, jl, tokens = both
    tl_logits, tc = tl_cache(br, tokens)
    _, jc = jl.run_with_cache(tokens)
    assert list(jc.keys()) == legacy(tc.keys())
    _, jc = jl.run_with_cache(tokens, names_filter=["unembed.hook_out", "unembed.hook_in", "hook_embed"])
    assert list(jc.keys()) == ["hook_embed", "unembed.hook_in", "unembed.hook_out"]
    close(jc["unembed.hook_in"], tc["unembed.hook_in"], "unembed.hook_in")
    close(jc["unembed.hook_out"], tl_logits, "unembed.hook_out")


@pytest.mark.parametrize("bounds", [dict(start_at_layer=1), dict(start_at_layer=-2), dict(stop_at_layer=2),
                                    dict(start_at_layer=1, stop_at_layer=2)])
def test_layer_bounds_cache_what_runs(both, bounds):
    br, jl, tokens = both
    start = bounds.get("start_at_layer")
    x = tokens
    if start is not None:
        _, c = tl_cache(br, tokens)
        x = c[f"blocks.{start % 3}.hook_resid_pre"].numpy()
    tl_out, tc = tl_cache(br, x, **bounds)
    jl_out, jc = jl.run_with_cache(x, **bounds)
    assert list(jc.keys()) == legacy(tc.keys())
    close(jl_out, tl_out, f"output {bounds}")
    for name in jc:
        close(jc[name], tc[name], f"{name} {bounds}")


def test_names_outside_the_run_are_errors(both):
    _, jl, tokens = both
    with pytest.raises(InputError, match="ln_final.hook_scale"):
        jl.run_with_cache(tokens, names_filter=["ln_final.hook_scale"], stop_at_layer=2)
    with pytest.raises(InputError, match=r"blocks\.0\.hook_resid_pre.*\[1, 3\)"):
        jl.run_with_cache(np.zeros((1, 4, 48), np.float32), names_filter=["blocks.0.hook_resid_pre"],
                          start_at_layer=1)


def test_remove_batch_dim_in_place_and_batch_slices(both):
    br, jl, tokens = both
    _, tc = tl_cache(br, tokens)
    _, jc = jl.run_with_cache(tokens)
    for sl in [1, [1, 0], (0, 1)]:
        got, want = jc.apply_slice_to_batch_dim(sl), tc.apply_slice_to_batch_dim(sl)
        assert got.has_batch_dim == want.has_batch_dim, sl
        for name in ["blocks.1.attn.hook_pattern", "hook_embed", "ln_final.hook_scale"]:
            close(got[name], want[name], f"{name} batch slice {sl}")
    _, one = jl.run_with_cache(tokens[:1])
    one.remove_batch_dim()  # TL code that ignores the return value
    assert not one.has_batch_dim and one["resid_pre", 1].shape == (9, 48)
    with pytest.raises(InputError, match="batch size 2"):
        jc.remove_batch_dim()


@pytest.mark.parametrize("pos_slice", [-1, [0, 3], (2, 5)])
def test_pos_slice(both, pos_slice):
    br, jl, tokens = both
    _, tc = tl_cache(br, tokens, pos_slice=pos_slice)
    _, jc = jl.run_with_cache(tokens, pos_slice=pos_slice)
    for name in ["blocks.0.attn.hook_z", "blocks.2.attn.hook_pattern", "blocks.1.hook_resid_mid",
                 "ln_final.hook_scale", "blocks.1.mlp.hook_post"]:
        close(jc[name], tc[name], f"{name} pos_slice={pos_slice}")


def test_neuron_results_and_full_decomposition(both):
    br, jl, tokens = both
    _, tc = tl_cache(br, tokens)
    _, jc = jl.run_with_cache(tokens)
    close(jc.get_neuron_results(1, neuron_slice=[3, 7], pos_slice=-1),
          tc.get_neuron_results(1, neuron_slice=[3, 7], pos_slice=-1), "get_neuron_results")
    direction = np.random.RandomState(0).randn(48).astype(np.float32)
    close(jc.get_neuron_results(2, project_output_onto=direction),
          tc.get_neuron_results(2, project_output_onto=torch.tensor(direction)), "projected neuron results")
    for kw in [dict(layer=2, pos_slice=-1, return_labels=True),
               dict(layer=1, incl_remainder=True, return_labels=True),
               dict(layer=0, incl_remainder=True, return_labels=True),
               dict(layer=3, neuron_slice=(0, 10), apply_ln=True, return_labels=True)]:
        (got, got_l), (want, want_l) = jc.stack_neuron_results(**kw), tc.stack_neuron_results(**kw)
        assert got_l == want_l, kw
        close(got, want, f"stack_neuron_results {kw}")
    for kw in [dict(), dict(layer=2, mlp_input=True, pos_slice=-1), dict(expand_neurons=False, apply_ln=True),
               dict(layer=0)]:
        (got, got_l), (want, want_l) = (c.get_full_resid_decomposition(return_labels=True, **kw)
                                        for c in (jc, tc))
        assert got_l == want_l, kw
        close(got, want, f"get_full_resid_decomposition {kw}")
    whole = jc.get_full_resid_decomposition(layer=2).sum(0)
    close(whole, tc["blocks.2.hook_resid_pre"], "decomposition sums to the residual stream")
    (got, got_l), (want, want_l) = (c.stack_head_results(layer=0, incl_remainder=True, return_labels=True)
                                    for c in (jc, tc))
    assert got_l == want_l
    close(got, want, "stack_head_results(layer=0, incl_remainder=True)")
    close(jc.stack_activation("scale", 2, "ln1"), tc.stack_activation("scale", 2, "ln1"), "stack_activation")


def test_split_qkv_inputs_and_attn_result_flags(both):
    br, jl, tokens = both
    _, plain = jl.run_with_cache(tokens)
    _, split = jl.run_with_cache(tokens, names_filter=lambda n: True)
    assert "blocks.0.hook_q_input" not in split  # optional: recorded only when named or switched on
    jl.set_use_split_qkv_input(True)
    jl.set_use_attn_result(True)
    try:
        _, split = jl.run_with_cache(tokens)
    finally:
        jl.set_use_split_qkv_input(False)
        jl.set_use_attn_result(False)
    br.set_use_split_qkv_input(True)
    br.set_use_attn_result(True)
    try:
        _, tc = tl_cache(br, tokens)
    finally:
        br.set_use_split_qkv_input(False)
        br.set_use_attn_result(False)
    assert {"blocks.1.hook_q_input", "blocks.1.attn.hook_result"} <= set(split.keys())
    for name in ["blocks.1.hook_q_input", "blocks.1.hook_v_input", "blocks.1.attn.hook_result",
                 "blocks.1.ln1.hook_scale", "blocks.1.ln1.hook_normalized"]:
        close(split[name], tc[name], name)
    # recording the split inputs leaves every other hook as it was (to rounding: attn_result sums per head)
    for name in ["blocks.1.ln1.hook_normalized", "blocks.1.attn.hook_q", "ln_final.hook_normalized"]:
        np.testing.assert_allclose(np.asarray(split[name]), np.asarray(plain[name]), atol=1e-6, rtol=0)
        assert split[name].shape == plain[name].shape


def test_patched_q_input_changes_only_that_heads_query(both):
    br, jl, tokens = both
    other = np.random.RandomState(9).randint(0, HF_CONFIG["vocab_size"], tokens.shape)
    _, src = jl.run_with_cache(other, names_filter=["blocks.1.hook_q_input"])
    mask = (jnp.arange(4) == 2)[:, None]  # head 2, every d_model
    iv = {"blocks.1.hook_q_input": Patch(value=src["blocks.1.hook_q_input"], mask=mask)}
    _, base = jl.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"])
    _, got = jl.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"],
                               interventions=iv)
    q0, q1 = np.asarray(base["blocks.1.attn.hook_q"]), np.asarray(got["blocks.1.attn.hook_q"])
    assert np.abs(q1[:, :, 2] - q0[:, :, 2]).max() > 1e-3
    np.testing.assert_array_equal(q1[:, :, [0, 1, 3]], q0[:, :, [0, 1, 3]])
    np.testing.assert_array_equal(np.asarray(got["blocks.1.attn.hook_k"]),
                                  np.asarray(base["blocks.1.attn.hook_k"]))
    # the same patch in TransformerLens, through its split-input hook
    value = torch.as_tensor(np.array(src["blocks.1.hook_q_input"]))

    def patch(x, hook):
        x = x.clone()
        x[:, :, 2] = value[:, :, 2]
        return x

    br.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            want = br.run_with_hooks(torch.as_tensor(tokens), fwd_hooks=[("blocks.1.hook_q_input", patch)])
    finally:
        br.set_use_split_qkv_input(False)
    close(jl(tokens, interventions=iv), want, "logits with a patched q input")
    with pytest.raises(InterventionError, match="ln1 and the split q/k/v inputs"):
        jl(tokens, interventions={**iv, "blocks.1.ln1.hook_scale": Scale(factor=jnp.ones(()))})


def test_backward_cache_honours_bounds_and_mask(both):
    _, jl, tokens = both
    mask = np.ones(tokens.shape, bool)
    mask[0, :3] = False
    _, jc = jl.run_with_cache(tokens, incl_bwd=True, attention_mask=mask,
                              names_filter=["blocks.1.hook_resid_pre"])
    name = "blocks.1.hook_resid_pre"

    def loss_from(resid):  # the same loss by hand: the model from layer 1, masked cross-entropy
        logits = jl(resid, start_at_layer=1, attention_mask=mask)
        logp = jax.nn.log_softmax(logits, -1)[:, :-1]
        nll = -jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]
        valid = jnp.asarray(mask[:, 1:] & mask[:, :-1], jnp.float32)
        return (nll * valid).sum() / valid.sum()

    want = jax.grad(loss_from)(jc[name])
    np.testing.assert_allclose(np.asarray(jc[f"{name}_grad"]), np.asarray(want), atol=1e-6)
    metric = lambda out: out[:, -1].sum()
    _, jb = jl.run_with_cache(np.asarray(jc[name]), incl_bwd=True, start_at_layer=1, stop_at_layer=2,
                              grad_metric=metric, names_filter=["blocks.1.hook_mlp_out"])
    assert float(jnp.abs(jb["blocks.1.hook_mlp_out_grad"][:, -1] - 1).max()) == 0.0  # d(sum)/d(mlp_out) at -1
    assert float(jnp.abs(jb["blocks.1.hook_mlp_out_grad"][:, :-1]).max()) == 0.0
    with pytest.raises(InputError, match="grad_metric"):
        jl.run_with_cache(np.asarray(jc[name]), incl_bwd=True, start_at_layer=1)
