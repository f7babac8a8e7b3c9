"""The demo on the real SmolLM2-135M (slow): its induction heads are the heads that, computed independently
from `transformers` loading the same GGUF file (eager attention, output_attentions), attend most from each
token of a repeated random sequence to the token after its previous occurrence; and `jaxlens demo --small`
writes every file with numbers that show the two mechanisms (loss falls on the repeat; the IOI answer is
preferred and patching the clean residual stream at the last layer restores it)."""

import json

import numpy as np
import pytest

from jaxlens import cli
from jaxlens.analysis import find_induction_heads


@pytest.mark.slow
def test_smollm2_induction_heads_agree_with_transformers_attentions(smollm2_gguf):
    import torch
    import transformers

    from jaxlens import HookedTransformer

    seq_len, batch, k = 20, 2, 5
    model = HookedTransformer.from_pretrained("smollm2-135m")
    found = find_induction_heads(model, seq_len=seq_len, batch=batch, top_k=k, seed=1)
    del model
    path = smollm2_gguf
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        att = hf(torch.as_tensor(found.tokens, dtype=torch.long), output_attentions=True).attentions
    att = np.stack([a.numpy() for a in att])  # [layer batch head query key]
    # by hand: each query i of the second repeat (positions seq_len+1 .. 2 seq_len) -> key i - seq_len + 1
    q = np.arange(seq_len + 1, 2 * seq_len + 1)
    want = att[:, :, :, q, q - seq_len + 1].mean(axis=(1, 3))  # [layer head]
    assert want.shape == (30, 9)
    order = np.argsort(-want, axis=None)
    want_top = [tuple(int(i) for i in np.unravel_index(f, want.shape)) for f in order[:k]]
    assert found.top_heads[0] == want_top[0]
    assert set(found.top_heads) == set(want_top), (found.top_heads, want_top)
    np.testing.assert_allclose(found.scores, want, atol=2e-3)
    assert want[want_top[0]] > 0.5  # a real induction head, not noise
    assert found.loss_second_repeat < found.loss_first_repeat - 3


@pytest.mark.slow
def test_smollm2_demo_small_writes_every_file(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["demo", "--small", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Top induction heads" in printed and str(out.resolve()) in printed
    names = {"index.html", "results.json", "induction_scores.png", "induction_patterns.png",
             "induction_heads.html", "ioi_resid_pre.png", "ioi_head_out.png"}
    assert names <= {p.name for p in out.iterdir()}
    for name in names:
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    res = json.loads((out / "results.json").read_text())
    ind, ioi = res["induction"], res["ioi"]
    assert np.array(ind["scores"]).shape == (30, 9)
    assert ind["loss_second_repeat"] < ind["loss_first_repeat"] - 3
    assert ind["top_heads"][0]["value"] > 0.5
    assert np.mean(ioi["clean_logit_diff"]) > 0 > np.mean(ioi["corrupted_logit_diff"])
    resid = np.array(ioi["resid_pre"]["values"])
    assert resid.shape == (30, len(ioi["resid_pre"]["position_labels"]))
    labels = ioi["resid_pre"]["position_labels"]
    # layer 0: resid_pre is the token embedding, so only the name positions differ; the rest are exact no-ops
    name_pos = [i for i, t in enumerate(labels) if t in ("[IO]", "[S1]", "[S2]")]
    shared = [i for i, t in enumerate(labels) if not t.startswith("[")]
    assert len(name_pos) == 3 and np.abs(resid[0, shared]).max() < 1e-6
    assert np.abs(resid[0]).argmax() in name_pos and resid[0, name_pos].max() > 0.3
    # last layer: the answer is read from the last position (its attention still reads the corrupted others)
    assert resid[-1, -1] > 0.8 and resid[-1, -1] > 5 * np.abs(resid[-1, :-1]).max()
    assert np.array(ioi["head_out"]["values"]).shape == (30, 9)
