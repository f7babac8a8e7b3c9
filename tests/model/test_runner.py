"""The block runner and the hook tables: one layer loop whose two forms (scan with int bounds, a loop whose
start is data) agree, and one table per model kind that names, parses and orders every hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import Patch, hook_names, testing
from jaxlens.errors import InputError, UnknownHookError
from jaxlens.model import runner
from jaxlens.model.attention import Context

CFG = testing.tiny_config(n_layers=3, positional_embedding_type="rotary", normalization_type="RMS",
                          n_key_value_heads=1, window_sizes=(None, 3, None))
PARAMS = jaxlens.init_params(CFG, jax.random.key(0), scale=0.3)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.d_vocab, (2, 7)))


def ctx_of(resid):
    b, p = resid.shape[:2]
    return Context(positions=jnp.broadcast_to(jnp.arange(p), (b, p)), key_valid=None, offset=0)


def test_scan_and_data_bound_loop_agree_with_forward():
    embedded, _ = jaxlens.forward(PARAMS, CFG, TOKENS, stop_at_layer=0)
    want, _ = jaxlens.forward(PARAMS, CFG, TOKENS, stop_at_layer=3)
    scanned, _, _ = runner.run_blocks(PARAMS["blocks"], CFG, embedded, ctx_of(embedded), start=0, stop=3)
    looped = jax.jit(lambda s: runner.run_blocks(PARAMS["blocks"], CFG, embedded, ctx_of(embedded), start=s,
                                                 stop=3)[0])(jnp.asarray(0))
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(want), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(want), atol=1e-6, rtol=0)


def test_a_layer_intervention_applies_where_the_loop_index_equals_it():
    _, cache = jaxlens.forward(PARAMS, CFG, TOKENS, cache_names=["blocks.1.hook_resid_pre"])
    start_resid = cache["blocks.1.hook_resid_pre"]
    value = jnp.ones((CFG.d_model,))
    name = "blocks.2.hook_mlp_out"
    want, _ = jaxlens.forward(PARAMS, CFG, start_resid, start_at_layer=1, stop_at_layer=3,
                              interventions={name: Patch(value=value)})
    _, ivs = runner.split_interventions(hook_names.decoder_table(CFG), {name: Patch(value=value)}, 1, 3)
    got = jax.jit(lambda s: runner.run_blocks(PARAMS["blocks"], CFG, start_resid, ctx_of(start_resid), ivs,
                                              start=s, stop=3)[0])(jnp.asarray(1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    unpatched, _ = jaxlens.forward(PARAMS, CFG, start_resid, start_at_layer=1, stop_at_layer=3)
    assert float(jnp.abs(got - unpatched).max()) > 1e-3


def test_data_bound_loop_refuses_what_it_cannot_do():
    resid = jnp.zeros((1, 4, CFG.d_model))
    with pytest.raises(InputError, match="traced start layer"):
        jax.jit(lambda s: runner.run_blocks(PARAMS["blocks"], CFG, resid, ctx_of(resid), start=s, stop=3,
                                            cache={"hook_resid_pre"})[0])(jnp.asarray(0))


@pytest.mark.parametrize("bounds,want", [((None, None), (0, 3)), ((-1, None), (2, 3)), ((1, -1), (1, 2)),
                                         ((0, 0), (0, 0))])
def test_layer_bounds(bounds, want):
    assert runner.layer_bounds(3, *bounds) == want


@pytest.mark.parametrize("bounds", [(2, 1), (4, None), (None, 5), (-4, None)])
def test_bad_layer_bounds(bounds):
    with pytest.raises(InputError, match=r"0 <= start <= stop <= n_layers=3"):
        runner.layer_bounds(3, *bounds)


def test_decoder_and_encoder_tables():
    dec = hook_names.decoder_table(CFG)
    assert "unembed.hook_out" in dec.all_names() and "unembed.hook_out" not in dec.default_names()
    assert dec.axes("blocks.2.attn.hook_k") == "batch pos kv_head_index d_head"
    assert dec.axes("unembed.hook_out") == "batch pos d_vocab"
    assert dec.parse("blocks.-1.attn.hook_rot_q") == (2, "attn.hook_rot_q")
    enc = hook_names.encoder_table(CFG.replace(attention_dir="bidirectional"), ("pooler",))
    assert enc.all_names()[0] == "embed.hook_embed" and enc.all_names()[-1] == "pooler.hook_pooler_out"
    assert "blocks.0.hook_q_input" not in enc.default_names()
    with pytest.raises(UnknownHookError, match="mlm_head.ln.hook_scale"):
        enc.parse("mlm_head.ln.hook_scale")  # this encoder has no MLM head
    names = ["ln_final.hook_scale", "blocks.1.attn.hook_z_grad", "hook_embed", "blocks.1.attn.hook_z",
             "blocks.0.hook_resid_pre"]
    assert sorted(names, key=dec.sort_key) == ["hook_embed", "blocks.0.hook_resid_pre",
                                               "blocks.1.attn.hook_z", "blocks.1.attn.hook_z_grad",
                                               "ln_final.hook_scale"]


def test_select_follows_the_layer_bounds():
    dec = hook_names.decoder_table(CFG)
    mid = dec.select(None, start_at_layer=1, stop_at_layer=2)
    assert mid and all(n.startswith("blocks.1.") for n in mid)
    tail = dec.select(lambda n: "resid_pre" in n or "ln_final" in n, start_at_layer=-1)
    assert tail == ["blocks.2.hook_resid_pre", "ln_final.hook_scale", "ln_final.hook_normalized"]
    assert "blocks.0.attn.hook_result" in dec.select(None, enabled={"attn.hook_result"})
