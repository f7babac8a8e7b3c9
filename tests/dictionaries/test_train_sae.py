"""`jaxlens train-sae` end to end on a tiny random GPT-2: a SAELens folder that loads back, metrics.json
whose numbers are the loaded SAE's held-out evaluation, a run continued to a larger budget equal to one
straight run, and bad arguments as clear errors."""

import json

import numpy as np
import pytest

from jaxlens import cli, testing

WORDS = ("the quick brown fox jumps over lazy dog when mary and john went to store gave drink capital of "
         "france is paris induction heads copy repeated tokens").split()


def _text(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    paras = [" ".join(rng.choice(WORDS, 12)).capitalize() + "." for _ in range(n)]
    return "\n\n".join(paras)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_sae")
    model = root / "tiny"
    model.mkdir()
    tok = testing.train_tiny_tokenizer(model)
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=3, n_embd=40, n_layer=3, n_head=5,
                                 n_positions=64, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, initializer_range=0.2)
    testing.save_hf_model(hf, model)
    (root / "train.txt").write_text(_text(0, 400))
    (root / "eval.txt").write_text(_text(1, 60))
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLENS_CACHE", str(root / "cache"))
    yield root
    mp.undo()


def _argv(root, out, tokens):
    return ["train-sae", "--model", str(root / "tiny"), "--hook", "blocks.1.hook_resid_post",
            "--architecture", "topk", "--k", "4", "--d-sae", "32", "--tokens", str(tokens), "--out", str(out),
            "--context-size", "16", "--batch-size", "64", "--checkpoint-every", "2", "--eval-sequences", "8",
            "--lr", "3e-3",
            "--train-text", str(root / "train.txt"), "--eval-text", str(root / "eval.txt"), "--quiet"]


@pytest.fixture(scope="module")
def straight(setup):
    out = setup / "straight"
    assert cli.main(_argv(setup, out, 256)) == 0
    return out


def test_writes_a_saelens_folder_and_its_held_out_metrics(setup, straight):
    from jaxlens.dictionaries.corpus import load_corpus
    from jaxlens.dictionaries.evals import evaluate
    from jaxlens.dictionaries.formats_saelens import load_saelens
    from jaxlens.hooked_transformer import HookedTransformer

    assert {"cfg.json", "sae_weights.safetensors", "metrics.json", "checkpoint"} <= {
        p.name for p in straight.iterdir()}
    m = json.loads((straight / "metrics.json").read_text())
    for key in ("explained_variance", "l0", "ce_loss_recovered", "dead_fraction", "tokens", "seconds"):
        assert isinstance(m[key], (int, float)), key
    assert m["tokens"] == 256 and m["steps"] == 4 and m["l0"] == pytest.approx(4)
    sae = load_saelens(straight)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.d_sae == 32
    model = HookedTransformer.from_pretrained(setup / "tiny")
    held = load_corpus(setup / "eval.txt", model.tokenizer)
    again = evaluate(sae, model.params, model.cfg, held, context_size=16, n_sequences=8)
    for key in ("explained_variance", "mse", "l0", "ce_loss_recovered", "dead_fraction"):
        assert m[key] == pytest.approx(again[key], rel=1e-5, abs=1e-7), key
    assert m["eval_tokens"] == 8 * 15


def test_continued_run_equals_one_straight_run(setup, straight):
    from jaxlens.dictionaries.formats_saelens import load_saelens

    out = setup / "continued"
    assert cli.main(_argv(setup, out, 128)) == 0
    assert json.loads((out / "metrics.json").read_text())["steps_this_run"] == 2
    assert cli.main(_argv(setup, out, 256)) == 0
    assert json.loads((out / "metrics.json").read_text())["steps_this_run"] == 2  # resumed at step 2
    a, b = load_saelens(straight), load_saelens(out)
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_array_equal(np.asarray(getattr(a, k)[...]), np.asarray(getattr(b, k)[...]), k)


def test_bad_arguments_are_clear_errors(setup, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = _argv(setup, tmp_path / "o", 64)
    with pytest.raises(SystemExit) as e:
        cli.main(argv[:-5] + ["--train-text", str(tmp_path / "empty.txt"), "--quiet"])
    assert e.value.code == 2 and "is empty: it has no text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--hook-out", "blocks.1.hook_mlp_out"])
    assert e.value.code == 2 and "give --hook-out with a transcoder" in capsys.readouterr().err
    bad_hook = [a if a != "blocks.1.hook_resid_post" else "blocks.1.hook_resid_psot" for a in argv]
    assert cli.main(bad_hook) == 1
    assert "Did you mean 'blocks.1.hook_resid_post'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
