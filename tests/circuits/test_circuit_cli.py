"""`jaxlens circuit` on a tiny random GPT-2 with a tiny tokenizer: circuit.json's numbers recomputed."""

import json

import numpy as np
import pytest

from jaxlens import HookedTransformer, cli, testing
from jaxlens.analysis.ioi import ioi_prompts
from jaxlens.analysis.metrics import logit_diff_metric
from jaxlens.circuits import Graph, faithfulness
from jaxlens.circuits.task import budgets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tok = testing.train_tiny_tokenizer(path)
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=3, n_embd=24, n_layer=2, n_head=3,
                                 n_positions=64, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, initializer_range=0.2)
    testing.save_hf_model(hf, path)
    return path


def test_circuit_command_writes_a_consistent_circuit(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["circuit", "--model", str(tiny), "--task", "ioi", "--out", str(out), "--n-prompts", "4",
                     "--level", "0.5", "--method", "eap"]) == 0
    assert "wrote" in capsys.readouterr().out
    res = json.loads((out / "circuit.json").read_text())
    model = HookedTransformer.from_pretrained(tiny)
    g = Graph.from_model(model)
    assert res["edges_total"] == g.n_edges
    assert [n for n in res["requested_n_edges"]] == budgets(g.n_edges)
    assert res["curve"][-1] == [g.n_edges, pytest.approx(1.0, abs=1e-4)]
    c80 = res["circuit_80"]
    assert c80 is not None and c80["faithfulness"] >= 0.5
    # the reported circuit, evaluated again from its edge names, has the reported faithfulness
    p = ioi_prompts(model, 4)
    again = faithfulness(model, g.with_edges(c80["edges"]), p.clean_tokens, p.corrupted_tokens,
                         logit_diff_metric(p.answer_ids, p.wrong_ids), prune=False, complement=False)
    np.testing.assert_allclose(again.faithfulness[0], c80["faithfulness"], atol=1e-4)
    assert len(c80["edges"]) == c80["n_edges"]


def test_circuit_command_refuses_bad_arguments(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["circuit", "--model", str(tiny), "--out", str(tmp_path), "--steps", "0"])
    assert e.value.code == 2 and "--steps must be positive" in capsys.readouterr().err
