"""Hook functions: TL's loop idiom (a fresh hook function per call) compiles once and gives the values of the
equivalent Patch interventions and of TransformerLens 4.3; hooks that cannot trace fall back or raise an
error naming the pure form; `with model.hooks(...)` applies hooks inside the block and leaves nothing
after."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import HookedTransformer, Patch, testing
from jaxlens.caching import run_jit
from jaxlens.errors import InterventionError, JaxlensError
from jaxlens.interventions import axis_mask

CFG = testing.tiny_config()
PARAMS = jaxlens.init_params(CFG, jax.random.key(0), scale=0.2)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.d_vocab, (2, 11)))
CORRUPTED = (TOKENS + 7) % CFG.d_vocab
NAME = "blocks.1.hook_resid_pre"
MODEL = HookedTransformer(CFG, PARAMS)
CLEAN = MODEL.run_with_cache(TOKENS, names_filter=NAME)[1][NAME]


def compiles(calls) -> tuple[int, list]:
    """(new entries in the jitted forward's cache, outputs) of running the thunks."""
    before = run_jit._cache_size()
    outs = [np.asarray(c()) for c in calls]
    return run_jit._cache_size() - before, outs


def patched(pos: int, value=CLEAN, tokens=CORRUPTED) -> np.ndarray:
    mask = jnp.zeros((1, TOKENS.shape[1], 1), bool).at[0, pos, 0].set(True)
    return np.asarray(MODEL.forward(tokens, interventions={NAME: Patch(value, mask)}))


def test_loop_of_fresh_hooks_compiles_once_and_equals_patch():
    scales = [0.5 + 0.25 * i for i in range(10)]

    def call(i):
        pos, scale, value = i % 11, scales[i], CLEAN * scales[i]  # an int, a float and an array per call
        return lambda: MODEL.run_with_hooks(
            CORRUPTED, fwd_hooks=[(NAME, lambda x, hook: x.at[:, pos].set(value[:, pos] * scale / scale))])

    n, outs = compiles([call(i) for i in range(10)])
    assert n == 1
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, patched(i % 11, CLEAN * scales[i]), atol=1e-5)


def test_heads_loop_over_closure_ints():
    want = lambda h: MODEL.forward(TOKENS, interventions={"blocks.0.attn.hook_z": Patch(
        jnp.zeros(()), axis_mask("batch pos head_index d_head", {"head_index": CFG.n_heads}, head_index=h))})
    n, outs = compiles([lambda h=h: MODEL.run_with_hooks(TOKENS, fwd_hooks=[
        ("blocks.0.attn.hook_z", lambda z, hook: z.at[:, :, h].set(0.0))]) for h in range(CFG.n_heads)])
    assert n == 1
    for h, out in enumerate(outs):
        np.testing.assert_allclose(out, np.asarray(want(h)), atol=1e-5)


def _patch_pos(x, hook, pos, value):
    return x.at[:, pos].set(value[:, pos])


class _Patcher:
    def __init__(self, pos):
        self.pos = pos

    def hook(self, x, hook):
        return x.at[:, self.pos].set(CLEAN[:, self.pos])


def _nested(pos):
    def helper(x):
        return x.at[:, pos].set(CLEAN[:, pos])
    return lambda x, hook: helper(x)


@pytest.mark.parametrize("make", [
    lambda pos: functools.partial(_patch_pos, pos=pos, value=CLEAN),
    lambda pos: _Patcher(pos).hook,
    _nested,
    lambda pos: (lambda x, hook, p=pos: x.at[:, p].set(CLEAN[:, p])),
    lambda pos: (lambda x, hook, d={(0, "p"): pos}: x.at[:, d[0, "p"]].set(CLEAN[:, d[0, "p"]])),
], ids=["partial", "bound-method", "nested-closure", "default-arg", "tuple-keyed-dict"])
def test_partials_methods_nested_closures_and_defaults_compile_once(make):
    n, outs = compiles([lambda p=p: MODEL.run_with_hooks(CORRUPTED, fwd_hooks=[(NAME, make(p))])
                        for p in range(4)])
    assert n == 1
    for p, out in enumerate(outs):
        np.testing.assert_allclose(out, patched(p), atol=1e-5)


_POS = 0


def _global_pos_hook(x, hook):
    return x.at[:, _POS].set(CLEAN[:, _POS])


