"""SAELens and circuit-tracer formats: SAEs saved by SAELens 6.54.12 load in jaxlens with equal outputs,
SAELens loads what jaxlens saves (every architecture, a pre-6.0 config too), and the same both ways with
circuit-tracer 0.5's transcoder files (per-layer, sets, cross-layer; transposed layout); bad files raise
clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saelens_ref
from flax import nnx
from ref_envs import run_script

from jaxlens.converters._checkpoint import write_safetensors
from jaxlens.dictionaries import (
    DictionaryConfig,
    DictionaryError,
    init_dictionary,
    load_circuit_tracer,
    load_saelens,
    save_circuit_tracer,
    save_saelens,
)
from jaxlens.errors import CheckpointError

D_IN, D_SAE, D_OUT, K = 6, 10, 4, 3
TOL = 1e-5


def randomised(cfg, seed):
    m = init_dictionary(cfg, jax.random.key(seed))
    for i, (name, v) in enumerate(nnx.state(m).to_pure_dict().items()):
        arr = jax.random.normal(jax.random.key(seed * 31 + i), jnp.shape(v)) * 0.4
        if "threshold" in name:
            arr = jnp.abs(arr) * 0.5
        getattr(m, name)[...] = arr
    return m


JAXLENS_CASES = {
    "standard": dict(architecture="standard"),
    "topk_rescale": dict(architecture="topk", k=K, rescale_acts_by_decoder_norm=True),
    "jumprelu": dict(architecture="jumprelu"),
    "batchtopk": dict(architecture="batchtopk", k=K),
    "transcoder": dict(architecture="transcoder", d_out=D_OUT),
    "jumprelu_skip_transcoder": dict(architecture="skip_transcoder", d_out=D_OUT, activation="jumprelu"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Runs the SAELens script once: its SAEs and outputs, and its outputs on what jaxlens saved."""
    exe = saelens_ref.saelens_python()
    work = tmp_path_factory.mktemp("saelens")
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, D_IN)))
    np.save(work / "x.npy", x)
    (work / "meta.json").write_text(json.dumps(dict(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=K)))
    mine = {}
    for i, (name, kw) in enumerate(JAXLENS_CASES.items()):
        m = randomised(DictionaryConfig(d_in=D_IN, d_sae=D_SAE, hook_name="blocks.2.hook_resid_pre", **kw), i)
        save_saelens(m, work / "jaxlens" / name)
        mine[name] = m
    _write_pre6(work / "jaxlens" / "pre6_topk")
    run_script(exe, saelens_ref.SAELENS_SCRIPT, str(work))
    return work, x, mine


def _write_pre6(path):
    """A cfg.json as SAELens 3-5 wrote it (hook_point, hook_layer, activation_fn_kwargs, training keys)."""
    path.mkdir(parents=True)
    w = {
        n: np.asarray(jax.random.normal(jax.random.key(i + 50), s)) * 0.4
        for i, (n, s) in enumerate(
            [("W_enc", (D_IN, D_SAE)), ("b_enc", (D_SAE,)), ("W_dec", (D_SAE, D_IN)), ("b_dec", (D_IN,))]
        )
    }
    write_safetensors(w, path / "sae_weights.safetensors")
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2",
        "hook_point": "blocks.2.hook_resid_pre",
        "hook_layer": 2,
        "hook_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "3.13.0",
        "prepend_bos": True,
        "dataset_path": "x",
        "context_size": 128,
        "normalize_activations": False,
        "l1_coefficient": 5.0,
        "lr": 3e-4,
        "neuronpedia_id": None,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.reference_env
