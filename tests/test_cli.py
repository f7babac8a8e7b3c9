"""The `jaxlens` command: argument errors, `sweep` and `convert` end to end on a tiny random GPT-2 (checked
against the Hugging Face model patched by hand), and the demo pipeline on the tiny model (outputs exist,
numbers agree with each other and with induction scores recomputed from Hugging Face attentions)."""

import json

import numpy as np
import pytest

from jaxlens import cli, converters, demo, testing

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When John and Mary went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GPT-2 (3 layers, 5 heads) with a tiny BPE tokenizer, saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tok = testing.train_tiny_tokenizer(path)
    # initializer_range=0.2: effects well above noise
    model = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=3, n_embd=40, n_layer=3, n_head=5,
                                    n_positions=64, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, initializer_range=0.2)
    testing.save_hf_model(model, path)
    return path, model, tok


def _ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


# -- argument errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["sweep", "--model", "m"], "the following arguments are required"),
    (["sweep", "--model", "m", "--clean", "a", "--corrupt", "b", "--answer", "x", "--wrong", "y",
      "--kind", "nope", "--out", "o"], "invalid choice: 'nope'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["convert"], "the following arguments are required: source"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_sweep_input_errors_are_usage_errors(tiny, tmp_path, capsys):
    path, _, _ = tiny
    base = ["sweep", "--model", str(path), "--kind", "resid_pre", "--out", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--clean", CLEAN, "--corrupt", "When John", "--answer", " Mary", "--wrong", " John"])
    assert e.value.code == 2 and "same number of tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Maryland", "--wrong", " John"])
    assert e.value.code == 2 and "not one" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_model_exits_1(tmp_path, capsys):
    argv = ["sweep", "--model", str(tmp_path / "nowhere"), "--clean", "a", "--corrupt", "b", "--answer", "a",
            "--wrong", "b", "--kind", "resid_pre", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    assert "nowhere" in capsys.readouterr().err


# -- sweep ---------------------------------------------------------------------------------------------------
def test_sweep_matches_hand_patched_hf_model(tiny, tmp_path):
    import torch

    path, hf, tok = tiny
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(path), "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary",
            "--wrong", " John", "--kind", "resid_pre", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").stat().st_size > 0
    clean, corrupt = torch.tensor([_ids(tok, CLEAN)]), torch.tensor([_ids(tok, CORRUPT)])
    mary, john = tok(" Mary")["input_ids"][0], tok(" John")["input_ids"][0]
    values = np.array(res["values"])
    assert values.shape == (3, clean.shape[1]) and res["axes"] == ["layer", "pos"]

    with torch.no_grad():
        clean_hidden = hf(clean, output_hidden_states=True).hidden_states  # resid_pre of layer l = hidden[l]

        def logit_diff(tokens, layer=None, pos=None):
            def hook(module, args):
                x = args[0].clone()
                x[:, pos] = clean_hidden[layer][:, pos]
                return (x,) + args[1:]
            handle = hf.transformer.h[layer].register_forward_pre_hook(hook) if layer is not None else None
            try:
                logits = hf(tokens).logits[0, -1]
            finally:
                if handle is not None:
                    handle.remove()
            return float(logits[mary] - logits[john])

        assert res["clean_logit_diff"] == pytest.approx(logit_diff(clean), abs=1e-4)
        assert res["corrupted_logit_diff"] == pytest.approx(logit_diff(corrupt), abs=1e-4)
        for layer, pos in [(0, 3), (1, 7), (2, clean.shape[1] - 1), (2, 0)]:
            assert values[layer, pos] == pytest.approx(logit_diff(corrupt, layer, pos), abs=1e-4)
    # normalised = (value - corrupted) / (clean - corrupted)
    denom = res["clean_logit_diff"] - res["corrupted_logit_diff"]
    np.testing.assert_allclose(np.array(res["normalised"]), (values - res["corrupted_logit_diff"]) / denom,
                               rtol=1e-5, atol=1e-6)


# -- convert -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["folder", "model.safetensors"])
def test_convert_round_trips_the_checkpoint(tiny, tmp_path, target):
    path, _, _ = tiny
    out = tmp_path / target
    assert cli.main(["convert", str(path), "--out", str(out)]) == 0
    cfg, params = converters.load_converted(out)
    want_cfg, want = converters.load(path)
    assert cfg == want_cfg
    flat, want_flat = converters.flatten_params(params), converters.flatten_params(want)
    assert flat.keys() == want_flat.keys()
    for k in want_flat:
        np.testing.assert_array_equal(flat[k], want_flat[k], err_msg=k)
    assert converters.is_converted(out)
    if target == "folder":
        assert (out / "tokenizer.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no temporaries left
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_converted_folder_loads_as_the_same_model(tiny, tmp_path):
    from jaxlens.hooked_transformer import HookedTransformer

    path, _, _ = tiny
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "c")]) == 0
    a, b = HookedTransformer.from_pretrained(str(tmp_path / "c")), HookedTransformer.from_pretrained(path)
    np.testing.assert_allclose(np.asarray(a(CLEAN)), np.asarray(b(CLEAN)), atol=1e-6)


