"""`jaxlens train-transcoders` end to end on a tiny random Llama-like model (RMSNorm, gated MLP): one run
trains every layer's transcoder, held-out reconstruction beats the initial one, the circuit-tracer folder
loads back and reproduces the trained modules, the metrics equal a numpy recomputation (per-layer FVU, and
the loss with every MLP replaced built layer by layer from plain patches), an interrupted run resumes to the
uninterrupted result, and bad input is a clear error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import cli, testing

WORDS = ("the quick brown fox jumps over lazy dog when mary and john went to store gave drink capital of "
         "france is paris induction heads copy repeated tokens").split()
CTX, N_EVAL = 16, 8


def _text(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS, 12)).capitalize() + "." for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from jaxlens import converters

    root = tmp_path_factory.mktemp("train_transcoders")
    tok = testing.train_tiny_tokenizer(root / "tok")
    cfg = testing.tiny_config(d_vocab=len(tok), normalization_type="RMS", gated_mlp=True, act_fn="silu")
    params = jax.tree_util.tree_map(np.asarray, testing.numpy_params(cfg, seed=4))
    converters.save_converted(root / "tiny", cfg, params, tok)
    (root / "train.txt").write_text(_text(0, 400))
    (root / "eval.txt").write_text(_text(1, 60))
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLENS_CACHE", str(root / "cache"))
    yield root
    mp.undo()


def _settings(root, **kw):
    from jaxlens.dictionaries.train_transcoders import TrainTranscodersSettings

    base = dict(model=str(root / "tiny"), d_sae=48, k=8, tokens=64 * 32, context_size=CTX, batch_size=64,
                checkpoint_every=4, eval_sequences=N_EVAL, lr=1e-2, topk_threshold_lr=0.3, seed=1,
                train_text=str(root / "train.txt"), eval_text=str(root / "eval.txt"))
    return TrainTranscodersSettings(**(base | kw))


@pytest.fixture(scope="module")
def straight(setup):
    from jaxlens.dictionaries.train_transcoders import train_transcoders

    out = setup / "straight"
    return out, train_transcoders(_settings(setup), out, progress=False)


@pytest.fixture(scope="module")
def model_and_rows(setup):
    from jaxlens.dictionaries.corpus import load_corpus
    from jaxlens.dictionaries.evals import evaluation_rows
    from jaxlens.hooked_transformer import HookedTransformer

    model = HookedTransformer.from_pretrained(setup / "tiny")
    held = load_corpus(setup / "eval.txt", model.tokenizer)
    rows = held.sequences(CTX, evaluation_rows(held.n_sequences(CTX), N_EVAL))  # the rows evaluated
    return model, jnp.asarray(rows)


def _np_transcoder(t: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(acts, output) of a circuit-tracer transcoder file's tensors, in float64 numpy."""
    h = x @ t["W_enc"].astype(np.float64).T + t["b_enc"]
    thr = t.get("activation_function.threshold")
    acts = np.maximum(h, 0) if thr is None else h * (h > thr)
    return acts, acts @ t["W_dec"].astype(np.float64) + t["b_dec"]


