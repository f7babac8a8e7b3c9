"""HookedFlax on a third-party linen transformer: the Flax GPT-2 of transformers 4.57 (transformers 5 has no
Flax models), run in its own environment (tests/ref_envs.py) with jaxlens imported from this source tree.

References, all outside jaxlens: Flax's own `capture_intermediates` (every method output), hand computations
from the parameters (embedding + layer norm, the c_attn projection, the tied unembedding and its gradient), a
raw `flax.linen.intercept_methods` interceptor written here (edits by hand, per-cell patching loop, zero
perturbation for gradients)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ref_envs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# transformers 4.57.3 (the last with Flax models) beside the project's jax / flax pins: tests/ref_locks/
STEPS = ref_envs.locked("flax-gpt2")

SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from transformers import GPT2Config, FlaxGPT2LMHeadModel
from jaxlens.flax import HookedFlax, LayoutError, UnknownFlaxHookError
from jaxlens.errors import InterventionError
from jaxlens.interventions import Patch, Add

jax.config.update("jax_default_matmul_precision", "highest")
cfg = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=101, n_positions=32)
hf_model = FlaxGPT2LMHeadModel(cfg, seed=0, dtype=jnp.float32)
noise = jax.random.split(jax.random.key(1), 100)
leaves, tdef = jax.tree_util.tree_flatten(hf_model.params)
params = jax.tree_util.tree_unflatten(tdef, [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x
                                             for x, k in zip(leaves, noise)])  # biases and gains non-trivial
module, variables = hf_model.module, {"params": params}
P, T = 7, 2
ids = jax.random.randint(jax.random.key(2), (T, P), 0, cfg.vocab_size)
corrupt = jax.random.randint(jax.random.key(3), (T, P), 0, cfg.vocab_size)
args = lambda x: (x, jnp.ones_like(x), jnp.broadcast_to(jnp.arange(P), x.shape))
kw = dict(deterministic=True)
hooked = HookedFlax(module, variables)
close = lambda a, b, tol=1e-5: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)

# 1. every method output == flax's capture_intermediates; plain output unchanged
out, cache = hooked.run_with_cache(*args(ids), **kw)
plain = hf_model(ids, params=params).logits
close(out.logits, plain)
_, inter = module.apply(variables, *args(ids), **kw, capture_intermediates=lambda m, n: n != "setup",
                        mutable=["intermediates"])
ref = {}
for path, x in jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    i = next(j for j, k in enumerate(keys) if isinstance(k, int))  # the call index in sow's tuple
    mod, method, call, leaf = keys[:i - 1], keys[i - 1], keys[i], path[i + 1:]
    base = ".".join(map(str, mod + [method])) + (f"#{call}" if call else "")
    ref[base + (jax.tree_util.keystr(leaf) if leaf else "")] = x
assert len(ref) > 30 and set(ref) <= set(cache), sorted(set(ref) - set(cache))[:5]
for name, x in ref.items():
    close(cache[name], x)
assert set(cache) - set(ref) <= {"__call__#1"}, set(cache) - set(ref)  # the tied lm_head's own apply

# 2. hand computations
p = params["transformer"]
def ln(x, q, eps=1e-5):
    m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + eps) * q["scale"] + q["bias"]
emb = p["wte"]["embedding"][ids] + p["wpe"]["embedding"][jnp.arange(P)]
ln1 = ln(emb, p["h"]["0"]["ln_1"])
close(cache["transformer.h.0.ln_1.__call__"], ln1)
c = p["h"]["0"]["attn"]["c_attn"]
close(cache["transformer.h.0.attn.c_attn.__call__"], ln1 @ c["kernel"].T + c["bias"])
lnf = cache["transformer.ln_f.__call__"]
close(out.logits, lnf @ p["wte"]["embedding"].T, 1e-4)

# a raw reference interceptor: fn(output) at one (module path, method), first call
def by_hand(path, method, fn):
    def icpt(next_fun, a, k, ctx):
        y = next_fun(*a, **k)
        return fn(y) if (".".join(ctx.module.path), ctx.method_name) == (path, method) else y
    return icpt
def ref_run(x, icpt):
    with nn.intercept_methods(icpt):
        return module.apply(variables, *args(x), **kw).logits

# 3. a patch through the intervention dictionary == editing the activation by hand
name = "transformer.h.0.__call__[0]"
value = jax.random.normal(jax.random.key(4), (T, P, cfg.n_embd))
mask = (jnp.arange(P) == 2)[:, None]
got = hooked.forward(*args(ids), interventions={name: Patch(value, mask)}, **kw).logits
want = ref_run(ids, by_hand("transformer.h.0", "__call__",
                            lambda y: (y[0].at[:, 2].set(value[:, 2]),) + tuple(y[1:])))
close(got, want)
assert not np.allclose(got, plain)

# 4. a sweep over one hook == a per-cell loop of hand patches
hook = "transformer.h.1.attn.__call__[0]"
_, clean = hooked.run_with_cache(*args(ids), names_filter=hook, **kw)
src = clean[hook]
metric = lambda o: (o.logits[:, -1, 5] - o.logits[:, -1, 7]).mean()
res = hooked.sweep(*args(corrupt), hook=hook, source=src, metric=metric, axes={"pos": 1}, **kw)
loop = []
for q in range(P):
    def patch(y, q=q):
        return (y[0].at[:, q].set(src[:, q]),) + tuple(y[1:])
    lg = ref_run(corrupt, by_hand("transformer.h.1.attn", "__call__", patch))
    loop.append(float((lg[:, -1, 5] - lg[:, -1, 7]).mean()))
close(res.values, np.array(loop), 1e-5)
close(res.baseline, metric(hf_model(corrupt, params=params)))
assert res.axes == ("pos",)

# 5. gradients w.r.t. hooks: by hand (tied unembedding) and through a raw zero perturbation
tok = 11
g = hooked.hook_grads(*args(ids), names=["transformer.ln_f.__call__", name],
                      metric=lambda o: o.logits[0, -1, tok], **kw)
want_lnf = jnp.zeros((T, P, cfg.n_embd)).at[0, -1].set(p["wte"]["embedding"][tok])
close(g["transformer.ln_f.__call__"], want_lnf)
def through_delta(d):
    icpt = by_hand("transformer.h.0", "__call__", lambda y: (y[0] + d,) + tuple(y[1:]))
    return ref_run(ids, icpt)[0, -1, tok]
close(g[name], jax.grad(through_delta)(jnp.zeros((T, P, cfg.n_embd))))

# 6. hook_map: TL names for the block outputs, usable in caches and interventions
tl = HookedFlax(module, variables, hook_map={"transformer.h.{i}.__call__[0]": "blocks.{i}.hook_resid_post"})
assert "blocks.1.hook_resid_post" in tl.hook_names(*args(ids), **kw)
_, tl_cache = tl.run_with_cache(*args(ids), names_filter=["blocks.0.hook_resid_post"], **kw)
close(tl_cache["blocks.0.hook_resid_post"], cache[name])
tl_patch = {"blocks.0.hook_resid_post": Patch(value, mask)}
close(tl.forward(*args(ids), interventions=tl_patch, **kw).logits, want)

# 7. bad input
try:
    hooked.forward(*args(ids), interventions={"transformer.h.0.atn.__call__[0]": Patch(value)}, **kw)
    raise SystemExit("no error for an unknown hook")
except UnknownFlaxHookError as e:
    assert "'transformer.h.0.attn.__call__[0]'" in str(e), e
try:
    hooked.forward(*args(ids), interventions={name: Patch(jnp.zeros((T, P, 3)))}, **kw)
    raise SystemExit("no error for a misfit patch")
except InterventionError as e:
    assert "(2, 7, 3)" in str(e) and "(2, 7, 48)" in str(e), e
bad = jax.tree_util.tree_map(lambda x: x, params)
bad["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"] = jnp.zeros((100, 48))
try:
    HookedFlax(module, {"params": bad}).forward(*args(ids), **kw)
    raise SystemExit("no error for a bad layout")
except LayoutError as e:
    assert "params/transformer/h/1/mlp/c_fc/kernel" in str(e) and "(192, 48)" in str(e) \
        and "(100, 48)" in str(e), e
print("OK", len(ref))
'''


@pytest.fixture(scope="module")
def flax_gpt2_env():
    return ref_envs.ensure_env("flax-gpt2", STEPS)


@pytest.mark.reference_env
def test_hooked_flax_on_transformers_flax_gpt2(flax_gpt2_env):
    out = ref_envs.run_script(flax_gpt2_env, SCRIPT, env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert out.startswith("OK"), out