def test_globals_the_hook_reads_are_data_not_stale_constants():
    global _POS
    outs = []
    for p in range(3):  # the same function object, a module global changed between calls
        _POS = p
        outs.append(np.asarray(MODEL.run_with_hooks(CORRUPTED, fwd_hooks=[(NAME, _global_pos_hook)])))
    for p, out in enumerate(outs):
        np.testing.assert_allclose(out, patched(p), atol=1e-5)
    store = {"pos": 0}
    hook = lambda x, hook: x.at[:, store["pos"]].set(CLEAN[:, store["pos"]])  # noqa: E731
    for p in range(3):  # a dict it closes over, changed between calls
        store["pos"] = p
        np.testing.assert_allclose(np.asarray(MODEL.run_with_hooks(CORRUPTED, fwd_hooks=[(NAME, hook)])),
                                   patched(p), atol=1e-5)
    ns = types.SimpleNamespace(pos=0)  # an object of a library class, an attribute changed between calls
    hook = lambda x, hook: x.at[:, ns.pos].set(CLEAN[:, ns.pos])  # noqa: E731
    for p in range(3):
        ns.pos = p
        np.testing.assert_allclose(np.asarray(MODEL.run_with_hooks(CORRUPTED, fwd_hooks=[(NAME, hook)])),
                                   patched(p), atol=1e-5)


def test_ints_that_must_be_static_fall_back_with_right_values():
    def run(n):
        hook = lambda x, hook: x.at[:, :n].set(CLEAN[:, :n])  # noqa: E731
        return MODEL.run_with_hooks(CORRUPTED, fwd_hooks=[(NAME, hook)])

    def want(n):
        mask = (jnp.arange(TOKENS.shape[1]) < n)[None, :, None]
        return np.asarray(MODEL.forward(CORRUPTED, interventions={NAME: Patch(CLEAN, mask)}))

    _, outs = compiles([lambda n=n: run(n) for n in (1, 2, 3)])  # `x[:, :n]` needs n static: a compile per n
    for n, out in zip((1, 2, 3), outs, strict=True):
        np.testing.assert_allclose(out, want(n), atol=1e-5)
    again, _ = compiles([lambda n=n: run(n) for n in (2, 3)])
    assert again == 0  # each value's program is reused


def test_tl_hooks_that_cannot_trace_name_the_pure_form():
    def in_place(z, hook):
        z[:, :, 1] = 0.0
        return z

    calls = 0

    def counting(x, hook):
        nonlocal calls
        calls += 1
        return x

    acts, store = [], {}

    class Recorder:
        def hook(self, z, hook):
            self.last = z
            return z

    cases = [
        (in_place, r"in place.*return x\.at\[:, :, h\]\.set\(v\).*Patch\(value, mask\)"),
        (counting, r"nonlocal calls.*Count in Python around the call"),
        (lambda z, hook: acts.append(z) or z, r"stores the activation.*run_with_cache"),
        (lambda z, hook: store.update({hook.name: z}) or z, r"stores the activation"),
        (Recorder().hook, r"stores the activation"),
        (lambda z, hook: z.zero_(), r"torch in-place method.*x \* 0"),
        (lambda z, hook: z * float(z.sum()), r"reads the activation's values in Python.*jnp\.where"),
        (lambda z, hook: None, r"returned None.*return the new activation"),
    ]
    for fn, match in cases:
        with pytest.raises(InterventionError, match=r"'blocks\.0\.attn\.hook_z'.*" + match):
            MODEL.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_z", fn)])
    assert acts == [] and store == {} and calls == 0  # nothing leaked out of the trace


_CALLS = 0


def _global_counter(x, hook):
    global _CALLS
    _CALLS += 1
    return x


def test_global_counter_is_refused():
    with pytest.raises(InterventionError, match="global _CALLS"):
        MODEL.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", _global_counter)])


def test_side_effects_without_activations_still_run_at_trace_time():
    seen = []

    def record(x, hook):
        seen.append(hook.name)
        return x

    MODEL.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("hook_mlp_out"), record)])
    assert sorted(set(seen)) == [f"blocks.{l}.hook_mlp_out" for l in range(CFG.n_layers)]


