"""Every architecture's encode, decode and training loss against a hand computation in numpy on small arrays;
JumpReLU's straight-through gradients against their formula; fold_scaling, normalise_decoder, vmap over
stacked states; bad configs and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlens.dictionaries import (
    DictionaryConfig,
    DictionaryError,
    apply_updates,
    fold_scaling,
    init_dictionary,
    normalise_decoder,
)

D_IN, D_SAE, D_OUT = 5, 7, 3
RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 3, D_IN)).astype(np.float32)
Y = RNG.normal(size=(2, 3, D_OUT)).astype(np.float32)


def make(arch, **kw):
    """A dictionary with random weights, and those weights as numpy."""
    d_out = kw.pop("d_out", D_IN)
    m = init_dictionary(DictionaryConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, d_out=d_out, **kw))
    w = {}
    for name, v in nnx.state(m).to_pure_dict().items():
        arr = RNG.normal(size=np.shape(v)).astype(np.float32) * 0.5
        if name == "threshold":
            arr = np.abs(arr) * 0.3
        if name == "topk_threshold":
            arr = np.float32(0.2)
        getattr(m, name)[...] = jnp.asarray(arr)
        w[name] = arr
    return m, w


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def topk_np(h, k):
    out = np.zeros_like(h)
    flat, res = h.reshape(-1, h.shape[-1]), out.reshape(-1, h.shape[-1])
    for r in range(flat.shape[0]):
        idx = np.argsort(-flat[r])[:k]
        res[r, idx] = np.maximum(flat[r, idx], 0)
    return out


def test_standard_encode_decode_loss():
    m, w = make("standard")
    h = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = np.maximum(h, 0)
    recon = acts @ w["W_dec"] + w["b_dec"]
    close(m.encode(X), acts)
    close(m.decode(acts), recon)
    close(m(X), recon)
    loss, aux = m.training_loss(X, coefficients={"l1": 0.3})
    mse = ((recon - X) ** 2).sum(-1).mean()
    l1 = 0.3 * (acts * np.linalg.norm(w["W_dec"], axis=1)).sum(-1).mean()
    close(aux["mse"], mse)
    close(aux["l1"], l1)
    close(loss, mse + l1)
    close(aux["l0"], (acts > 0).sum(-1).mean())


@pytest.mark.parametrize("rescale", [False, True])
def test_topk_and_auxk(rescale):
    m, w = make("topk", k=2, rescale_acts_by_decoder_norm=rescale)
    norms = np.linalg.norm(w["W_dec"], axis=1)
    h = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    h = h * norms if rescale else h
    acts = topk_np(h, 2)
    recon = (acts / norms if rescale else acts) @ w["W_dec"] + w["b_dec"]
    close(m.encode(X), acts)
    close(m(X), recon)
    dead = np.array([1, 0, 1, 0, 0, 1, 1], bool)  # 4 dead; k_aux = d_in // 2 = 2
    loss, aux = m.training_loss(X, coefficients={"auxk": 0.5}, dead_mask=jnp.asarray(dead))
    aux_acts = np.zeros_like(h)
    for idx in np.ndindex(h.shape[:-1]):
        cand = np.where(dead, h[idx], -np.inf)
        top = np.argsort(-cand)[:2]
        aux_acts[idx][top] = h[idx][top]  # not ReLU'd (SAELens)
    aux_recon = (aux_acts / norms if rescale else aux_acts) @ w["W_dec"]
    auxk = 0.5 * min(4 / 2, 1.0) * ((aux_recon - (X - recon)) ** 2).sum(-1).mean()
    close(aux["auxk"], auxk, 1e-4)
    close(loss, ((recon - X) ** 2).sum(-1).mean() + auxk, 1e-4)
    _, none = m.training_loss(X, dead_mask=jnp.zeros(D_SAE, bool))
    close(none["auxk"], 0.0)


def test_auxk_scale_with_few_dead():
    m, w = make("topk", k=2)
    dead = np.zeros(D_SAE, bool)
    dead[3] = True  # one dead feature: k_aux = min(2, 1), scale 1/2
    _, aux = m.training_loss(X, dead_mask=jnp.asarray(dead))
    h = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    recon = topk_np(h, 2) @ w["W_dec"] + w["b_dec"]
    aux_acts = np.zeros_like(h)
    aux_acts[..., 3] = h[..., 3]
    close(aux["auxk"], 0.5 * ((aux_acts @ w["W_dec"] - (X - recon)) ** 2).sum(-1).mean(), 1e-4)


def test_batchtopk_training_threshold_and_inference():
    m, w = make("batchtopk", k=2)
    h = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    r = np.maximum(h, 0).reshape(-1)
    keep = np.argsort(-r)[: 2 * 6]
    acts = np.zeros_like(r)
    acts[keep] = r[keep]
    acts = acts.reshape(h.shape)
    loss, aux = m.training_loss(X)
    close(aux["acts"], acts)
    close(aux["mse"], ((acts @ w["W_dec"] + w["b_dec"] - X) ** 2).sum(-1).mean())
    new = 0.99 * 0.2 + 0.01 * acts[acts > 0].min()
    close(aux["topk_threshold"], new)
    apply_updates(m, aux)
    close(m.encode(X), np.maximum(h, 0) * (h > new))


@pytest.mark.parametrize("mode", ["step", "tanh"])
def test_jumprelu_forward_loss(mode):
    m, w = make("jumprelu", jumprelu_sparsity_loss_mode=mode)
    h = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = np.maximum(h, 0) * (h > w["threshold"])
    recon = acts @ w["W_dec"] + w["b_dec"]
    close(m.encode(X), acts)
    close(m(X), recon)
    _, aux = m.training_loss(X, coefficients={"sparsity": 0.1})
    norms = np.linalg.norm(w["W_dec"], axis=1)
    want = (h > w["threshold"]).sum(-1) if mode == "step" else np.tanh(4.0 * acts * norms).sum(-1)
    close(aux["sparsity"], 0.1 * want.mean())


def test_jumprelu_straight_through_gradients():
    m, w = make("jumprelu", jumprelu_bandwidth=0.5)  # a wide window, so some pre-activations fall inside
    graphdef, state = nnx.split(m)
    grads = jax.grad(lambda s: nnx.merge(graphdef, s).training_loss(X, coefficients={"sparsity": 0.1})[0])(
        state
    )
    h = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).reshape(-1, D_SAE)
    thr, eps, n = w["threshold"], 0.5, h.shape[0]
    acts = h * (h > thr)
    recon = acts @ w["W_dec"] + w["b_dec"]
    g_acts = 2 * (recon - X.reshape(-1, D_IN)) @ w["W_dec"].T / n  # d mse / d acts
    rect = (np.abs((h - thr) / eps) < 0.5).astype(np.float32)
    d_thr = (-(thr / eps) * rect * g_acts).sum(0) + 0.1 * (-(1 / eps) * rect).sum(0) / n
    assert rect.any()
    close(grads["threshold"][...], d_thr, 1e-4)


def test_transcoders_and_skip():
    for arch, act in [("transcoder", "relu"), ("skip_transcoder", "jumprelu")]:
        m, w = make(arch, d_out=D_OUT, activation=act)
        h = X @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction
        acts = np.maximum(h, 0) * (h > w["threshold"]) if act == "jumprelu" else np.maximum(h, 0)
        out = acts @ w["W_dec"] + w["b_dec"]
        close(m.encode(X), acts)
        close(m.decode(acts), out)
        full = out + (X @ w["W_skip"].T if arch == "skip_transcoder" else 0)
        close(m(X), full)
        _, aux = m.training_loss(X, Y, coefficients={"l1": 0.2})
        close(aux["mse"], ((full - Y) ** 2).sum(-1).mean())
        if act == "relu":
            close(aux["l1"], 0.2 * (acts * np.linalg.norm(w["W_dec"], axis=1)).sum(-1).mean())


def test_cross_layer_transcoder():
    L = 3
    m, w = make("clt", d_out=D_OUT, n_layers=L)
    x = RNG.normal(size=(4, L, D_IN)).astype(np.float32)
    acts = np.stack([np.maximum(x[:, l] @ w["W_enc"][l] + w["b_enc"][l], 0) for l in range(L)], 1)
    out = np.stack(
        [sum(acts[:, s] @ w["W_dec"][s, :, t] for s in range(t + 1)) + w["b_dec"][t] for t in range(L)], 1
    )  # a layer's features write to it and every later layer
    close(m.encode(x), acts)
    close(m(x), out, 1e-4)
    y = RNG.normal(size=(4, L, D_OUT)).astype(np.float32)
    _, aux = m.training_loss(x, y, coefficients={"l1": 0.1})
    close(aux["mse"], ((out - y) ** 2).sum((-1, -2)).mean(), 1e-4)
    norms = np.stack([np.sqrt((w["W_dec"][s, :, s:] ** 2).sum((1, 2))) for s in range(L)])
    close(aux["l1"], 0.1 * (acts * norms).sum((-1, -2)).mean(), 1e-4)


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("standard", {}),
        ("topk", dict(k=3, rescale_acts_by_decoder_norm=True)),
        ("jumprelu", {}),
        ("skip_transcoder", dict(d_out=D_OUT)),
    ],
)
def test_fold_scaling(arch, kw):
    m, _ = make(arch, **kw)
    s, s_out = 2.5, (0.7 if arch == "skip_transcoder" else None)
    trained_on_scaled = lambda x: m(x * s) / (s if s_out is None else s_out)
    want = np.asarray(trained_on_scaled(X))
    fold_scaling(m, s, s_out)
    close(m(X), want, 1e-4)


def test_normalise_decoder_module_and_state():
    m, _ = make("topk", k=2)
    normalise_decoder(m)
    close(np.linalg.norm(m.W_dec[...], axis=1), np.ones(D_SAE))
    s, w = make("standard")
    normalise_decoder(s)  # the standard SAE's loss is norm-weighted: left alone
    close(s.W_dec[...], w["W_dec"])
    t, _ = make("batchtopk", k=2)
    graphdef, state = nnx.split(t)
    new = normalise_decoder(state, t.cfg)
    close(np.linalg.norm(new["W_dec"][...], axis=1), np.ones(D_SAE))


def test_vmap_over_stacked_states_matches_loop():
    cfg = DictionaryConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=2)
    keys = jax.random.split(jax.random.key(1), 3)
    graphdef = nnx.split(init_dictionary(cfg))[0]
    stacked = jax.vmap(lambda k: nnx.split(init_dictionary(cfg, k))[1])(keys)
    xs = jnp.asarray(RNG.normal(size=(3, 6, D_IN)).astype(np.float32))
    loss_fn = lambda s, x: nnx.merge(graphdef, s).training_loss(x)[0]
    got = jax.jit(jax.vmap(loss_fn))(stacked, xs)
    want = [init_dictionary(cfg, k).training_loss(xs[i])[0] for i, k in enumerate(keys)]
    close(got, want)


def test_init_as_saelens():
    m = init_dictionary(DictionaryConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE), jax.random.key(0))
    close(np.linalg.norm(m.W_dec[...], axis=1), np.full(D_SAE, 0.1))
    close(m.W_enc[...], m.W_dec[...].T)
    close(m.b_enc[...], np.zeros(D_SAE))


def test_bad_configs_and_inputs():
    with pytest.raises(DictionaryError, match="Unknown dictionary architecture 'gated'"):
        DictionaryConfig(architecture="gated", d_in=4, d_sae=8)
    with pytest.raises(DictionaryError, match="needs k"):
        DictionaryConfig(architecture="topk", d_in=4, d_sae=8)
    with pytest.raises(DictionaryError, match="apply_b_dec_to_input must be False"):
        DictionaryConfig(architecture="transcoder", d_in=4, d_sae=8, apply_b_dec_to_input=True)
    with pytest.raises(DictionaryError, match="n_layers"):
        DictionaryConfig(architecture="clt", d_in=4, d_sae=8)
    m, _ = make("standard")
    with pytest.raises(DictionaryError, match=r"d_in=5; found an input of shape \(2, 4\)"):
        m.encode(jnp.zeros((2, 4)))
    t, _ = make("transcoder", d_out=D_OUT)
    with pytest.raises(DictionaryError, match="needs the target"):
        t.training_loss(X)
