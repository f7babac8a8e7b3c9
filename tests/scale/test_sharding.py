"""Sharded weights on 8 simulated CPU devices (tests/conftest.py sets the XLA flag before jax is imported):
forward, run_with_cache, gradients, generate and a patching sweep equal the unsharded model's to fp32
rounding, for a dense (GPT-2-like, 8-way tensor parallel) and a grouped-query (Llama-like, 2 x 4 tensor
parallel + FSDP) family; each device holds 1/8 of the sharded weights; loading reads only each device's
slices; indivisible axes are refused with both numbers named."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlens import HookedTransformer, converters, forward, patching, testing
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.generate import generate
from jaxlens.model.forward import lm_cross_entropy_loss
from jaxlens.scale import (
    load_sharded,
    make_mesh,
    param_shardings,
    param_specs,
    shard_params,
    sharded_bytes_per_device,
)

if jax.device_count() < 8:
    raise RuntimeError(f"These tests need 8 devices, found {jax.device_count()}: run them under tests/ (its "
                       "conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax loads).")

DENSE = Config(d_model=32, n_layers=2, n_heads=8, d_head=4, d_mlp=64, d_vocab=97, n_ctx=32)
GQA = Config(d_model=48, n_layers=2, n_heads=8, d_head=6, n_key_value_heads=4, d_mlp=40, d_vocab=97, n_ctx=32,
             normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, act_fn="silu",
             eps=1e-6)
CASES = {"dense": (DENSE, 8, False), "gqa": (GQA, 4, True)}  # cfg, model axis size, fsdp
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 6)), jnp.int32)

_forward = jax.jit(forward, static_argnames=("cfg", "cache_names"))


class Case:
    def __init__(self, name: str):
        self.cfg, model, self.fsdp = CASES[name]
        self.mesh = make_mesh(model=model)
        self.params = testing.numpy_params(self.cfg, seed=1)  # unsharded reference: default device
        self.sharded = shard_params(self.params, self.cfg, self.mesh, fsdp=self.fsdp)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return Case(request.param)


def assert_close(got, want, rtol=1e-5):
    """fp32 rounding: relative to the array's scale (sums over heads become all-reduces, in another order)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)  # masked attention scores are -inf in both
    np.testing.assert_array_equal(got[~finite], want[~finite])
    scale = np.abs(want[finite]).max(initial=1e-30)
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=rtol * scale)


# -- the rule table ------------------------------------------------------------------------------------------
def test_specs_follow_the_rule_table():
    tp = param_specs(GQA)
    assert tp["blocks"]["attn"]["W_Q"] == P(None, "model")            # layer head_index d_model d_head
    assert tp["blocks"]["attn"]["W_K"] == P(None, "model")            # layer kv_head_index ...
    assert tp["blocks"]["attn"]["W_O"] == P(None, "model")            # layer head_index d_head d_model
    assert tp["blocks"]["attn"]["b_O"] == P()
    assert tp["blocks"]["mlp"]["W_in"] == P(None, None, "model")      # layer d_model d_mlp
    assert tp["blocks"]["mlp"]["W_out"] == P(None, "model")           # layer d_mlp d_model
    assert tp["embed"]["W_E"] == P() and tp["ln_final"]["w"] == P()
    fsdp = param_specs(GQA, fsdp=True)
    assert fsdp["blocks"]["attn"]["W_Q"] == P(None, "model", "data")
    assert fsdp["blocks"]["attn"]["W_O"] == P(None, "model", None, "data")
    assert fsdp["blocks"]["mlp"]["W_in"] == P(None, "data", "model")
    assert fsdp["blocks"]["mlp"]["b_in"] == P(None, "model")          # vectors are not FSDP-split
    assert fsdp["embed"]["W_E"] == P(None, ("data", "model"))         # no head axis: d_model over both
    assert fsdp["unembed"]["W_U"] == P(("data", "model"))
    assert fsdp["blocks"]["ln1"]["w"] == P() and fsdp["unembed"]["b_U"] == P()


# hand count of the ways each sharded leaf is split: 8-way TP splits each 8 ways; TP 4 x FSDP 2 splits every
# matrix with d_model 8 ways (over both axes) and the head / MLP-width vectors 4 ways (over `model` only)
WAYS = {
    "dense": {"W_Q": 8, "W_K": 8, "W_V": 8, "W_O": 8, "b_Q": 8, "b_K": 8, "b_V": 8, "W_in": 8, "W_out": 8,
              "b_in": 8},
    "gqa": {"W_Q": 8, "W_K": 8, "W_V": 8, "W_O": 8, "b_Q": 4, "b_K": 4, "b_V": 4, "W_in": 8, "W_gate": 8,
            "W_out": 8, "b_in": 4, "W_E": 8, "W_U": 8},
}