def _read(path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_one_run_trains_every_layer_and_beats_the_initial_reconstruction(setup, straight, model_and_rows):
    from jaxlens.dictionaries.base import DictionaryConfig, init_dictionary

    out, run = straight
    model, rows = model_and_rows
    assert sorted(run.transcoders) == [0, 1, 2] and run.metrics["layers_trained"] == [0, 1, 2]
    assert {f"layer_{i}.safetensors" for i in range(3)} | {"config.yaml", "metrics.json", "checkpoint"} <= {
        p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 32 and m["steps_this_run"] == 32 and m["tokens"] == 64 * 32
    _, cache = model.run_with_cache(rows)
    for layer in range(3):
        x = np.asarray(cache[f"blocks.{layer}.ln2.hook_normalized"][:, 1:], np.float64).reshape(-1, 40)
        y = np.asarray(cache[f"blocks.{layer}.hook_mlp_out"][:, 1:], np.float64).reshape(-1, 40)
        var = np.square(y - y.mean(0)).sum()
        acts, recon = _np_transcoder(_read(out / f"layer_{layer}.safetensors"), x)
        fvu = np.square(y - recon).sum() / var
        got = m["layers"][str(layer)]
        assert got["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert got["l0"] == pytest.approx((acts != 0).sum(-1).mean(), rel=1e-6)
        assert got["dead_fraction"] == pytest.approx(((acts != 0).sum(0) == 0).mean())
        init = init_dictionary(DictionaryConfig(architecture="transcoder", d_in=40, d_sae=48, d_out=40,
                                                activation="relu"), jax.random.key(layer))
        fvu0 = np.square(y - np.asarray(init(jnp.asarray(x, jnp.float32)), np.float64)).sum() / var
        assert fvu0 > 0.95 and fvu < 0.7 * fvu0, (layer, fvu0, fvu)
        assert 4 <= got["l0"] <= 16  # the saved JumpReLU threshold keeps about k = 8 features per token


def test_replaced_loss_equals_a_layer_by_layer_patched_reference(setup, straight, model_and_rows):
    from jaxlens.interventions import Patch

    out, _ = straight
    model, rows = model_and_rows
    m = json.loads((out / "metrics.json").read_text())
    files = [_read(out / f"layer_{i}.safetensors") for i in range(3)]
    keep = np.ones(rows.shape + (1,), bool)
    keep[:, 0] = False  # the BOS position keeps its MLP, as in training
    patches = {}

    def ce(logits):  # the prediction made at the BOS position is not counted (SAELens's mask)
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
        return -np.take_along_axis(np.asarray(logp)[:, 1:], np.asarray(rows)[:, 2:, None], -1).mean()

    with jax.disable_jit():  # six differently patched forwards of a tiny model: cheaper than compiling each
        for layer in range(3):  # each transcoder reads the input of a run where the earlier MLPs are replaced
            _, cache = model.run_with_cache(rows, interventions=patches)
            x = np.asarray(cache[f"blocks.{layer}.ln2.hook_normalized"], np.float64)
            recon = _np_transcoder(files[layer], x)[1].astype(np.float32)
            patches[f"blocks.{layer}.hook_mlp_out"] = Patch(value=jnp.asarray(recon), mask=jnp.asarray(keep))
        zero = {f"blocks.{l}.hook_mlp_out": Patch(value=jnp.zeros(()), mask=jnp.asarray(keep))
                for l in range(3)}
        clean, replaced = ce(model(rows)[:, :-1]), ce(model(rows, interventions=patches)[:, :-1])
        zeroed = ce(model(rows, interventions=zero)[:, :-1])
    assert m["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    assert m["ce_loss_with_dictionary"] == pytest.approx(replaced, rel=1e-5)
    assert m["ce_loss_zero_ablation"] == pytest.approx(zeroed, rel=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx((zeroed - replaced) / (zeroed - clean), rel=1e-4)
    assert abs(replaced - clean) > 1e-3  # the replacement changed the forward (not a no-op)


def test_folder_loads_back_and_reproduces_the_trained_modules(straight, model_and_rows):
    import yaml

    from jaxlens.dictionaries import load_circuit_tracer

    out, run = straight
    model, rows = model_and_rows
    conf = yaml.safe_load((out / "config.yaml").read_text())
    hooks = (conf["feature_input_hook"], conf["feature_output_hook"])
    assert hooks == ("ln2.hook_normalized", "hook_mlp_out")
    loaded = load_circuit_tracer(out)
    _, cache = model.run_with_cache(rows)
    for layer, tc in run.transcoders.items():
        back = loaded[layer]
        assert tc.cfg.activation == "batchtopk" and back.cfg.activation == "jumprelu"
        assert back.cfg.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        thr = float(tc.topk_threshold[...])
        assert thr > 0
        np.testing.assert_array_equal(np.asarray(back.threshold[...]), np.full(48, thr, np.float32))
        x = cache[f"blocks.{layer}.ln2.hook_normalized"]
        np.testing.assert_allclose(np.asarray(back.encode(x)), np.asarray(tc.encode(x)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(back(x)), np.asarray(tc(x)), rtol=1e-6, atol=1e-6)


def test_interrupted_run_resumes_to_the_uninterrupted_result(setup, straight):
    from jaxlens.dictionaries.train_transcoders import train_transcoders

    out = setup / "interrupted"

    def stop(step, metrics):
        if step == 9:
            raise KeyboardInterrupt  # as a killed job: the checkpoint of step 8 is on disk

    with pytest.raises(KeyboardInterrupt):
        train_transcoders(_settings(setup), out, progress=False, on_step=stop)
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 8
    assert not (out / "metrics.json").exists()
    run = train_transcoders(_settings(setup), out, progress=False)
    assert run.metrics["steps_this_run"] == 32 - 8
    for layer in range(3):
        a, b = _read(straight[0] / f"layer_{layer}.safetensors"), _read(out / f"layer_{layer}.safetensors")
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], f"layer {layer} {k}")


def test_skip_relu_transcoders_from_the_command_line_and_a_subset_of_layers(setup, tmp_path, capsys):
    from jaxlens.dictionaries import load_circuit_tracer, save_circuit_tracer

    out = setup / "skip"
    argv = ["train-transcoders", "--model", str(setup / "tiny"), "--architecture", "skip_transcoder",
            "--activation", "relu", "--l1-coefficient", "1e-3", "--d-sae", "48", "--tokens", "128", "--out",
            str(out), "--context-size", str(CTX), "--batch-size", "64", "--eval-sequences", "2",
            "--train-text", str(setup / "train.txt"), "--eval-text", str(setup / "eval.txt"), "--quiet"]
    assert cli.main(argv) == 0
    assert "Trained 3 skip_transcoders (relu, 48 features) on 128 tokens" in capsys.readouterr().out
    loaded = load_circuit_tracer(out)
    assert sorted(loaded) == [0, 1, 2] and all(hasattr(t, "W_skip") for t in loaded.values())
    assert all(t.cfg.activation == "relu" for t in loaded.values())
    save_circuit_tracer({0: loaded[0], 2: loaded[2]}, tmp_path / "subset")  # layers 0 and 2 stay 0 and 2
    again = load_circuit_tracer(tmp_path / "subset")
    assert sorted(again) == [0, 2] and again[2].cfg.hook_name == "blocks.2.ln2.hook_normalized"
    np.testing.assert_array_equal(np.asarray(again[2].W_skip[...]), np.asarray(loaded[2].W_skip[...]))


@pytest.mark.parametrize("flag,value,message", [
    ("--layers", "0-3", "which has 3 (0-2); found layer 3"),
    ("--layers", "2-1", "--layers takes layer numbers and ranges"),
    ("--architecture", "clt", "--architecture must be one of transcoder, skip_transcoder; found 'clt'"),
    ("--activation", "topk", "--activation must be one of relu, jumprelu, batchtopk; found 'topk'"),
])
def test_bad_input_is_a_clear_error(setup, tmp_path, capsys, flag, value, message):
    argv = ["train-transcoders", "--model", str(setup / "tiny"), "--d-sae", "16", "--tokens", "64", "--out",
            str(tmp_path / "o"), "--context-size", str(CTX), "--batch-size", "64",
            "--train-text", str(setup / "train.txt"), "--eval-text", str(setup / "eval.txt"), "--quiet",
            flag, value]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_batchtopk_transcoder_training_step_by_hand():
    from jaxlens.dictionaries.base import DictionaryConfig, init_dictionary

    cfg = DictionaryConfig(architecture="transcoder", activation="batchtopk", d_in=3, d_sae=4, k=1.5,
                           topk_threshold_lr=0.25)
    tc = init_dictionary(cfg, jax.random.key(0))
    tc.W_enc[...] = jnp.eye(3, 4)
    x = jnp.asarray([[0.5, -1.0, 2.0], [3.0, 0.25, -0.5]])
    loss, aux = tc.training_loss(x, jnp.zeros((2, 3)), dead_mask=jnp.zeros(4, bool))
    recon = np.asarray(aux["acts"]) @ np.asarray(tc.W_dec[...])  # b_dec is 0; no dead features: no AuxK
    assert float(loss) == pytest.approx(np.square(recon).sum(-1).mean(), rel=1e-6)
    # h = [[.5, -1, 2, 0], [3, .25, -.5, 0]]; the int(1.5 * 2) = 3 largest ReLU'd values survive: 3, 2, .5
    want = np.array([[0.5, 0, 2, 0], [3, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(aux["acts"]), want)
    assert float(aux["topk_threshold"]) == pytest.approx(0.25 * 0.5)
    tc.topk_threshold[...] = jnp.asarray(0.3)
    np.testing.assert_allclose(np.asarray(tc.encode(x)), [[0.5, 0, 2, 0], [3, 0, 0, 0]])
