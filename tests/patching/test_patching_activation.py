"""Every TransformerLens-named patching function against a plain reference: one patched forward per cell.

GPT-2-like (LayerNorm, learned positions, MHA) and Llama-like (RMSNorm, rotary, SwiGLU, grouped-query
attention with 2 key/value heads for 4 query heads) random models; batches of two prompt pairs; atol 1e-5.
"""

import itertools
import types

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import patching
from jaxlens.errors import InputError

ALL = slice(None)
N_POS = 7  # tests/patching/conftest.py prompts


def cells(kind: str, cfg):
    """(grid index, layer, index into the activation [batch, ...]) of every cell, written out per kind."""
    L, H, G, P = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, N_POS
    heads = G if ("_k_" in kind or "_v_" in kind) else H
    if kind in ("resid_pre", "resid_mid", "attn_out", "mlp_out"):
        return [((l, p), l, (ALL, p)) for l, p in itertools.product(range(L), range(P))]
    if kind.endswith("_by_pos") and "pattern" not in kind:  # [batch pos head d_head]
        return [((l, p, h), l, (ALL, p, h))
                for l, p, h in itertools.product(range(L), range(P), range(heads))]
    if kind.endswith("_all_pos") and "pattern" not in kind:
        return [((l, h), l, (ALL, ALL, h)) for l, h in itertools.product(range(L), range(heads))]
    if kind == "attn_head_pattern_by_pos":  # [batch head q k]
        return [((l, h, q), l, (ALL, h, q)) for l, h, q in itertools.product(range(L), range(H), range(P))]
    if kind == "attn_head_pattern_dest_src_pos":
        return [((l, h, q, k), l, (ALL, h, q, k))
                for l, h, q, k in itertools.product(range(L), range(H), range(P), range(P))]
    if kind == "attn_head_pattern_all_pos":
        return [((l, h), l, (ALL, h)) for l, h in itertools.product(range(L), range(H))]
    raise AssertionError(kind)


HOOK = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
        "mlp_out": "hook_mlp_out", "out": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k",
        "v": "attn.hook_v", "pattern": "attn.hook_pattern"}


def hook_of(kind: str) -> str:
    if kind in HOOK:
        return HOOK[kind]
    return HOOK[kind.split("_")[2]]


KINDS = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "attn_head_out_by_pos", "attn_head_q_by_pos",
         "attn_head_k_by_pos", "attn_head_v_by_pos", "attn_head_pattern_by_pos",
         "attn_head_pattern_dest_src_pos", "attn_head_out_all_pos", "attn_head_q_all_pos",
         "attn_head_k_all_pos", "attn_head_v_all_pos", "attn_head_pattern_all_pos"]
_REFS: dict = {}


def ref_grid(s, reference, kind):
    key = (id(s), kind)
    if key not in _REFS:
        _REFS[key] = reference(s, hook_of(kind), cells(kind, s.cfg))
    return _REFS[key]


# every kind on the Llama-like GQA model;
# the GPT-2-like one (LayerNorm, learned positions) on a spread of them
CASES = [("llama", k) for k in KINDS] + [("gpt2", k) for k in (
    "resid_mid", "attn_head_out_by_pos", "attn_head_pattern_dest_src_pos")]


@pytest.mark.parametrize("model_name,kind", CASES)
def test_tl_function_matches_reference(request, model_name, kind, ref):
    setup = request.getfixturevalue(model_name)
    fn = getattr(patching, f"get_act_patch_{kind}")
    got = np.asarray(fn(setup.model, setup.corrupted, setup.cache, setup.metric, progress=False,
                        max_windows=1))
    want = ref_grid(setup, ref, kind)
    assert got.shape == want.shape
    assert np.ptp(want) > 1e-2  # the patches do something
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_every_helpers_stack_the_single_sweeps(llama, ref):
    s, H = llama, llama.cfg.n_heads
    every = np.asarray(patching.get_act_patch_attn_head_by_pos_every(s.model, s.corrupted, s.cache, s.metric,
                                                                     progress=False, max_windows=1))
    assert every.shape == (5, s.cfg.n_layers, N_POS, H)
    parts = ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos"]
    for i, kind in enumerate(parts):
        want = ref_grid(s, ref, kind)
        np.testing.assert_allclose(every[i, ..., :want.shape[-1]], want, atol=1e-5)
        assert (every[i, ..., want.shape[-1]:] == 0).all()  # GQA keys/values padded to n_heads
    want = ref_grid(s, ref, "attn_head_pattern_by_pos").transpose(0, 2, 1)
    np.testing.assert_allclose(every[4], want, atol=1e-5)

    allpos = np.asarray(patching.get_act_patch_attn_head_all_pos_every(s.model, s.corrupted, s.cache,
                                                                       s.metric, progress=False,
                                                                       max_windows=1))
    assert allpos.shape == (5, s.cfg.n_layers, H)
    np.testing.assert_allclose(allpos[2, :, :s.cfg.n_key_value_heads],
                               ref_grid(s, ref, "attn_head_k_all_pos"), atol=1e-5)
    np.testing.assert_allclose(allpos[4], ref_grid(s, ref, "attn_head_pattern_all_pos"), atol=1e-5)

    block = np.asarray(patching.get_act_patch_block_every(s.model, s.corrupted, s.cache, s.metric,
                                                          progress=False, max_windows=1))
    want = np.stack([ref_grid(s, ref, k) for k in ("resid_pre", "attn_out", "mlp_out")])
    np.testing.assert_allclose(block, want, atol=1e-5)