def test_each_device_holds_an_eighth_of_the_sharded_weights(case):
    name = "dense" if case.cfg is DENSE else "gqa"
    flat = lambda tree: {jax.tree_util.keystr(p).split("'")[-2]: x
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    full, placed = flat(case.params), flat(case.sharded)
    sharded = {k: x for k, x in placed.items() if not x.sharding.is_fully_replicated}
    assert sorted(sharded) == sorted(WAYS[name])  # the other leaves (norms, output biases) are replicated
    held = sharded_bytes_per_device(sharded)
    want = sum(np.asarray(full[k]).nbytes // ways for k, ways in WAYS[name].items())
    assert len(held) == 8 and set(held.values()) == {want}
    total = sum(np.asarray(full[k]).nbytes for k in WAYS[name])
    assert 1 / 8 <= want / total < 1 / 7.5  # about an eighth (the few head-width vectors: a quarter)


# -- the model, sharded, equals the model unsharded ----------------------------------------------------------
def test_forward(case):
    want, _ = _forward(case.params, case.cfg, TOKENS)
    got, _ = _forward(case.sharded, case.cfg, TOKENS)
    assert_close(got, want)


def test_run_with_cache(case):
    want_logits, want = HookedTransformer(case.cfg, case.params).run_with_cache(TOKENS)
    model = HookedTransformer(case.cfg, case.sharded)
    got_logits, got = model.run_with_cache(TOKENS)
    assert_close(got_logits, want_logits)
    assert sorted(got.keys()) == sorted(want.keys()) and len(want.keys()) > 10 * case.cfg.n_layers
    for name in want.keys():
        assert_close(got[name], want[name])
    spec = param_specs(case.cfg, fsdp=case.fsdp)["blocks"]["attn"]["W_Q"]
    assert model.params["blocks"]["attn"]["W_Q"].sharding.spec == spec  # still sharded after the call


def test_gradients(case):
    def loss(params):
        logits, _ = forward(params, case.cfg, TOKENS)
        return lm_cross_entropy_loss(logits, TOKENS)

    grad = jax.jit(jax.grad(loss))
    want, got = grad(case.params), grad(case.sharded)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    scale = max(float(np.abs(w).max()) for w in jax.tree_util.tree_leaves(want))
    if case.cfg.positional_embedding_type == "standard":
        # the key bias's gradient is zero in exact arithmetic (softmax over keys ignores a shift of every
        # score; under rotary the bias is rotated by position, so it is not)
        for g in (got, want):
            assert np.abs(np.asarray(g["blocks"]["attn"].pop("b_K"))).max() < 1e-6 * scale
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert_close(g, w, rtol=2e-5)


def test_generate(case):
    kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False)
    want = generate(case.params, case.cfg, TOKENS, **kw)
    got = generate(case.sharded, case.cfg, TOKENS, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.shape == (2, 12)


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,model,fsdp,message", [
    (DENSE.replace(n_heads=6, d_head=4, d_model=24), 4, False,
     "n_heads=6 is not divisible by the `model` axis of size 4"),
    (GQA.replace(n_key_value_heads=2), 4, False,
     "n_key_value_heads=2 is not divisible by the `model` axis of size 4"),
    (DENSE.replace(d_mlp=60), 8, False, "d_mlp=60 is not divisible by the `model` axis of size 8"),
    (DENSE.replace(d_model=33), 2, True, "d_model=33 is not divisible by the `data` axis of size 4; so is "
                                         "d_model=33 by the `data` x `model` axes of size 8"),
])
def test_indivisible_axes_are_refused(cfg, model, fsdp, message):
    mesh = make_mesh(model=model)
    with pytest.raises(InputError, match="make_mesh") as e:
        param_shardings(cfg, mesh, fsdp=fsdp)
    assert message in str(e.value)
    with pytest.raises(InputError, match=re.escape(message)):
        shard_params(testing.numpy_params(cfg, seed=0), cfg, mesh, fsdp=fsdp)


def test_indivisible_message_lists_the_sizes_that_work():
    with pytest.raises(InputError) as e:
        param_shardings(DENSE.replace(n_heads=6, d_head=4, d_model=24, d_mlp=48), make_mesh(model=4))
    assert "one of [1, 2] on these 8 devices" in str(e.value)  # divisors of 8 dividing 6 and 48


# -- loading: each device's slice, the converters' layout ----------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random transformers models saved as HF folders (and the GPT-2 one in memory, under "model")."""
    gpt2 = tmp_path_factory.mktemp("gpt2")
    model, _ = testing.saved_random_hf_model(gpt2, "GPT2Config", "GPT2LMHeadModel", 0, 6, vocab_size=97,
                                             n_embd=32, n_layer=2, n_head=8, n_positions=32)
    llama = tmp_path_factory.mktemp("llama")
    testing.saved_random_hf_model(llama, "LlamaConfig", "LlamaForCausalLM", 0, 6, vocab_size=97,
                                  hidden_size=48, num_hidden_layers=2, num_attention_heads=8,
                                  num_key_value_heads=4, intermediate_size=40, max_position_embeddings=32)
    return {"dense": gpt2, "gqa": llama, "model": model}


