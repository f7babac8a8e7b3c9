"""circuit-tracer 0.5.0's own attribution graphs of a tiny random Llama, for `test_vs_circuit_tracer.py`.

The reference runs in circuit-tracer's cached venv (`tests/ref_envs.py`; transformers 4.57.3,
transformer-lens 3.2.1, torch CPU). `reference_dir()` builds, in a cache folder keyed by the script text, the
case table and the tokenizer:

- `model/`: a byte-level BPE tokenizer (`jaxlens.testing.train_tiny_tokenizer`, BOS id 0; see `_tokenizer`)
  and a random
  `LlamaForCausalLM` saved with `save_pretrained` (3 layers, d_model 24, 4 query heads over 2 key/value
  heads, init std 0.2, every RMSNorm gain perturbed to 1 + 0.5 N(0, 1));
- `tc/<set>/`: random transcoders written by circuit-tracer's own `to_safetensors` with a `config.yaml`
  naming their hooks: `relu_skip` (per-layer ReLU + W_skip, `hook_resid_mid` -> `mlp.hook_out`),
  `jumprelu_skip_mlp_in` (per-layer JumpReLU + W_skip, `mlp.hook_in` -> `mlp.hook_out`) and `clt` (a
  JumpReLU cross-layer transcoder, `hook_resid_mid` -> `hook_mlp_out`; circuit-tracer's file loader reads no
  CLT skip);
- `out/<case>/`: circuit-tracer's graph of PROMPT for every case of CASES, loaded from those files: the
  `Graph` fields (.npy), `prune_graph`'s masks and cumulative scores, the node influences, edge scores and
  both thresholds that pruning compared them with (to tell a real mismatch from a value within rounding of
  a threshold), `compute_graph_scores`, the TransformerLens logits, and `create_graph_files`' JSON (`json/`).

What was found about running circuit-tracer offline on a local model:
- `ReplacementModel.from_pretrained*` with the TransformerLens backend needs a TransformerLens model name:
  `HookedTransformer.from_pretrained` calls `get_official_model_name`, which refuses a directory. The lower
  loaders take one, so the script repeats `TransformerLensReplacementModel.from_pretrained_and_transcoders`
  step by step: `loading.get_pretrained_model_config(dir)`, `get_pretrained_state_dict(dir, cfg)`, the model
  class on that config, `load_and_process_state_dict(fold_ln=False, center_writing_weights=False,
  center_unembed=False)` (fold_value_biases stays on, a no-op without value biases), then
  `_configure_replacement_model(transcoders)`. TransformerLens's Llama config ignores `rope_theta` (it
  keeps 10000), so the model uses 10000.
- `ensure_tokenized` picks the special token to prepend with `next(filter(None, [bos, pad, eos, ...]))`,
  which skips id 0: with this tokenizer (BOS = EOS = 0, the only special token) it raises StopIteration. The
  script therefore tokenizes as circuit-tracer does (`add_special_tokens=False`), prepends BOS itself and
  passes the ids; `ensure_tokenized` then keeps them (they start with a special token).
- circuit-tracer names the error node of (layer, pos) `0_{layer}_{pos}`, the name of layer-0 feature
  `layer` at that position; the two would collide in its JSON. Layer 0's features 0..n_layers-1 are made
  dead (encoder bias -1000) so that both files name every node unambiguously.
The script checks that the cases are well-conditioned (every pre-activation at least MARGIN away from its
threshold, the top logits' probabilities MARGIN apart relatively, and the node-budget cut MARGIN apart in
influence), so that rounding differences between two correct implementations cannot change a node set.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dictionaries"))
import ref_envs  # noqa: E402
import saelens_ref  # noqa: E402

PROMPT = "When Mary and John went to the store, John gave"
SCAN = "jaxlens-test-transcoders"
MODEL = dict(n_layers=3, d_model=24, n_heads=4, n_kv_heads=2, d_mlp=40, n_ctx=64, init_std=0.2, seed=0)
D_TRANSCODER = 16
MARGIN = 1e-4

#: case -> transcoder set, hooks, attribute() options. `set` names the folder under tc/.
CASES = {
    "relu_skip": dict(set="relu_skip"),
    "jumprelu_skip_mlp_in": dict(set="jumprelu_skip_mlp_in"),
    "clt": dict(set="clt"),
    # fewer feature nodes than active features: one ranking by logit influence (batch 512, interval 4)
    "relu_skip_budget": dict(set="relu_skip", max_feature_nodes=20),
    # re-ranked every 4 batches of 4 rows (after 16 and 32 rows) while visiting: the influence-ordered visit
    "relu_skip_budget_batched": dict(set="relu_skip", max_feature_nodes=40, batch_size=4),
}
SETS = {
    "relu_skip": dict(kind="plt", activation="relu", skip=True, hook_in="hook_resid_mid",
                      hook_out="mlp.hook_out"),
    "jumprelu_skip_mlp_in": dict(kind="plt", activation="jumprelu", skip=True, hook_in="mlp.hook_in",
                                 hook_out="mlp.hook_out"),
    "clt": dict(kind="clt", activation="jumprelu", skip=False, hook_in="hook_resid_mid",
                hook_out="hook_mlp_out"),
}

#: Run in the circuit-tracer venv: `script WORKDIR` with WORKDIR/meta.json and the tokenizer in WORKDIR/model.
SCRIPT = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformer_lens import loading_from_pretrained as loading
from circuit_tracer import attribute
from circuit_tracer.graph import (compute_edge_influence, compute_graph_scores, compute_node_influence,
                                  find_threshold, prune_graph)
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, load_transcoder_set
from circuit_tracer.utils.create_graph_files import create_graph_files

torch.set_num_threads(1)
work = Path(sys.argv[1])
meta = json.loads((work / "meta.json").read_text())
m, F, margin = meta["model"], meta["d_transcoder"], meta["margin"]
L, D = m["n_layers"], m["d_model"]
cpu, f32 = torch.device("cpu"), torch.float32
model_dir = work / "model"
tok = AutoTokenizer.from_pretrained(model_dir)
torch.manual_seed(m["seed"])

# -- the model ------------------------------------------------------------------------------------------
hf = LlamaForCausalLM(LlamaConfig(
    vocab_size=len(tok), hidden_size=D, intermediate_size=m["d_mlp"], num_hidden_layers=L,
    num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"], max_position_embeddings=m["n_ctx"],
    rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=m["init_std"], tie_word_embeddings=False,
    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
with torch.no_grad():
    for name, p in hf.named_parameters():
        if p.ndim == 1:  # the RMSNorm gains
            p.add_(0.5 * torch.randn_like(p))
hf.save_pretrained(model_dir, safe_serialization=True)
del hf

# -- the transcoders, in circuit-tracer's files ------------------------------------------------------------
def fill(p, scale, shift=0.0):
    with torch.no_grad():
        p.copy_(torch.randn_like(p) * scale + shift)

for name, s in meta["sets"].items():
    out = work / "tc" / name
    jump = s["activation"] == "jumprelu"
    if s["kind"] == "plt":
        for l in range(L):
            act = JumpReLU(torch.zeros(F), 0.1) if jump else torch.nn.functional.relu
            t = SingleLayerTranscoder(D, F, act, l, skip_connection=s["skip"], device=cpu, dtype=f32)
            fill(t.W_enc, 0.5 if s["hook_in"] == "hook_resid_mid" else 0.15)
            fill(t.b_enc, 0.2, -0.4)
            fill(t.W_dec, 0.3)
            fill(t.b_dec, 0.1)
            if s["skip"]:
                fill(t.W_skip, 0.2)
            if jump:
                with torch.no_grad():
                    t.activation_function.threshold.copy_(0.1 * torch.randn(F).abs())
            if l == 0:  # no feature named like an error node (module docstring)
                with torch.no_grad():
                    t.b_enc[:L] = -1000.0
            out.mkdir(parents=True, exist_ok=True)
            t.to_safetensors(str(out / f"layer_{l}.safetensors"))
        kind = "transcoder_set"
    else:
        c = CrossLayerTranscoder(L, F, D, "jump_relu", lazy_decoder=False, lazy_encoder=False, device=cpu,
                                 dtype=f32)
        fill(c.W_enc, 0.5)
        fill(c.b_enc, 0.2, -0.4)
        fill(c.b_dec, 0.1)
        for w in c.W_dec:
            fill(w, 0.3)
        with torch.no_grad():
            c.activation_function.threshold.copy_(0.1 * torch.randn(L, 1, F).abs())
            c.b_enc[0, :L] = -1000.0
        c.to_safetensors(str(out))
        kind = "cross_layer_transcoder"
    (out / "config.yaml").write_text(f"model_kind: {kind}\nfeature_input_hook: {s['hook_in']}\n"
                                     f"feature_output_hook: {s['hook_out']}\nscan: {meta['scan']}\n")

def load_set(name):
    s, d = meta["sets"][name], work / "tc" / name
    hooks = dict(feature_input_hook=s["hook_in"], feature_output_hook=s["hook_out"], scan=meta["scan"])
    if s["kind"] == "clt":
        return load_clt(str(d), device=cpu, dtype=f32, lazy_decoder=False, lazy_encoder=False, **hooks)
    files = {l: str(d / f"layer_{l}.safetensors") for l in range(L)}
    return load_transcoder_set(files, device=cpu, dtype=f32, lazy_encoder=False, lazy_decoder=False, **hooks)

def thresholds(tcs, s):
    if s["activation"] == "relu":
        return torch.zeros(L, 1, F)
    if s["kind"] == "clt":
        return tcs.activation_function.threshold.detach()
    return torch.stack([t.activation_function.threshold.detach() for t in tcs])[:, None, :]

# -- circuit-tracer's model: from_pretrained_and_transcoders, step by step (module docstring) ---------------
cfg = loading.get_pretrained_model_config(str(model_dir), device="cpu", dtype=f32, fold_ln=False)
state = loading.get_pretrained_state_dict(str(model_dir), cfg, None, dtype=f32)

def replacement_model(tcs):
    model = TransformerLensReplacementModel(cfg, tok, move_to_device=False)
    model.load_and_process_state_dict({k: v.clone() for k, v in state.items()}, fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=True, refactor_factored_attn_matrices=False)
    model._configure_replacement_model(tcs)
    return model

ids = [tok.bos_token_id] + tok(meta["prompt"], add_special_tokens=False).input_ids
report = {"n_tokens": len(ids)}
full = {}
for case, c in meta["cases"].items():
    s = meta["sets"][c["set"]]
    tcs = load_set(c["set"])
    model = replacement_model(tcs)
    tokens = model.ensure_tokenized(ids)
    assert tokens.tolist() == ids, (tokens.tolist(), ids)
    logits, pre = model.get_activations(tokens, apply_activation_function=False)
    gap = (pre[:, 1:] - thresholds(tcs, s)).abs().min().item()
    assert gap > margin, f"{case}: a pre-activation is {gap} from its threshold; choose another seed"
    top = torch.softmax(logits[0, -1], -1).topk(meta["max_n_logits"] + 1).values
    assert ((top[:-1] - top[1:]) / top[:-1]).min() > margin, f"{case}: tied top logits; choose another seed"
    opts = {k: c[k] for k in ("max_feature_nodes", "batch_size") if k in c}
    t0 = time.perf_counter()
    g = attribute(ids, model, max_n_logits=meta["max_n_logits"],
                  desired_logit_prob=meta["desired_logit_prob"], **opts)
    seconds = time.perf_counter() - t0
    A, n_logits = g.adjacency_matrix, len(g.logit_targets)
    out = work / "out" / case
    out.mkdir(parents=True)
    if "max_feature_nodes" not in c:
        full[c["set"]] = g
    elif "batch_size" not in c:  # one ranking by logit influence: its cut must not be a near-tie
        F0 = full[c["set"]]
        nf = len(F0.selected_features)
        rows = F0.adjacency_matrix[-n_logits:].abs()
        inf = (F0.logit_probabilities[:, None] * rows / rows.sum(1, keepdim=True)).sum(0)[:nf]
        k = c["max_feature_nodes"]
        v = inf.sort(descending=True).values
        assert (v[k - 1] - v[k]) / v[k - 1] > margin, f"{case}: the node budget cuts a near-tie"
    lw = torch.zeros(A.shape[0])
    lw[-n_logits:] = g.logit_probabilities
    node_inf = compute_node_influence(A, lw)
    node_thr = find_threshold(node_inf, meta["node_threshold"])
    keep = node_inf >= node_thr
    keep[-n_logits - len(ids):] = True
    pruned = A.clone()
    pruned[~keep] = 0
    pruned[:, ~keep] = 0
    edge_scores = compute_edge_influence(pruned, lw)
    edge_thr = find_threshold(edge_scores.flatten(), meta["edge_threshold"])
    pr = prune_graph(g, meta["node_threshold"], meta["edge_threshold"])
    replacement, completeness = compute_graph_scores(g)
    arrays = dict(adjacency=A, active_features=g.active_features, activation_values=g.activation_values,
                  selected_features=g.selected_features, input_tokens=g.input_tokens,
                  logit_probabilities=g.logit_probabilities, logit_tokens=g.logit_token_ids,
                  node_mask=pr.node_mask, edge_mask=pr.edge_mask, cumulative_scores=pr.cumulative_scores,
                  node_influence=node_inf, edge_scores=edge_scores, logits=logits[0])
    for k, v in arrays.items():
        np.save(out / f"{k}.npy", v.detach().cpu().numpy())
    info = dict(input_string=g.input_string, logit_strings=[t.token_str for t in g.logit_targets],
                node_threshold_value=float(node_thr), edge_threshold_value=float(edge_thr),
                replacement_score=replacement, completeness_score=completeness, scan=g.scan,
                n_active=int(len(g.active_features)), seconds=seconds, pre_activation_margin=gap)
    (out / "info.json").write_text(json.dumps(info, indent=1))
    create_graph_files(g, slug=case, output_path=str(out / "json"), node_threshold=meta["node_threshold"],
                       edge_threshold=meta["edge_threshold"])
    report[case] = {"n_active": info["n_active"], "n_logits": n_logits, "seconds": round(seconds, 3)}
(work / "report.json").write_text(json.dumps(report, indent=1))
print(json.dumps(report))
"""