def test_generic_activation_patch_and_general_sweep(gpt2, ref):
    s = gpt2
    got = patching.generic_activation_patch(s.model, s.corrupted, s.cache, s.metric, None, "z",
                                            ("layer", "pos", "head_index"), progress=False, max_windows=1)
    np.testing.assert_allclose(np.asarray(got), ref_grid(s, ref, "attn_head_out_by_pos"), atol=1e-5)
    def layer_pos_head_vector_patch_setter(corrupted, index, clean):  # TL's name: accepted (same semantics)
        raise AssertionError("never called")

    again = patching.generic_activation_patch(s.model, s.corrupted, s.cache, s.metric, activation_name="z",
                                              patch_setter=layer_pos_head_vector_patch_setter,
                                              index_axis_names=("layer", "pos", "head_index"), progress=False,
                                              max_windows=1)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
    def my_setter(corrupted, index, clean):
        return corrupted

    with pytest.raises(InputError, match="patch_setter 'my_setter' is not one of TransformerLens's setters"):
        patching.generic_activation_patch(s.model, s.corrupted, s.cache, s.metric, my_setter, "z", ("layer",))
    # the general sweep takes axes in any order and labels them
    res = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="attn.hook_z",
                         axes=("head", "layer"), progress=False, labels={"head": list("ABCDE")})
    np.testing.assert_allclose(res.values, ref_grid(s, ref, "attn_head_out_all_pos").T, atol=1e-5)
    assert res.axes == ("head", "layer") and res.labels[0] == tuple("ABCDE")
    value, where = res.top_k(1)[0]
    assert abs(value) == np.abs(res.values).max()
    assert res.values[list("ABCDE").index(where["head"]), where["layer"]] == value


def test_neuron_sweep_vector_metric(gpt2, ref):
    """Any hook and axis: MLP neurons at the last position, with a declared vector of two metrics."""
    s = gpt2

    def two(logits):
        return jnp.stack([logits[:, -1, 3].mean(), logits[:, -2, 5].sum()])

    res = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, two, hook="mlp.hook_post",
                         axes=("layer", "d_mlp"), layers=[1], metric_names=("a", "b"), progress=False)
    assert res.axes == ("layer", "d_mlp", "metric") and res.shape == (3, s.cfg.d_mlp, 2)
    assert (res.values[[0, 2]] == 0).all()  # layers not asked for hold `fill`
    want = ref(s, "mlp.hook_post", [((i,), 1, (ALL, ALL, n)) for i, n in enumerate(range(0, s.cfg.d_mlp, 9))],
               metric=two)
    np.testing.assert_allclose(res.values[1, ::9], want, atol=1e-5)


@pytest.mark.parametrize("model_name,comp", [("gpt2", "q"), ("gpt2", "v"), ("llama", "k")])
def test_direct_path_matches_reference(request, model_name, comp, ref):
    """Path patching of head (0, 1) into each later head's q/k/v input: the reference patches
    hook_<comp>_input of that one head with corrupted resid_pre + the source head's clean-minus-corrupted
    write (z @ W_O)."""
    s, src_layer, src_head = request.getfixturevalue(model_name), 0, 1
    cfg = s.cfg
    z = s.cache[f"blocks.{src_layer}.attn.hook_z"]
    _, corr_cache = jaxlens.forward(s.params, cfg, s.corrupted,
                                    cache_names=["blocks.hook_resid_pre", "blocks.attn.hook_z"])
    z_corr = corr_cache["blocks.attn.hook_z"][src_layer]
    W_O = np.asarray(s.params["blocks"]["attn"]["W_O"][src_layer, src_head])
    delta = np.asarray(z - z_corr)[:, :, src_head] @ W_O  # [batch pos d_model]
    got = np.asarray(patching.get_act_patch_direct_path(s.model, s.corrupted, s.cache, None, s.metric,
                                                        src_layer, src_head, comp, verbose=False,
                                                        max_windows=1))
    heads = cfg.n_heads if comp == "q" else cfg.n_key_value_heads
    assert got.shape == (cfg.n_layers, heads)
    assert (got[: src_layer + 1] == 0).all()
    resid = np.asarray(corr_cache["blocks.hook_resid_pre"])  # [layer batch pos d_model]
    source = np.repeat((resid + delta[None])[:, :, :, None, :], heads, axis=3)
    ref_cells = [((l, h), l, (ALL, ALL, h)) for l in range(src_layer + 1, cfg.n_layers) for h in range(heads)]
    want = ref(s, f"hook_{comp}_input", ref_cells, source=source)
    np.testing.assert_allclose(got[src_layer + 1:], want[src_layer + 1:], atol=1e-5)
    assert np.ptp(want[src_layer + 1:]) > 1e-3


def test_direct_path_refuses_post_norm_attention(gpt2):
    """Gemma-2-style ln1_post rescales attention output: a head's write is not z @ W_O (TL refuses too)."""
    s = gpt2
    cfg = s.cfg.replace(use_normalization_before_and_after=True)
    model = types.SimpleNamespace(cfg=cfg, params=s.params)  # refused before the weights are read
    with pytest.raises(InputError, match="normalises the attention output"):
        patching.get_act_patch_direct_path(model, s.corrupted, s.cache, None, s.metric, 0, 1, verbose=False)
    with pytest.raises(InputError, match="component must be 'q', 'k' or 'v'; found 'z'"):
        patching.get_act_patch_direct_path(s.model, s.corrupted, s.cache, None, s.metric, 0, 1, "z")
