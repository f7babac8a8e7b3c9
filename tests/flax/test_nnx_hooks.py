"""HookedFlax on an NNX transformer assembled from Flax's own NNX layers (`nnx.Embed`, `nnx.LayerNorm`,
`nnx.MultiHeadAttention`, `nnx.Linear`; tied unembedding through `Embed.attend`). No installable NNX model
runs here: jax-bonsai is a 0.0.1 placeholder, MaxText and gemma need Python 3.12, so the arrangement is
written below and the layers are Flax's.

References: Flax's own `nnx.capture(..., method_outputs=nnx.Intermediate)` (every method output), hand
computations, and a hand-run of the model's own submodules (edits, per-cell loop, zero perturbation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlens.errors import InterventionError
from jaxlens.flax import HookedFlax, LayoutError, UnknownFlaxHookError
from jaxlens.interventions import Add, Patch, Scale

D, H, V, P, B = 24, 4, 53, 6, 2


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(H, D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 40, rngs=rngs)
        self.down = nnx.Linear(40, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(x[..., 0]))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.ln_f(x))


def by_hand(model, tokens, edit_after_block0=lambda x: x):
    """The model's forward from its own submodules, with an edit of block 0's output."""
    x = edit_after_block0(model.blocks[0](model.embed(tokens)))
    return model.embed.attend(model.ln_f(model.blocks[1](x)))


@pytest.fixture(scope="module")
def model():
    m = TinyLM(nnx.Rngs(0))
    # non-trivial norm gains and biases
    state = nnx.state(m, nnx.Param)
    leaves, tdef = jax.tree_util.tree_flatten(state.to_pure_dict())
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x
             for x, k in zip(leaves, keys, strict=True)]
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(tdef, noisy))
    nnx.update(m, state)
    return m


TOKENS = jax.random.randint(jax.random.key(1), (B, P), 0, V)
CORRUPT = jax.random.randint(jax.random.key(2), (B, P), 0, V)
close = lambda a, b, tol=1e-5: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def test_cache_matches_nnx_capture_and_hand_computation(model):
    hooked = HookedFlax(model)
    out, cache = hooked.run_with_cache(TOKENS)
    close(out, model(TOKENS))
    _, state = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(TOKENS)
    ref = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]:
        i = next(j for j, k in enumerate(path) if isinstance(k, jax.tree_util.SequenceKey))
        names = [str(k.key) for k in path[:i]]
        base = ".".join(names) + (f"#{path[i].idx}" if path[i].idx else "")
        ref[base + jax.tree_util.keystr(path[i + 1:])] = x
    assert set(ref) == set(cache) and len(ref) == 24, sorted(set(ref) ^ set(cache))
    for name, x in ref.items():
        close(cache[name], x)
    emb = model.embed.embedding[...][TOKENS]
    close(cache["embed.__call__"], emb)
    ln = model.blocks[0].ln1
    mu, var = emb.mean(-1, keepdims=True), emb.var(-1, keepdims=True)
    close(cache["blocks.0.ln1.__call__"], (emb - mu) / jnp.sqrt(var + 1e-6) * ln.scale[...] + ln.bias[...])
    close(cache["blocks.0.up.__call__"], cache["blocks.0.ln2.__call__"] @ model.blocks[0].up.kernel[...]
          + model.blocks[0].up.bias[...])


def test_patch_equals_editing_by_hand(model):
    hooked = HookedFlax(model)
    value = jax.random.normal(jax.random.key(3), (B, P, D))
    iv = {"blocks.0.__call__": Patch(value, (jnp.arange(P) == 3)[:, None])}
    want = by_hand(model, TOKENS, lambda x: x.at[:, 3].set(value[:, 3]))
    close(hooked.forward(TOKENS, interventions=iv), want)
    # run_with_hooks: a TL hook function, selected by a predicate
    hook = lambda x, hook: x * 0.5
    got = hooked.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n == "blocks.0.__call__", hook)])
    close(got, by_hand(model, TOKENS, lambda x: x * 0.5))
    heads = hooked.forward(TOKENS, interventions={"blocks.1.attn.value.__call__": Scale(jnp.zeros(()))})
    assert not np.allclose(heads, model(TOKENS))


def test_sweep_equals_per_cell_loop(model):
    hooked = HookedFlax(model)
    name = "blocks.0.__call__"
    _, clean = hooked.run_with_cache(TOKENS, names_filter=[name])
    metric = lambda logits: (logits[:, -1, 4] - logits[:, -1, 9]).mean()
    res = hooked.sweep(CORRUPT, hook=name, source=clean[name], metric=metric, axes={"pos": 1, "d_model": 2},
                       chunk_size=16)
    assert res.values.shape == (P, D) and res.axes == ("pos", "d_model")
    src = clean[name]
    for p, d in [(0, 0), (2, 5), (5, 23), (3, 11)]:
        lg = by_hand(model, CORRUPT, lambda x, p=p, d=d: x.at[:, p, d].set(src[:, p, d]))
        close(res.values[p, d], metric(lg), 1e-5)
    pos = hooked.sweep(CORRUPT, hook=name, source=src, metric=metric, axes={"pos": 1})
    loop = [metric(by_hand(model, CORRUPT, lambda x, p=p: x.at[:, p].set(src[:, p]))) for p in range(P)]
    close(pos.values, np.array(loop), 1e-5)
    close(pos.baseline, metric(model(CORRUPT)))


def test_hook_grads_equal_grad_through_zero_perturbation(model):
    hooked = HookedFlax(model)
    metric = lambda logits: logits[1, -1, 7]
    g = hooked.hook_grads(TOKENS, names=["blocks.0.__call__"], metric=metric)["blocks.0.__call__"]
    want = jax.jit(jax.grad(lambda d: metric(by_hand(model, TOKENS, lambda x: x + d))))(jnp.zeros((B, P, D)))
    close(g, want)
    # gradients also flow through interventions passed in: d/d(delta) of an Add at the same hook
    patched = lambda d: metric(hooked.forward(TOKENS, interventions={"blocks.0.__call__": Add(d)}))
    dg = jax.jit(jax.grad(patched))
    close(dg(jnp.zeros((B, P, D))), want)


def test_hook_map_gives_tl_names(model):
    tl = HookedFlax(model, hook_map={"blocks.{i}.__call__": "blocks.{i}.hook_resid_post",
                                     "embed.__call__": "hook_embed"})
    names = tl.hook_names(TOKENS)
    assert names[0] == "hook_embed" and "blocks.1.hook_resid_post" in names
    assert "blocks.1.__call__" not in names
    _, cache = tl.run_with_cache(TOKENS, names_filter=lambda n: n.startswith("blocks.") and "hook_" in n)
    assert set(cache) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    close(cache["blocks.0.hook_resid_post"], model.blocks[0](model.embed(TOKENS)))
    with pytest.raises(UnknownFlaxHookError, match="blocks.{i}.__cal__"):
        HookedFlax(model, hook_map={"blocks.{i}.__cal__": "x"}).hook_names(TOKENS)


def test_bad_input(model):
    hooked = HookedFlax(model)
    closest = r"'blocks.0.atn.__call__'.*Did you mean 'blocks.0.attn.__call__'"
    with pytest.raises(UnknownFlaxHookError, match=closest):
        hooked.forward(TOKENS, interventions={"blocks.0.atn.__call__": Scale(jnp.zeros(()))})
    with pytest.raises(InterventionError, match=r"\(2, 6, 5\).*\(2, 6, 24\)"):
        hooked.forward(TOKENS, interventions={"blocks.0.__call__": Patch(jnp.zeros((B, P, 5)))})
    state = nnx.state(model).to_pure_dict()
    state["blocks"][1]["up"]["kernel"] = jnp.zeros((D, 41))
    with pytest.raises(LayoutError, match=r"'blocks/1/up/kernel'.*\(24, 40\), found \(24, 41\)"):
        HookedFlax(model, state)
    del state["blocks"][1]["up"]["kernel"]
    with pytest.raises(LayoutError, match="'blocks/1/up/kernel'.*missing"):
        HookedFlax(model, state)
    with pytest.raises(UnknownFlaxHookError, match="blocks.9"):
        hooked.sweep(TOKENS, hook="blocks.9.__call__", source=jnp.zeros((B, P, D)), metric=jnp.sum,
                     axes={"pos": 1})
