"""Training: a synthetic problem with known sparse features is solved (loss falls, the decoder recovers the
features); an interrupted and resumed run equals an uninterrupted one exactly; dictionaries trained together
(vmapped) equal each trained alone; 1 and 8 simulated devices agree; NaN activations stop training with the
step and hook named and the checkpoint kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.dictionaries.base import DictionaryConfig
from jaxlens.dictionaries.train import (
    NonFiniteActivationsError,
    TrainConfig,
    checkpoint_template,
    load_checkpoint,
    train_dictionaries,
)

D, F, B = 16, 32, 64
A, Bh = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
_rng = np.random.default_rng(0)
TRUE = _rng.standard_normal((F, D)).astype(np.float32)
TRUE /= np.linalg.norm(TRUE, axis=1, keepdims=True)


def sparse_batches(batch=B, seed=7):
    """step -> activations built from the TRUE features, about 3 active per vector, at two hooks."""

    def get(step):
        out = {}
        for i, h in enumerate((A, Bh)):
            r = np.random.default_rng([seed, i, step])
            codes = (r.random((batch, F)) < 3 / F) * r.uniform(0.5, 1.5, (batch, F))
            out[h] = jnp.asarray((codes @ TRUE).astype(np.float32))
        return out

    return get


def _cfg(arch="topk", hook=A, **kw):
    k = 4 if arch in ("topk", "batchtopk") else None
    return DictionaryConfig(architecture=arch, d_in=D, d_sae=48, k=k, hook_name=hook, **kw)


def _params(result):
    return [{k: np.asarray(getattr(d, k)[...]) for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
            for d in result.dictionaries]


def test_recovers_known_sparse_features():
    res = train_dictionaries(_cfg(), sparse_batches(batch=256), TrainConfig(steps=300, lr=1e-2), n_devices=1)
    loss = np.array([h["loss"][0] for h in res.history])
    assert loss[-20:].mean() < loss[:5].mean() / 4
    W = np.asarray(res.dictionaries[0].W_dec[...])
    cos = (TRUE @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T).max(1)
    assert (cos > 0.9).mean() >= 0.9, np.sort(cos)
    # scaling folded in: the dictionary reconstructs raw activations
    x = sparse_batches(batch=256, seed=99)(0)[A]
    fvu = float(jnp.square(res.dictionaries[0](x) - x).sum() / jnp.square(x - x.mean(0)).sum())
    assert fvu < 0.2


def test_scaling_factor_is_sqrt_width_over_mean_norm():
    get = sparse_batches()
    res = train_dictionaries(_cfg(), get, TrainConfig(steps=1, n_batches_for_norm_estimate=3), n_devices=1)
    norms = np.mean([np.linalg.norm(np.asarray(get(i)[A]), axis=1).mean() for i in range(3)])
    np.testing.assert_allclose(res.scale_in[0], np.sqrt(D) / norms, rtol=1e-5)


def _interrupt_at(n):
    def on_step(step, metrics):
        if step == n:
            raise KeyboardInterrupt

    return on_step


TC = TrainConfig(steps=7, lr=3e-3, lr_warm_up_steps=2, lr_decay_steps=3, checkpoint_every=2,
                 coefficients=(("l1", 0.3), ("sparsity", 0.1)), coefficient_warm_up_steps=3,
                 dead_feature_window=2)


def test_resume_equals_uninterrupted_run(tmp_path):
    arch = "jumprelu"  # a trained threshold, a sparsity coefficient with warm-up
    cfgs = [_cfg(arch, A), _cfg(arch, Bh)]
    whole = train_dictionaries(cfgs, sparse_batches(), TC, out_dir=tmp_path / "whole", n_devices=1)
    with pytest.raises(KeyboardInterrupt):
        train_dictionaries(cfgs, sparse_batches(), TC, out_dir=tmp_path / "cut", on_step=_interrupt_at(4),
                           n_devices=1)
    assert load_checkpoint(tmp_path / "cut", cfgs, TC, _template(cfgs)) is not None
    resumed = train_dictionaries(cfgs, sparse_batches(), TC, out_dir=tmp_path / "cut", n_devices=1)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]  # restarted from the checkpoint at step 4
    for a, b in zip(_params(whole), _params(resumed), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.history[-1] == whole.history[-1]
    np.testing.assert_array_equal(whole.dictionaries[1].threshold[...],
                                  resumed.dictionaries[1].threshold[...])


def _template(cfgs):
    return checkpoint_template(cfgs, TC)[1]


def test_stacked_training_equals_separate_runs():
    tc = TrainConfig(steps=5, lr=3e-3)
    both = _params(train_dictionaries([_cfg("topk", A), _cfg("topk", Bh)], sparse_batches(), tc, n_devices=1))
    # dictionary i starts from fold_in(key, i): a lone run of the first one is the same problem
    alone_a = _params(train_dictionaries([_cfg("topk", A)], sparse_batches(), tc, n_devices=1))
    for k in alone_a[0]:
        np.testing.assert_allclose(both[0][k], alone_a[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(both[0]["W_dec"], both[1]["W_dec"])


def test_one_and_eight_devices_agree():
    assert len(jax.local_devices()) == 8
    tc = TrainConfig(steps=3, lr=3e-3)
    cfgs = [_cfg("topk", A), _cfg("topk", Bh)]
    one = _params(train_dictionaries(cfgs, sparse_batches(), tc, n_devices=1))
    eight = _params(train_dictionaries(cfgs, sparse_batches(), tc, n_devices=8))
    for a, b in zip(one, eight, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_nan_stops_with_step_and_hook_and_keeps_checkpoint(tmp_path):
    good = sparse_batches()

    def bad(step):
        b = dict(good(step))
        if step == 3:
            b[Bh] = b[Bh].at[5, 2].set(jnp.nan)
        return b

    cfgs = [_cfg("topk", A), _cfg("topk", Bh)]
    tc = TrainConfig(
        steps=6, checkpoint_every=2, n_batches_for_norm_estimate=1)
    with pytest.raises(NonFiniteActivationsError, match=r"at 'blocks.1.hook_resid_post' .* step 3"):
        train_dictionaries(cfgs, bad, tc, out_dir=tmp_path, n_devices=1)
    state, step = load_checkpoint(tmp_path, cfgs, tc, checkpoint_template(cfgs, tc)[1])
    assert step == 2 and all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(state["params"]))


def test_bad_configs_are_clear_errors():
    from jaxlens.dictionaries.base import DictionaryError

    with pytest.raises(DictionaryError, match="same architecture and sizes"):
        train_dictionaries([_cfg("topk", A), _cfg("standard", Bh)], sparse_batches(), TrainConfig(steps=1))
    with pytest.raises(DictionaryError, match="no activations at 'blocks.2.hook_resid_post'"):
        train_dictionaries(_cfg("topk", "blocks.2.hook_resid_post"), sparse_batches(), TrainConfig(steps=1))


def test_dead_features_are_counted_and_fed_to_auxk():
    # one repeated vector and lr 0: TopK fires the same 4 features on every token, forever
    x0 = jnp.asarray(np.tile(TRUE[:3].sum(0), (B, 1)))
    tc = TrainConfig(steps=5, lr=0.0, dead_feature_window=2, normalise_activations=False)
    res = train_dictionaries(_cfg("topk"), lambda step: {A: x0}, tc, n_devices=1)
    # a feature is dead once it has not fired for more than 2 steps: after steps 0, 1, 2 it has missed 1, 2, 3
    assert [h["dead_fraction"][0] for h in res.history] == [0, 0, 44 / 48, 44 / 48, 44 / 48]
    # AuxK sees the dead mask from before each step: features dead from step 3 on
    auxk = [h["auxk"][0] for h in res.history]
    assert auxk[:3] == [0, 0, 0] and min(auxk[3:]) > 0
