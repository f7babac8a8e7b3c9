"""Direct logit attribution: the parts sum to the model's own logit difference, and each part equals a hand
computation (head output z @ W_O, neuron post x W_out row) through the cached final norm scale."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import HookedTransformer
from jaxlens.analysis import head_dla, layer_dla, neuron_dla
from jaxlens.errors import InputError

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (3, 9)))
RIGHT, WRONG = jnp.asarray([5, 17, 40]), jnp.asarray([8, 8, 60])


_RUNS = {}


def run(cfg, params, process=False):
    key = (id(params), process)
    if key not in _RUNS:
        _RUNS[key] = _run(cfg, params, process)
    return _RUNS[key]


def _run(cfg, params, process):
    if process:
        cfg, params = jaxlens.process_weights(cfg, params)
    model = HookedTransformer(cfg, params)
    logits, cache = model.run_with_cache(TOKENS)
    diff = np.asarray(logits[np.arange(3), -1, RIGHT] - logits[np.arange(3), -1, WRONG])
    return cfg, params, cache, diff


@pytest.mark.parametrize("process", [False, True])
def test_layer_and_head_dla_sum_to_logit_difference(any_model, process):
    cfg, params, cache, diff = run(*any_model, process=process)
    attrs, labels = layer_dla(cache, RIGHT, WRONG)
    assert attrs.shape == (len(labels), 3) and labels[-1] == "bias" and labels[0] == "embed"
    np.testing.assert_allclose(np.asarray(attrs).sum(0), diff, rtol=1e-4, atol=1e-4)
    # per head: heads + each layer's b_O + the MLP layers + embeddings + bias = the same difference
    heads = np.asarray(head_dla(cache, RIGHT, WRONG))
    assert heads.shape == (cfg.n_layers, cfg.n_heads, 3)
    attn_rows = [i for i, n in enumerate(labels) if n.endswith("attn_out")]
    b_O = np.asarray(attrs)[attn_rows] - heads.sum(1)  # what the heads leave of attn_out: b_O's part
    direction = _direction(cfg, params, RIGHT, WRONG)
    scale = np.asarray(cache["ln_final.hook_scale"])[:, -1, 0]
    b_O_centred = _center(cfg, np.asarray(params["blocks"]["attn"]["b_O"]))
    want_b_O = np.einsum("ld,bd->lb", b_O_centred, direction) / scale
    np.testing.assert_allclose(b_O, want_b_O, rtol=1e-4, atol=1e-5)


def test_head_dla_is_z_times_W_O_through_the_final_scale(any_model):
    cfg, params, cache, _ = run(*any_model)
    got = np.asarray(head_dla(cache, RIGHT, WRONG, pos_slice=None))  # [l h b p]
    direction = _direction(cfg, params, RIGHT, WRONG)
    scale = np.asarray(cache["ln_final.hook_scale"])[..., 0]
    l, h, p = 2, 3, 4
    out = np.asarray(cache["z", l])[:, p, h] @ np.asarray(params["blocks"]["attn"]["W_O"][l, h])  # [b d]
    want = (_center(cfg, out) * direction).sum(-1) / scale[:, p]
    np.testing.assert_allclose(got[l, h, :, p], want, rtol=1e-4, atol=1e-5)


def test_neurons_plus_b_out_sum_to_mlp_layer(any_model):
    cfg, params, cache, _ = run(*any_model)
    neurons = np.asarray(neuron_dla(cache, RIGHT, WRONG))  # [l b m]
    attrs, labels = layer_dla(cache, RIGHT, WRONG)
    mlp_rows = [i for i, n in enumerate(labels) if n.endswith("mlp_out")]
    direction = _direction(cfg, params, RIGHT, WRONG)
    scale = np.asarray(cache["ln_final.hook_scale"])[:, -1, 0]
    b_out_centred = _center(cfg, np.asarray(params["blocks"]["mlp"]["b_out"]))
    b_out = np.einsum("ld,bd->lb", b_out_centred, direction) / scale
    np.testing.assert_allclose(neurons.sum(-1) + b_out, np.asarray(attrs)[mlp_rows], rtol=1e-4, atol=1e-4)
    # one neuron by hand
    post = np.asarray(cache["post", 1])[:, -1, 7]
    w = np.asarray(params["blocks"]["mlp"]["W_out"][1, 7])
    np.testing.assert_allclose(neurons[1, :, 7], post * (_center(cfg, w) * direction).sum(-1) / scale,
                               rtol=1e-4, atol=1e-6)


def test_plain_logit_and_single_prompt_cache(gpt):
    cfg, params = gpt
    model = HookedTransformer(cfg, params)
    logits, cache = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    attrs, _ = layer_dla(cache, 5, pos_slice=3)
    assert attrs.ndim == 1
    np.testing.assert_allclose(float(attrs.sum()), float(logits[0, 3, 5]), rtol=1e-4, atol=1e-4)


def test_bad_tokens(gpt):
    _, _, cache, _ = run(*gpt)
    with pytest.raises(InputError, match="outside the vocabulary"):
        layer_dla(cache, 500)
    with pytest.raises(InputError, match="integer token ids"):
        head_dla(cache, jnp.asarray([0.5]))


def _direction(cfg, params, right, wrong):
    W_U = np.asarray(params["unembed"]["W_U"], np.float64)
    d = (W_U[:, np.asarray(right)] - W_U[:, np.asarray(wrong)]).T
    if cfg.normalization_type in ("LN", "RMS"):
        d = d * np.asarray(params["ln_final"]["w"])
    return _center(cfg, d)


def _center(cfg, x):
    return x - x.mean(-1, keepdims=True) if cfg.normalization_type in ("LN", "LNPre") else x