def test_load_sharded_hf_equals_the_converter(case, checkpoints):
    path = checkpoints["dense" if case.cfg is DENSE else "gqa"]
    want_cfg, want = converters.load(path)  # the converter, itself checked against transformers
    cfg, got = load_sharded(path, case.mesh, fsdp=case.fsdp)
    assert cfg == want_cfg
    specs = param_specs(cfg, fsdp=case.fsdp)
    for g, w, s in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                       jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P)), strict=True):
        assert g.sharding.spec == s and g.sharding.mesh == case.mesh
        np.testing.assert_array_equal(np.asarray(g), w)  # a layout copy: bit-exact


def test_load_sharded_in_memory_model_equals_the_converter(checkpoints):
    case = Case("dense")  # the fallback path: converted whole on the host, then placed leaf by leaf
    want_cfg, want = converters.load(checkpoints["model"])
    cfg, got = load_sharded(checkpoints["model"], case.mesh)
    assert cfg == want_cfg
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    assert got["blocks"]["mlp"]["W_in"].sharding.spec == P(None, None, "model")


def test_load_sharded_converted_reads_only_each_devices_slice(case, tmp_path, monkeypatch):
    import safetensors

    converters.save_converted(tmp_path / "conv", case.cfg, jax.tree_util.tree_map(np.asarray, case.params))
    reads: dict[str, list] = {}
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kw):
            self.f = real(*args, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return RecordingSlice(name, self.f.get_slice(name))

    class RecordingSlice:
        def __init__(self, name, piece):
            self.name, self.piece = name, piece

        def get_shape(self):
            return self.piece.get_shape()

        def __getitem__(self, index):
            out = self.piece[index]
            reads.setdefault(self.name, []).append(out.size)
            return out

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    cfg, got = load_sharded(tmp_path / "conv", case.mesh, fsdp=case.fsdp)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(case.params), strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    # no read larger than one device's slice: an eighth of each matrix split over both axes (or 8-way TP)
    assert max(reads["blocks.attn.W_Q"]) == case.params["blocks"]["attn"]["W_Q"].size // 8
    assert max(reads["blocks.mlp.W_in"]) == case.params["blocks"]["mlp"]["W_in"].size // 8
    assert len(reads["blocks.attn.W_Q"]) == 8  # once per device
    _, half = load_sharded(tmp_path / "conv", case.mesh, fsdp=case.fsdp, dtype=jnp.bfloat16)
    W_in = half["blocks"]["mlp"]["W_in"]
    assert W_in.dtype == jnp.bfloat16 and W_in.sharding.spec == got["blocks"]["mlp"]["W_in"].sharding.spec
    np.testing.assert_array_equal(np.asarray(W_in), np.asarray(case.params["blocks"]["mlp"]["W_in"],
                                                               jnp.bfloat16))


def test_from_pretrained_with_a_mesh(checkpoints):
    case = Case("gqa")  # grouped-query attention, TP x FSDP: the processing (fold_ln, ...) on sharded params
    path = checkpoints["gqa"]
    want = HookedTransformer.from_pretrained(path)  # processed: fold_ln, centring, value biases
    got = HookedTransformer.from_pretrained(path, mesh=case.mesh, fsdp=case.fsdp)
    assert got.cfg == want.cfg
    specs = param_specs(got.cfg, fsdp=case.fsdp)
    for g, s in zip(jax.tree_util.tree_leaves(got.params),
                    jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P)), strict=True):
        assert g.sharding.spec == s
    assert_close(got(TOKENS), want(TOKENS))


def test_load_sharded_refuses_indivisible_kv_heads(checkpoints):
    # GQA: n_heads=8 divides, its 4 kv heads do not
    with pytest.raises(InputError, match="n_key_value_heads=4 is not divisible by the .model. axis of size"):
        load_sharded(checkpoints["gqa"], make_mesh(model=8))


# -- the sweep: cells over `data`, weights over `model` ------------------------------------------------------
def test_sweep(case):
    clean = TOKENS
    corrupted = clean.at[:, 2].set((clean[:, 2] + 11) % 97)
    metric = lambda logits: (logits[:, -1, 3] - logits[:, -1, 7]).mean()
    kw = dict(hook="attn.hook_z", axes=("layer", "pos", "head"), progress=False, max_windows=1)
    want = patching.sweep(case.params, case.cfg, corrupted, clean, metric, **kw)
    got = patching.sweep(case.sharded, case.cfg, corrupted, clean, metric, mesh=case.mesh, **kw)
    assert got.values.shape == (case.cfg.n_layers, 6, case.cfg.n_heads)
    assert np.abs(np.asarray(want.values)).max() > 1e-2  # patching matters in this model
    assert_close(got.values, want.values)