def test_load_converted_rejects_other_files(tiny, tmp_path):
    from jaxlens.errors import CheckpointError

    with pytest.raises(CheckpointError, match="jaxlens convert"):
        converters.load_converted(tiny[0])


# -- demo on a tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_out(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "jaxlens_out"
    assert cli.main(["demo", "--small", "--quiet", "--model", str(tiny[0]), "--out", str(out)]) == 0
    return out


def test_demo_writes_every_output(demo_out):
    names = {"index.html", "results.json", "induction_scores.png", "induction_patterns.png",
             "induction_heads.html", "ioi_resid_pre.png", "ioi_head_out.png"}
    assert names <= {p.name for p in demo_out.iterdir()}
    index = (demo_out / "index.html").read_text()
    for name in names - {"index.html"}:
        assert name in index
    assert not [p for p in demo_out.parent.iterdir() if p.name.startswith(".")]  # temporaries cleaned up


def test_demo_numbers_are_consistent(demo_out, tiny):
    res = json.loads((demo_out / "results.json").read_text())
    scores = np.array(res["induction"]["scores"])
    assert scores.shape == (3, 5)
    top = [(h["layer"], h["head"]) for h in res["induction"]["top_heads"]]
    order = np.argsort(-scores, axis=None, kind="stable")[:len(top)]
    assert top == [tuple(int(i) for i in np.unravel_index(f, scores.shape)) for f in order]
    ioi = res["ioi"]
    head_out = np.array(ioi["head_out"]["values"])
    best = np.unravel_index(np.argmax(np.abs(head_out)), head_out.shape)
    assert (ioi["top_heads"][0]["layer"], ioi["top_heads"][0]["head"]) == best
    assert len(ioi["resid_pre"]["position_labels"]) == np.array(ioi["resid_pre"]["values"]).shape[1]
    assert len(ioi["clean_logit_diff"]) == len(ioi["clean_prompts"]) == demo.DemoSettings.small().n_prompts


def test_demo_induction_scores_match_hf_attentions(demo_out, tiny):
    import torch

    _, hf, _ = tiny
    res = json.loads((demo_out / "results.json").read_text())
    tokens = np.array(res["induction"]["tokens"])
    n = res["settings"]["induction_len"]
    assert (tokens[:, 1:n + 1] == tokens[:, n + 1:]).all()
    with torch.no_grad():
        att = np.stack([a.numpy() for a in hf(torch.tensor(tokens), output_attentions=True).attentions])
    # by hand: query i in the second repeat attends key i - n + 1
    q = np.arange(n + 1, 2 * n + 1)
    want = att[:, :, :, q, q - n + 1].mean(axis=(1, 3))
    np.testing.assert_allclose(np.array(res["induction"]["scores"]), want, atol=1e-5)