@pytest.mark.parametrize("case", saelens_ref.SAELENS_CASES)
def test_saelens_saved_loads_in_jaxlens(work, case):
    work, x, _ = work
    ref = np.load(work / f"saelens_{case}.npz")
    sae = load_saelens(work / "saelens" / case)
    np.testing.assert_allclose(sae.encode(x), ref["encode"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(sae(x), ref["forward"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(
        sae.decode(sae.encode(x)) + (sae.skip(x) if hasattr(sae, "skip") else 0),
        ref["forward"],
        atol=TOL,
        rtol=TOL,
    )
    assert (np.asarray(ref["encode"]) != 0).any()


@pytest.mark.reference_env
@pytest.mark.parametrize("case", list(JAXLENS_CASES) + ["pre6_topk"])
def test_jaxlens_saved_loads_in_saelens(work, case):
    work, x, mine = work
    ref = np.load(work / f"jaxlens_{case}.npz")
    sae = mine.get(case) or load_saelens(work / "jaxlens" / case)
    want_arch = {
        "batchtopk": "jumprelu",
        "jumprelu_skip_transcoder": "jumprelu_skip_transcoder",
        "pre6_topk": "topk",
    }.get(case, case.removesuffix("_rescale"))
    assert str(ref["architecture"]) == want_arch
    np.testing.assert_allclose(sae.encode(x), ref["encode"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(sae(x), ref["forward"], atol=TOL, rtol=TOL)
    again = load_saelens(work / "jaxlens" / case)  # and jaxlens reads its own files back
    np.testing.assert_allclose(again(x), ref["forward"], atol=TOL, rtol=TOL)


# -- circuit-tracer ------------------------------------------------------------------------------------------
def test_circuit_tracer_transcoder_file_layout(tmp_path):
    """A per-layer file written as circuit-tracer's `to_safetensors` writes it (W_enc transposed) reads back
    to the documented computation: relu(x @ W_enc.T + b_enc) @ W_dec + b_dec + x @ W_skip.T."""
    rng = np.random.default_rng(0)
    t = {
        "W_enc": rng.normal(size=(D_SAE, D_IN)),
        "b_enc": rng.normal(size=D_SAE),
        "W_dec": rng.normal(size=(D_SAE, D_IN)),
        "b_dec": rng.normal(size=D_IN),
        "W_skip": rng.normal(size=(D_IN, D_IN)),
        "activation_function.threshold": np.abs(rng.normal(size=D_SAE)) * 0.3,
    }
    write_safetensors(t, tmp_path / "layer_3.safetensors")
    tc = load_circuit_tracer(tmp_path / "layer_3.safetensors", layer=3)
    x = rng.normal(size=(4, D_IN)).astype(np.float32)
    pre = x @ t["W_enc"].T + t["b_enc"]
    acts = pre * (pre > t["activation_function.threshold"])
    np.testing.assert_allclose(tc.encode(x), acts, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        tc(x), acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T, atol=1e-4, rtol=1e-4
    )
    assert tc.cfg.hook_name == "blocks.3.hook_resid_mid" and tc.cfg.hook_name_out == "blocks.3.hook_mlp_out"


def test_circuit_tracer_set_and_clt_round_trip(tmp_path):
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, D_IN)))
    cfg = dict(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, hook_name="blocks.{}.ln2.hook_normalized")
    tset = {
        l: randomised(
            DictionaryConfig(
                architecture="transcoder",
                **{
                    **cfg,
                    "hook_name": f"blocks.{l}.ln2.hook_normalized",
                    "hook_name_out": f"blocks.{l}.hook_mlp_out",
                },
            ),
            l,
        )
        for l in range(3)
    }
    save_circuit_tracer(tset, tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "config.yaml",
        "layer_0.safetensors",
        "layer_1.safetensors",
        "layer_2.safetensors",
    ]
    back = load_circuit_tracer(tmp_path / "set")
    for l in range(3):
        np.testing.assert_allclose(back[l](x), tset[l](x), atol=1e-6)
        assert back[l].cfg.hook_name == f"blocks.{l}.ln2.hook_normalized"
    clt = randomised(
        DictionaryConfig(
            architecture="clt",
            n_layers=3,
            activation="jumprelu",
            d_in=D_IN,
            d_sae=D_SAE,
            hook_name="blocks.{layer}.hook_resid_mid",
            hook_name_out="blocks.{layer}.hook_mlp_out",
        ),
        7,
    )
    save_circuit_tracer(clt, tmp_path / "clt")
    from jaxlens.converters._checkpoint import read_safetensors

    dec1 = read_safetensors(tmp_path / "clt" / "W_dec_1.safetensors")["W_dec_1"]()
    assert dec1.shape == (D_SAE, 2, D_IN)  # layer 1 writes to layers 1 and 2
    enc0 = read_safetensors(tmp_path / "clt" / "W_enc_0.safetensors")
    np.testing.assert_allclose(enc0["W_enc_0"](), np.asarray(clt.W_enc[...][0]).T)  # transposed on disk
    back = load_circuit_tracer(tmp_path / "clt")
    xs = np.asarray(jax.random.normal(jax.random.key(2), (3, 3, D_IN)))
    np.testing.assert_allclose(back(xs), clt(xs), atol=1e-5)


@pytest.fixture(scope="module")
def ct_work(tmp_path_factory):
    """Runs the circuit-tracer script once: its files and outputs, and its outputs on what jaxlens wrote."""
    exe = saelens_ref.circuit_tracer_python()
    work = tmp_path_factory.mktemp("circuit_tracer")
    x = np.asarray(jax.random.normal(jax.random.key(3), (5, D_IN)))
    # [layer n d], circuit-tracer's layout
    xs = np.asarray(jax.random.normal(jax.random.key(4), (3, 5, D_IN)))
    np.save(work / "x.npy", x)
    np.save(work / "xs.npy", xs)
    (work / "meta.json").write_text(json.dumps(dict(d_in=D_IN, d_sae=D_SAE, n_layers=3)))
    tset = {
        l: randomised(DictionaryConfig(architecture="transcoder", d_in=D_IN, d_sae=D_SAE), 20 + l)
        for l in range(3)
    }
    save_circuit_tracer(tset, work / "jaxlens" / "set")
    clt_cfg = DictionaryConfig(architecture="clt", n_layers=3, activation="jumprelu", d_in=D_IN, d_sae=D_SAE)
    clt = randomised(clt_cfg, 30)
    save_circuit_tracer(clt, work / "jaxlens" / "clt")
    run_script(exe, saelens_ref.CIRCUIT_TRACER_SCRIPT, str(work))
    return work, x, xs, tset, clt


@pytest.mark.reference_env
def test_circuit_tracer_written_loads_in_jaxlens(ct_work):
    work, x, xs, _, _ = ct_work
    skip = load_circuit_tracer(work / "ct" / "plt_skip.safetensors", layer=2)
    ref = np.load(work / "ct_plt_skip.npz")
    assert skip.cfg.architecture == "skip_transcoder" and skip.cfg.activation == "jumprelu"
    np.testing.assert_allclose(skip.encode(x), ref["encode"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(skip(x), ref["forward"], atol=TOL, rtol=TOL)
    tset = load_circuit_tracer(work / "ct" / "set")
    assert sorted(tset) == [0, 1, 2]
    for l, tc in tset.items():
        ref = np.load(work / f"ct_set_{l}.npz")
        np.testing.assert_allclose(tc.encode(x), ref["encode"], atol=TOL, rtol=TOL)
        np.testing.assert_allclose(tc(x), ref["forward"], atol=TOL, rtol=TOL)
    clt, ref = load_circuit_tracer(work / "ct" / "clt"), np.load(work / "ct_clt.npz")
    ours = np.swapaxes(xs, 0, 1)  # jaxlens reads [n layer d]
    np.testing.assert_allclose(np.swapaxes(clt.encode(ours), 0, 1), ref["encode"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.swapaxes(clt(ours), 0, 1), ref["forward"], atol=1e-4, rtol=1e-4)
    assert (ref["encode"] != 0).any() and (ref["encode"] == 0).any()


@pytest.mark.reference_env
def test_jaxlens_written_loads_in_circuit_tracer(ct_work):
    work, x, xs, tset, clt = ct_work
    for l, tc in tset.items():
        ref = np.load(work / f"jl_set_{l}.npz")
        np.testing.assert_allclose(tc.encode(x), ref["encode"], atol=TOL, rtol=TOL)
        np.testing.assert_allclose(tc(x), ref["forward"], atol=TOL, rtol=TOL)
    ref, ours = np.load(work / "jl_clt.npz"), np.swapaxes(xs, 0, 1)
    np.testing.assert_allclose(np.swapaxes(clt.encode(ours), 0, 1), ref["encode"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.swapaxes(clt(ours), 0, 1), ref["forward"], atol=1e-4, rtol=1e-4)


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    m = randomised(DictionaryConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE), 0)
    return save_saelens(m, tmp_path / "sae")


def _edit_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_unknown_architecture_and_key(saved):
    _edit_cfg(saved, architecture="gated")
    with pytest.raises(DictionaryError, match="unknown SAELens architecture 'gated'"):
        load_saelens(saved)
    _edit_cfg(saved, architecture="standard", frobnicate=3)
    with pytest.raises(DictionaryError, match="unknown SAELens config key.*'frobnicate'"):
        load_saelens(saved)
    assert load_saelens(saved, strict=False).cfg.d_sae == D_SAE


def test_shape_mismatch_and_missing_files(saved, tmp_path):
    _edit_cfg(saved, d_in=D_IN + 1)
    with pytest.raises(DictionaryError, match=r"tensor 'W_dec' has shape \(10, 6\).*needs \(10, 7\)"):
        load_saelens(saved)
    with pytest.raises(DictionaryError, match="cfg.json is missing"):
        load_saelens(tmp_path)


def test_corrupt_safetensors(saved):
    w = saved / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match="truncated"):
        load_saelens(saved)
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_saelens(saved)


def test_pickle_never_loaded(saved):
    (saved / "sae_weights.safetensors").unlink()
    (saved / "sae_weights.pt").write_bytes(b"pickled")
    with pytest.raises(DictionaryError, match="sae_weights.safetensors is missing"):
        load_saelens(saved)


def test_circuit_tracer_bad_files(tmp_path):
    with pytest.raises(DictionaryError, match="holds no circuit-tracer transcoders"):
        load_circuit_tracer(tmp_path)
    write_safetensors(
        {
            "W_enc": np.zeros((D_SAE, D_IN)),
            "b_enc": np.zeros(D_SAE),
            "W_dec": np.zeros((D_SAE + 1, D_IN)),
            "b_dec": np.zeros(D_IN),
        },
        tmp_path / "layer_0.safetensors",
    )
    with pytest.raises(DictionaryError, match=r"tensor 'W_dec' has shape \(11, 6\), expected \(10, 6\)"):
        load_circuit_tracer(tmp_path)
