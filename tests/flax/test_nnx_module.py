"""jaxlens.nnx.Transformer: the model as an NNX module. References: the pure functions (`jaxlens.forward`,
`cached_forward`) on the params pytree, and plain JAX + optax on that pytree for fine-tuning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlens
from jaxlens import testing
from jaxlens.analysis.composition import OV
from jaxlens.caching import cached_forward
from jaxlens.errors import CheckpointError, InputError
from jaxlens.interventions import Patch
from jaxlens.nnx import Transformer

CFG = testing.tiny_config(n_layers=2)
PARAMS = jaxlens.init_params(CFG, jax.random.key(0), scale=0.1)
TOKENS = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG.d_vocab)


@pytest.fixture
def model():
    return Transformer(CFG, PARAMS)


def test_forward_equals_pure_forward_exactly(model):
    iv = {"blocks.1.hook_resid_mid": Patch(jnp.zeros((CFG.d_model,)), jnp.arange(7)[:, None] == 3)}
    names = ("blocks.attn.hook_pattern", "hook_embed")
    want_logits, want_cache = jaxlens.forward(PARAMS, CFG, TOKENS, interventions=iv, cache_names=names)
    logits, cache = model.forward(TOKENS, interventions=iv, cache_names=names)
    np.testing.assert_array_equal(logits, want_logits)
    np.testing.assert_array_equal(model(TOKENS), jaxlens.forward(PARAMS, CFG, TOKENS)[0])
    chex.assert_trees_all_equal(cache, want_cache)
    _, want = cached_forward(PARAMS, CFG, TOKENS, ("blocks.1.hook_resid_post",))
    _, got = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
    np.testing.assert_array_equal(got["resid_post", 1], want["resid_post", 1])


def test_split_gives_params_and_config_and_merge_rebuilds(model):
    graphdef, state = nnx.split(model)
    pure = state.to_pure_dict()
    chex.assert_trees_all_equal(pure, PARAMS)  # same names, shapes and values as the params pytree
    assert jax.tree_util.tree_structure(pure) == jax.tree_util.tree_structure(PARAMS)
    rebuilt = nnx.merge(graphdef, state)
    assert rebuilt.cfg == CFG
    np.testing.assert_array_equal(rebuilt(TOKENS), model(TOKENS))
    # a changed state merges into a model computing the changed params' forward
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, pure)
    nnx.replace_by_pure_dict(state, doubled)
    want = jaxlens.forward(doubled, CFG, TOKENS)[0]
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(TOKENS), want)


def test_hooked_round_trip():
    hooked = jaxlens.HookedTransformer(CFG, PARAMS)
    module = Transformer.from_hooked(hooked)
    back = module.to_hooked()
    assert back.cfg == CFG
    chex.assert_trees_all_equal(back.params, PARAMS)
    np.testing.assert_array_equal(back(TOKENS), hooked(TOKENS))


def test_nnx_jit_grad_vmap(model):
    want = jaxlens.forward(PARAMS, CFG, TOKENS)[0]  # nnx.jit alone: test_functions_taking_params_...
    one = nnx.jit(nnx.vmap(lambda m, t: m(t[None])[0], in_axes=(None, 0)))
    np.testing.assert_allclose(one(model, TOKENS), want, atol=1e-5)
    grads = nnx.jit(nnx.grad(lambda m: m.loss(TOKENS)))(model).to_pure_dict()
    loss = lambda p: jaxlens.lm_cross_entropy_loss(jaxlens.forward(p, CFG, TOKENS)[0], TOKENS)
    ref = jax.jit(jax.grad(loss))(PARAMS)
    chex.assert_trees_all_close(grads, ref, atol=1e-6)


def test_optax_fine_tuning_matches_plain_jax(model):
    tx = optax.adam(3e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(m, opt):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(TOKENS))(m)
        opt.update(m, grads)
        return loss

    def loss_fn(p):
        return jaxlens.lm_cross_entropy_loss(jaxlens.forward(p, CFG, TOKENS)[0], TOKENS)

    @jax.jit
    def plain_step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    p, s = PARAMS, tx.init(PARAMS)
    got, want = [], []
    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes float and int32 (bias correction)
        for _ in range(3):
            got.append(float(nnx_step(model, optimizer)))
            p, s, loss = plain_step(p, s)
            want.append(float(loss))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want[-1] < want[0] - 0.1  # the steps do train
    chex.assert_trees_all_close(model.params, p, atol=1e-5)


def test_functions_taking_params_and_cfg_accept_the_module(model):
    np.testing.assert_array_equal(jaxlens.forward(model, model.cfg, TOKENS)[0],
                                  jaxlens.forward(PARAMS, CFG, TOKENS)[0])
    chex.assert_trees_all_equal(jaxlens.process_weights(CFG, model), jaxlens.process_weights(CFG, PARAMS))
    np.testing.assert_array_equal(OV(model, CFG).AB, OV(PARAMS, CFG).AB)
    # under a transform the module holds tracers; the functions read them
    traced = nnx.jit(lambda m, t: jaxlens.forward(m, m.cfg, t)[0])(model, TOKENS)
    np.testing.assert_allclose(traced, jaxlens.forward(PARAMS, CFG, TOKENS)[0], atol=1e-5)


def test_bad_input():
    wrong = {**PARAMS, "embed": {"W_E": jnp.zeros((CFG.d_vocab + 1, CFG.d_model))}}
    with pytest.raises(CheckpointError, match=r"\['embed'\]\['W_E'\]: expected \(97, 40\), found \(98, 40\)"):
        Transformer(CFG, wrong)
    with pytest.raises(InputError, match="not its own"):
        jaxlens.forward(Transformer(CFG, PARAMS), CFG.replace(n_ctx=64), TOKENS)
