"""jaxlens's edge scores against the TransformerLens hook-per-node implementation of bench_circuits.py's
baseline (`benchmarks/_circuits_tl_baseline.py`, hannamw/EAP-IG's method) on the same random Hugging Face
models: EAP and EAP-IG over every edge, exact patching of single edges, and the metric of a whole circuit.

Both sides read only the edge list of `circuits.Graph` (names and indices); the TL side computes everything
with torch hooks on TransformerLens 4.3's bridge, so agreement checks that the two agree on what an edge is
(sources `hook_result` per head, `hook_mlp_out`, the input `blocks.0.hook_resid_pre`; readers the split
q/k/v inputs per (key/value) head, `hook_mlp_in`, the last `hook_resid_post`) and on each method's formula.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")
pytestmark = pytest.mark.slow  # importing TransformerLens (pandas, datasets, pyarrow) and booting bridges

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _circuits_tl_baseline as tlb  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlens import HookedTransformer, testing  # noqa: E402
from jaxlens.analysis.metrics import logit_diff_metric  # noqa: E402
from jaxlens.circuits import Graph, attribute_edges, masked_metric, source_outputs  # noqa: E402
from jaxlens.circuits.edges import embed  # noqa: E402

MODELS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=24, n_layer=2, n_head=3, n_inner=40, n_positions=32, bos_token_id=0,
                  eos_token_id=0)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                       intermediate_size=56, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)),
}
ANSWER, WRONG = np.array([3, 5]), np.array([5, 3])
#: Every kind of source (input, head, MLP) into every kind of reader (q, k, v, MLP, logits), within a layer
#: and across layers.
EXACT_EDGES = ["input->a0.h0<q>", "input->m1", "a0.h1->a1.h2<q>", "a0.h1->a1.kv1<k>", "a0.h2->a1.kv0<v>",
               "a0.h1->m0", "m0->a1.h0<q>", "m0->m1", "a1.h2->logits", "m1->logits"]
RTOL = 2e-5  # of the largest |score|: fp32, two libraries' orders of summation


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """name -> (jaxlens model, TL bridge, Graph, TL EdgeSet, clean, corrupted), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            conf_cls, model_cls, conf = MODELS[name]
            path = tmp_path_factory.mktemp(f"tl_edges_{name}")
            hf = testing.random_hf_model(conf_cls, model_cls, seed=3, initializer_range=0.15, vocab_size=300,
                                         **conf)
            testing.save_hf_model(hf, path, testing.train_tiny_tokenizer(path))
            jl = HookedTransformer.from_pretrained_no_processing(path)
            g = Graph.from_model(jl)
            es = tlb.EdgeSet.from_names(g.src_names(), g.dst_names(), g.edge_src, g.edge_dst)
            rng = np.random.default_rng(0)
            clean = rng.integers(1, 300, (2, 6))
            corrupted = clean.copy()
            corrupted[:, 1:4] = rng.integers(1, 300, (2, 3))
            built[name] = jl, tlb.boot(path), g, es, clean, corrupted
        return built[name]

    return get


def _jl_metric():
    return logit_diff_metric(jnp.asarray(ANSWER), jnp.asarray(WRONG))


def _close(got, want):
    scale = float(np.abs(want).max())
    assert scale > 1e-3  # the scores are not all (near) zero: the comparison can fail
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("name,method,steps", [("gpt2", "eap", None), ("llama-gqa", "eap-ig", 5)])
def test_gradient_scores_match_tl(setup, name, method, steps):
    jl, br, g, es, clean, corrupted = setup(name)
    want = tlb.eap_ig_scores(br, es, clean, corrupted, tlb.logit_diff(ANSWER, WRONG), steps)
    got = attribute_edges(jl, clean, corrupted, _jl_metric(), method=method, steps=steps or 5).scores
    _close(got, want)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_exact_matches_tl(setup, name):
    jl, br, g, es, clean, corrupted = setup(name)
    which = g.edge_index(EXACT_EDGES)
    want = tlb.exact_scores(br, es, clean, corrupted, tlb.logit_diff(ANSWER, WRONG), which)
    got = attribute_edges(jl, clean, corrupted, _jl_metric(), method="exact", edges=EXACT_EDGES).scores
    assert np.isnan(want).sum() == np.isnan(got).sum() == g.n_edges - len(which)
    _close(got[which], want[which])


def test_circuit_metric_matches_tl(setup):
    """A random half of the edges of the grouped-query model patched at once: the reader inputs then depend on
    patched upstream outputs."""
    jl, br, g, es, clean, corrupted = setup("llama-gqa")
    patched = np.random.default_rng(1).random(g.n_edges) < 0.5
    _, corr = tlb.source_outputs(br, es, torch.as_tensor(corrupted))
    want = tlb.masked_metric(br, es, torch.as_tensor(clean), corr, tlb.logit_diff(ANSWER, WRONG), patched)
    with torch.inference_mode():
        base = float(tlb.logit_diff(ANSWER, WRONG)(br(torch.as_tensor(clean))))
    got = masked_metric(jl.params, jl.cfg, g.layout, embed(jl.params, jl.cfg, jnp.asarray(clean)),
                        source_outputs(jl.params, jl.cfg, jnp.asarray(corrupted)), jnp.asarray(g.edge_src),
                        jnp.asarray(g.edge_dst), jnp.asarray(~patched, jnp.float32), _jl_metric())
    assert abs(want - base) > 1e-3  # the patch moves the metric (1000x the tolerance)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_edge_set_rejects_a_graph_that_is_not_residual():
    """A destination reading a later source but not an earlier one is no residual-stream graph."""
    with pytest.raises(ValueError, match="prefix of the source order"):
        tlb.EdgeSet.from_names(["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out"],
                               ["blocks.0.hook_resid_post"], [1], [0])
