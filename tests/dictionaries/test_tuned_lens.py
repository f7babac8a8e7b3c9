"""The tuned lens against a hand computation, the logit lens (its value at initialisation), training on a
small random model and on the real SmolLM2, and its two file formats."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import testing
from jaxlens.analysis.logit_lens import logit_lens
from jaxlens.dictionaries.tuned_lens import (
    TunedLens,
    compare_lenses,
    lens_kl,
    load_tuned_lens,
    load_tuned_lens_package,
    save_tuned_lens,
    train_tuned_lens,
)
from jaxlens.errors import CheckpointError, InputError, UnsafeCheckpointError
from jaxlens.hooked_transformer import HookedTransformer
from jaxlens.model.forward import forward

CFG = testing.tiny_config(n_heads=6, n_key_value_heads=2, d_head=6, normalization_type="RMS",
                          positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")


random_params = testing.numpy_params


@pytest.fixture(scope="module")
def tiny():
    params = random_params(CFG, 0)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, CFG.d_vocab, (24, 10)), jnp.int32)
    return params, tokens


def random_lens(seed: int, scale: float = 0.05) -> TunedLens:
    rng = np.random.RandomState(seed)
    lens = TunedLens(CFG.n_layers, CFG.d_model)
    lens.W[...] = jnp.asarray(scale * rng.randn(CFG.n_layers, CFG.d_model, CFG.d_model), jnp.float32)
    lens.b[...] = jnp.asarray(rng.randn(CFG.n_layers, CFG.d_model), jnp.float32)
    return lens


def kl_numpy(final_logits, lens_logits) -> np.ndarray:
    """Mean over tokens of KL(final || lens), per leading layer entry, in float64."""
    def logsm(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p = logsm(final_logits)
    q = logsm(lens_logits)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return kl.reshape(kl.shape[0], -1).mean(-1)


def test_lens_logits_equal_a_hand_computation(tiny):
    params, tokens = tiny
    lens = random_lens(0)
    _, cache = forward(params, CFG, tokens[:3], cache_names=("blocks.hook_resid_pre",))
    resid = np.asarray(cache["blocks.hook_resid_pre"], np.float64)  # [layer batch pos d_model]
    W, b = np.asarray(lens.W[...], np.float64), np.asarray(lens.b[...], np.float64)
    h = resid + np.einsum("lbpd,lde->lbpe", resid, W) + b[:, None, None]
    h = h / np.sqrt((h**2).mean(-1, keepdims=True) + CFG.eps) * np.asarray(params["ln_final"]["w"])
    want = h @ np.asarray(params["unembed"]["W_U"]) + np.asarray(params["unembed"]["b_U"])
    got = lens.logits(params, CFG, cache["blocks.hook_resid_pre"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # a subset of layers reads those translators
    sub = lens.logits(params, CFG, cache["blocks.hook_resid_pre"][jnp.array([2, 0])], layers=[2, 0])
    np.testing.assert_allclose(sub, want[[2, 0]], rtol=1e-4, atol=1e-4)


def test_at_initialisation_it_is_the_logit_lens(tiny):
    params, tokens = tiny
    model = HookedTransformer(CFG, params)
    final, cache = model.run_with_cache(tokens[:4], names_filter=lambda n: n.endswith("resid_pre")
                                        or n == f"blocks.{CFG.n_layers - 1}.hook_resid_post")
    reference = logit_lens(cache)  # components "0_pre" .. "2_pre", "final_post"
    assert reference.labels[: CFG.n_layers] == [f"{i}_pre" for i in range(CFG.n_layers)]
    lens = TunedLens(CFG.n_layers, CFG.d_model)
    resid = cache["blocks.hook_resid_pre"]
    np.testing.assert_array_equal(lens.translate(resid), resid)
    np.testing.assert_allclose(lens.logits(params, CFG, resid), reference.logits[: CFG.n_layers], rtol=1e-6,
                               atol=1e-6)
    want = kl_numpy(np.broadcast_to(final, reference.logits[: CFG.n_layers].shape),
                    reference.logits[: CFG.n_layers])
    np.testing.assert_allclose(lens_kl(params, CFG, tokens[:4], batch_size=3), want, rtol=1e-4)
    np.testing.assert_allclose(lens_kl(params, CFG, tokens[:4], lens), want, rtol=1e-4)


def test_training_lowers_kl_at_every_layer(tiny):
    params, tokens = tiny
    train, held_out = tokens[:16], tokens[16:]
    lens = train_tuned_lens(params, CFG, train, steps=60, batch_size=8, key=jax.random.key(3))
    for toks in (train, held_out):
        cmp = compare_lenses(lens, params, CFG, toks)
        assert cmp.tuned_kl.shape == cmp.logit_kl.shape == (CFG.n_layers,)
        assert np.all(cmp.tuned_kl < cmp.logit_kl), (cmp.tuned_kl, cmp.logit_kl)
    # training some layers leaves the others exactly the identity
    part = train_tuned_lens(params, CFG, train, steps=5, batch_size=4, layers=[1])
    assert np.abs(np.asarray(part.W[...][1])).max() > 0
    np.testing.assert_array_equal(part.W[...][jnp.array([0, 2])], 0.0)
    np.testing.assert_array_equal(part.b[...][jnp.array([0, 2])], 0.0)


def test_save_and_load_check_the_model(tiny, tmp_path):
    params, _ = tiny
    lens = random_lens(1)
    path = save_tuned_lens(lens, tmp_path / "lens.safetensors", params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.safetensors"]  # atomic: no temporary left
    back = load_tuned_lens(path, CFG, params)
    np.testing.assert_array_equal(back.W[...], lens.W[...])
    np.testing.assert_array_equal(back.b[...], lens.b[...])
    with pytest.raises(CheckpointError, match=r"n_layers=3, d_model=40; this model has n_layers=4"):
        load_tuned_lens(path, CFG.replace(n_layers=4))
    other = random_params(CFG, 7)
    with pytest.raises(CheckpointError, match="different unembedding"):
        load_tuned_lens(path, CFG, other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="Cannot read the tuned lens"):
        load_tuned_lens(tmp_path / "bad.safetensors", CFG)


def test_the_tuned_lens_package_format(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    params, tokens = tiny
    torch.manual_seed(0)
    layers = [torch.nn.Linear(CFG.d_model, CFG.d_model) for _ in range(CFG.n_layers)]
    state = {f"{i}.{k}": v for i, lin in enumerate(layers) for k, v in lin.state_dict().items()}
    config = {"base_model_name_or_path": "tiny", "d_model": CFG.d_model, "num_hidden_layers": CFG.n_layers,
              "bias": True, "lens_type": "linear_tuned_lens"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "params.pt")
    with pytest.raises(UnsafeCheckpointError, match="params.pt is a PyTorch pickle.*allow_pickle=True"):
        load_tuned_lens_package(tmp_path, CFG)
    lens = load_tuned_lens_package(tmp_path, CFG, allow_pickle=True)
    _, cache = forward(params, CFG, tokens[:2], cache_names=("blocks.hook_resid_pre",))
    resid = np.array(cache["blocks.hook_resid_pre"])
    with torch.no_grad():  # the package's transform_hidden: h + translator(h)
        want = np.stack([(torch.as_tensor(h) + lin(torch.as_tensor(h))).numpy()
                         for h, lin in zip(resid, layers, strict=True)])
    np.testing.assert_allclose(lens.translate(resid), want, rtol=1e-5, atol=1e-5)
    # a converted params.safetensors with the same keys needs no pickle
    (tmp_path / "params.pt").unlink()
    save_file({k: v.numpy() for k, v in state.items()}, str(tmp_path / "params.safetensors"))
    np.testing.assert_allclose(load_tuned_lens_package(tmp_path, CFG).W[...], lens.W[...])
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(CheckpointError, match="num_hidden_layers=5.*this model has n_layers=3"):
        load_tuned_lens_package(tmp_path, CFG)


def test_bad_input_is_a_clear_error(tiny):
    params, tokens = tiny
    lens = TunedLens(CFG.n_layers, CFG.d_model)
    with pytest.raises(InputError, match=r"3 layers and d_model=40; found shape \(2, 5, 40\)"):
        lens.translate(jnp.zeros((2, 5, 40)))
    with pytest.raises(InputError, match=r"distinct layer indices in \[0, 3\); found \[3\]"):
        train_tuned_lens(params, CFG, tokens, steps=1, layers=[3])
    with pytest.raises(InputError, match="batch_size must be between 1 and the number of sequences"):
        train_tuned_lens(params, CFG, tokens[:2], steps=1, batch_size=4)
    with pytest.raises(InputError, match=r"\[n_seq pos\]; found shape \(10,\)"):
        lens_kl(params, CFG, tokens[0])
    with pytest.raises(InputError, match="4 translators of width 40; the model has n_layers=3"):
        lens_kl(params, CFG, tokens, TunedLens(4, CFG.d_model))


@pytest.mark.slow
def test_smollm2_tuned_lens_beats_the_logit_lens(smollm2_gguf):
    """Short training (12 steps of 4 x 32 tokens of Python's documentation) of three translators: the tuned
    lens has a lower KL than the logit lens on held-out documentation, and the last layer's translator stays
    nearer the identity than the first's (in weights, and in how far it moves held-out residuals)."""
    import pydoc_data.topics

    model = HookedTransformer.from_pretrained_no_processing(smollm2_gguf)
    topics = pydoc_data.topics.topics
    names = sorted(topics)

    def chunks(keys, n_seq, seq=32):
        ids = []
        for k in keys:
            ids += model.tokenizer(topics[k])["input_ids"]
        return np.asarray(ids[: n_seq * seq]).reshape(n_seq, seq)

    train, held_out = chunks(names[:12], 16), chunks(names[-12:], 4)
    layers = [0, 14, 29]
    lens = train_tuned_lens(model.params, model.cfg, train, steps=12, batch_size=4, layers=layers)
    cmp = compare_lenses(lens, model.params, model.cfg, held_out, layers=layers)
    print("KL tuned", cmp.tuned_kl, "logit", cmp.logit_kl)
    assert np.all(cmp.tuned_kl < 0.8 * cmp.logit_kl), (cmp.tuned_kl, cmp.logit_kl)
    _, cache = model.run_with_cache(jnp.asarray(held_out), names_filter="blocks.hook_resid_pre")
    h = cache["blocks.hook_resid_pre"][jnp.array(layers)]
    moved = np.linalg.norm(lens.translate(h, layers) - h, axis=-1) / np.linalg.norm(h, axis=-1)
    moved = moved.reshape(len(layers), -1).mean(-1)
    # the translator is I + W: |W|_F against |I|_F = sqrt(d_model)
    off = np.linalg.norm(np.asarray(lens.W[...])[layers], axis=(1, 2)) / np.sqrt(model.cfg.d_model)
    print("relative change of the residual", moved, "|W|/|I|", off)
    assert moved[-1] < moved[0] and off[-1] < off[0] and off[-1] < 0.05
