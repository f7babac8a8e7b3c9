"""`jaxlens graph` end to end on a tiny random Llama saved as a Hugging Face folder, with random transcoders
written in circuit-tracer's format: the files exist and load, the .npz graph equals attribute()'s on the same
inputs, the HTML page holds the JSON's nodes; each bad input a usage error with a message."""

import json
import re

import numpy as np
import pytest

from jaxlens import cli, testing
from jaxlens.dictionaries import load_circuit_tracer, save_circuit_tracer
from jaxlens.graphs import AttributionGraph, attribute
from jaxlens.hooked_transformer import HookedTransformer
from tests.graphs.graph_models import random_transcoders

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, transcoder folder): a random Llama with a tiny tokenizer, and per-layer transcoders
    reading ln2.hook_normalized (as `jaxlens train-transcoders` writes them)."""
    root = tmp_path_factory.mktemp("graph_cli")
    tok = testing.train_tiny_tokenizer(root / "model")
    hf = testing.random_hf_model(
        "LlamaConfig", "LlamaForCausalLM", seed=2, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.3)
    testing.save_hf_model(hf, root / "model")
    model = HookedTransformer.from_pretrained(root / "model")
    save_circuit_tracer(random_transcoders(model.cfg, "plt", "ln2.hook_normalized", seed=4),
                        root / "tc-random")
    return root / "model", root / "tc-random"


def test_graph_command_writes_the_graph(tiny, tmp_path, capsys):
    model_dir, tc_dir = tiny
    out = tmp_path / "graphs"
    argv = ["graph", PROMPT, "--model", str(model_dir), "--transcoders", str(tc_dir), "--out", str(out),
            "--slug", "france", "--max-feature-nodes", "30", "--batch-size", "8", "--max-n-logits", "4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    saved = AttributionGraph.load(out / "france.graph.npz")
    model = HookedTransformer.from_pretrained(model_dir)
    want = attribute(model, load_circuit_tracer(tc_dir), PROMPT, max_n_logits=4, max_feature_nodes=30,
                     batch_size=8)
    for name in ("tokens", "active_features", "selected_features", "logit_tokens"):
        np.testing.assert_array_equal(getattr(saved, name), getattr(want, name), err_msg=name)
    for name in ("adjacency", "activation_values", "logit_probabilities"):
        np.testing.assert_allclose(getattr(saved, name), getattr(want, name), rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    assert saved.n_features == 30 and saved.transcoder_name == "tc-random"
    data = json.loads((out / "france.json").read_text())
    assert data["metadata"]["slug"] == "france" and data["metadata"]["scan"] == "tc-random"
    meta = json.loads((out / "graph-metadata.json").read_text())
    assert [g["slug"] for g in meta["graphs"]] == ["france"]
    page = (out / "france.html").read_text()
    embedded = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page,
                                    re.S).group(1))
    assert len(embedded["nodes"]) == len(data["nodes"]) > want.n_pos
    replacement, completeness = want.scores()
    assert f"Replacement score {replacement:.3f}, completeness score {completeness:.3f}" in printed
    assert repr(want.logit_strings[0]) in printed and "30 feature nodes" in printed

    # a second graph in the same folder joins the metadata list; the slug defaults to the prompt's words
    assert cli.main(argv[:8] + ["--max-feature-nodes", "5", "--max-n-logits", "2"]) == 0
    meta = json.loads((out / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in meta["graphs"]) == ["france", "the-capital-of-france-is"]


@pytest.mark.parametrize("extra, message", [
    (["--transcoders", "{tmp}/missing"], r"--transcoders .*missing: no such folder.*train-transcoders"),
    (["--slug", "a/b"], r"slug"),
    (["--node-threshold", "1.5"], r"--node-threshold must be a fraction .* in \(0, 1\]"),
    (["--max-feature-nodes", "-1"], r"--max-feature-nodes must be 0 \(every active feature\) or more"),
    (["--max-n-logits", "0"], r"max_n_logits=0 must be an int in \[1, d_vocab=\d+\]"),
    (["--out", "{tmp}/file.txt"], r"--out .*file.txt exists and is not a folder"),
])
def test_bad_input_is_a_usage_error(tiny, tmp_path, capsys, extra, message):
    model_dir, tc_dir = tiny
    (tmp_path / "file.txt").write_text("x")
    base = {"--model": str(model_dir), "--transcoders": str(tc_dir), "--out": str(tmp_path / "o")}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value.format(tmp=tmp_path)
    argv = ["graph", PROMPT, "--max-feature-nodes", "5"] + [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err.replace("\n", " "))


def test_transcoders_of_another_model_are_a_usage_error(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    model = HookedTransformer.from_pretrained(model_dir)
    other = testing.tiny_config(d_model=8, n_layers=2, n_heads=2, d_head=4, d_mlp=12,
                                d_vocab=model.cfg.d_vocab, n_ctx=32, normalization_type="RMS")
    save_circuit_tracer(random_transcoders(other, "plt", "ln2.hook_normalized"), tmp_path / "tc-other")
    with pytest.raises(SystemExit) as e:
        cli.main(["graph", PROMPT, "--model", str(model_dir), "--transcoders", str(tmp_path / "tc-other"),
                  "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "d_in=8 and writes d_out=8, but the model's d_model is 16" in capsys.readouterr().err