def test_hooks_context_applies_inside_the_block_only():
    state = dict(vars(MODEL))
    hooks = [("blocks.0.attn.hook_z", lambda z, hook: z.at[:, :, 2].set(0.0))]
    ablated = np.asarray(MODEL.run_with_hooks(TOKENS, fwd_hooks=hooks))
    clean = np.asarray(MODEL(TOKENS))
    with MODEL.hooks(fwd_hooks=hooks):
        np.testing.assert_allclose(np.asarray(MODEL(TOKENS)), ablated, atol=1e-6)
        logits, cache = MODEL.run_with_cache(TOKENS, names_filter="blocks.0.attn.hook_z")
        np.testing.assert_allclose(np.asarray(logits), ablated, atol=1e-6)
        assert np.all(np.asarray(cache["blocks.0.attn.hook_z"])[:, :, 2] == 0)
        other = HookedTransformer(CFG, PARAMS)  # another model is not affected
        np.testing.assert_allclose(np.asarray(other(TOKENS)), clean, atol=1e-6)
        embed_zero = [("hook_embed", lambda x, hook: x * 0.0)]
        with MODEL.hooks(fwd_hooks=embed_zero):  # nested blocks compose, and with run_with_hooks
            both = np.asarray(MODEL(TOKENS))
        np.testing.assert_allclose(np.asarray(MODEL.run_with_hooks(TOKENS, fwd_hooks=embed_zero)), both,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(MODEL(TOKENS)), ablated, atol=1e-6)
    assert not np.allclose(both, ablated)
    with pytest.raises(RuntimeError), MODEL.hooks(fwd_hooks=hooks):
        raise RuntimeError  # an exception in the block still removes the hooks
    np.testing.assert_allclose(np.asarray(MODEL(TOKENS)), clean, atol=1e-6)
    assert dict(vars(MODEL)).keys() == state.keys()  # nothing stored on the model
    with pytest.raises(JaxlensError, match="reset_hooks_end=False"), MODEL.hooks(fwd_hooks=hooks,
                                                                                reset_hooks_end=False):
        pass


def test_function_with_closure_at_layer_free_key():
    scale = 2.0
    got, _ = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={
        "blocks.hook_attn_out": jaxlens.Fn(lambda x, hook: x * scale)})
    want, _ = jaxlens.forward(PARAMS, CFG, TOKENS, interventions={
        f"blocks.{l}.hook_attn_out": jaxlens.Scale(jnp.asarray(2.0)) for l in range(CFG.n_layers)})
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_generate_applies_function_with_closure_arrays_at_every_step():
    big = jnp.ones((2, 5, CFG.d_model))  # prompt-long on the pos axis: not per-position data of the hook
    kw = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False)
    prompt = TOKENS[:, :5]
    plain = MODEL.generate(prompt, interventions={NAME: jaxlens.Fn(lambda x, hook: x * 3.0)}, **kw)
    hook = lambda x, hook: x * 3.0 + 0.0 * big.mean()  # noqa: E731
    closing = MODEL.generate(prompt, interventions={NAME: jaxlens.Fn(hook)}, **kw)
    np.testing.assert_array_equal(np.asarray(closing), np.asarray(plain))


@pytest.mark.slow  # boots a TransformerLens bridge (about 10 s on 2 cores)
def test_loop_matches_transformer_lens(tmp_path):
    torch = pytest.importorskip("torch")
    bridge = pytest.importorskip("transformer_lens.model_bridge")
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=5, n_embd=72, n_layer=3, n_head=4,
                                 n_inner=200, vocab_size=300, n_positions=40, bos_token_id=0, eos_token_id=0)
    testing.save_hf_model(hf, tmp_path, testing.train_tiny_tokenizer(tmp_path))
    br = bridge.TransformerBridge.boot_transformers(str(tmp_path), device="cpu", dtype=torch.float32)
    br.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    model = HookedTransformer.from_pretrained_no_processing(tmp_path)
    rng = np.random.RandomState(1)
    clean_tok, corr_tok = rng.randint(1, 300, (2, 9)), rng.randint(1, 300, (2, 9))
    with torch.no_grad():
        tl_clean = br.run_with_cache(torch.as_tensor(clean_tok), names_filter=NAME)[1][NAME].clone()
    clean = model.run_with_cache(jnp.asarray(clean_tok), names_filter=NAME)[1][NAME]
    np.testing.assert_allclose(np.asarray(clean), tl_clean.numpy(), atol=1e-4)
    before = run_jit._cache_size()
    for pos in range(9):
        def tl_patch(x, hook):  # TL's idiom: edit in place
            x[:, pos] = tl_clean[:, pos]  # noqa: B023
            return x

        def tl_ablate(z, hook):  # in place, returning None
            z[:, :, pos % 4] = 0.0  # noqa: B023

        with torch.no_grad():
            tl_hooks = [(NAME, tl_patch), ("blocks.2.attn.hook_z", tl_ablate)]
            want = br.run_with_hooks(torch.as_tensor(corr_tok), fwd_hooks=tl_hooks)
        got = model.run_with_hooks(jnp.asarray(corr_tok), fwd_hooks=[
            (NAME, lambda x, hook: x.at[:, pos].set(clean[:, pos])),  # noqa: B023
            ("blocks.2.attn.hook_z", lambda z, hook: z.at[:, :, pos % 4].set(0.0))])  # noqa: B023
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=0)
    assert run_jit._cache_size() - before == 1