META = dict(
    prompt=PROMPT,
    scan=SCAN,
    model=MODEL,
    d_transcoder=D_TRANSCODER,
    margin=MARGIN,
    max_n_logits=10,
    desired_logit_prob=0.95,
    node_threshold=0.8,
    edge_threshold=0.98,
    cases=CASES,
    sets=SETS,
)


def reference_dir() -> Path:
    """The folder of circuit-tracer's outputs (module docstring), built on first use and then reused.

    The cache key is the script text, META and the tokenizer's files, so any change to them rebuilds it; a
    build goes to a temporary folder renamed into place only when complete.

    Returns:
        `$JAXLENS_REF_ENVS/outputs/circuit-tracer-graphs-<key>` (default under ~/.cache/jaxlens/ref-envs).
    """
    root = ref_envs.cache_root() / "outputs"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".circuit-tracer-graphs-", dir=root))
    try:
        _tokenizer(work / "model")
        h = hashlib.sha256(SCRIPT.encode() + json.dumps(META, sort_keys=True).encode())
        for f in sorted((work / "model").iterdir()):
            h.update(f.name.encode() + f.read_bytes())
        final = root / f"circuit-tracer-graphs-{h.hexdigest()[:12]}"
        if (final / "report.json").is_file():
            return final
        (work / "meta.json").write_text(json.dumps(META))
        exe = saelens_ref.circuit_tracer_python()
        ref_envs.run_script(exe, SCRIPT, str(work), timeout=900, env={"OMP_NUM_THREADS": "1"})
        try:
            os.rename(work, final)
        except OSError:  # built at the same time by another worker: keep theirs
            if not (final / "report.json").is_file():
                raise
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokenizer(path: Path) -> None:
    """The tiny tokenizer (vocabulary 400: the prompt is 11 tokens), readable by transformers 4 and 5:
    transformers 5 records `tokenizer_class: TokenizersBackend`, a class transformers 4.57 does not have."""
    from jaxlens.testing import train_tiny_tokenizer

    train_tiny_tokenizer(path, vocab_size=400)
    conf = json.loads((path / "tokenizer_config.json").read_text())
    conf.pop("backend", None)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))


@pytest.fixture(scope="session", name="circuit_tracer_reference")
def reference_fixture() -> Path:
    """The fixture `circuit_tracer_reference`: circuit-tracer's graphs of PROMPT for every case of CASES (see
    `reference_dir`). Import `reference_fixture` into a test module to use it."""
    return reference_dir()
