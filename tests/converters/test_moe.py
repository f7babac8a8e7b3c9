"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert) against `transformers`,
their routing against HF's router, and the MoE hooks against TransformerLens 4.3.

Random HF models with small unequal sizes (5 experts, 2 per token), saved and loaded back: fp32 logits within
1e-4, resid_pre equal to HF's hidden states; the chosen experts and their weights equal to what HF's router
logits (`output_router_logits=True`) give under HF's own rule (softmax, top-k, renormalised when the family
does); the routing and expert hooks patchable.
"""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlens import HookedTransformer, converters, testing
from jaxlens.errors import CheckpointError

T = 12
X, K = 5, 2
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, vocab_size=300, max_position_embeddings=64, num_local_experts=X,
        num_experts_per_tok=K), True),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=12,
        intermediate_size=64, moe_intermediate_size=28, vocab_size=97, max_position_embeddings=64,
        num_experts=X, num_experts_per_tok=K, norm_topk_prob=False), False),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=28, shared_expert_intermediate_size=36, vocab_size=97,
        max_position_embeddings=64, num_experts=X, num_experts_per_tok=K, norm_topk_prob=False), False),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    cache = {}

    def get(case):
        if case not in cache:
            cls, model_cls, conf, _ = CASES[case]
            path = tmp_path_factory.mktemp(case)
            seed = 60 + sorted(CASES).index(case)
            hf, tokens = testing.saved_random_hf_model(path, cls, model_cls, seed, T,
                                                       **{"initializer_range": 0.2, **conf})
            ref = testing.hf_outputs(hf, tokens)
            with torch.no_grad():
                out = hf(torch.as_tensor(tokens), output_router_logits=True)
            ref["router_logits"] = np.stack([r.float().numpy() for r in out.router_logits])  # [layer tok X]
            cache[case] = path, tokens, ref
        return cache[case]

    return get


def hf_routing(router_logits: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """HF's rule on its own router logits: (top-k expert ids [..., K], weights scattered [..., X])."""
    z = router_logits.astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1)[..., :K]
    top = np.take_along_axis(probs, idx, -1)
    if normalize:
        top = top / top.sum(-1, keepdims=True)
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, idx, top, -1)
    return idx, weights


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_and_its_router(built, case):
    path, tokens, ref = built(case)
    model = HookedTransformer.from_pretrained_no_processing(path)
    assert (model.cfg.num_experts, model.cfg.experts_per_token) == (X, K)
    assert model.cfg.normalize_expert_weights == CASES[case][3]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(
        ("resid_pre", "hook_expert_indices", "hook_expert_weights")))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    for layer in range(model.cfg.n_layers):
        np.testing.assert_allclose(np.asarray(cache["resid_pre", layer]), ref["hidden_states"][layer],
                                   atol=1e-4, rtol=0, err_msg=f"resid_pre {layer}")
        idx, weights = hf_routing(ref["router_logits"][layer], CASES[case][3])
        got_idx = np.asarray(cache[f"blocks.{layer}.mlp.hook_expert_indices"]).reshape(-1, K)
        np.testing.assert_array_equal(np.sort(got_idx, -1), np.sort(idx, -1))
        got_w = np.asarray(cache[f"blocks.{layer}.mlp.hook_expert_weights"]).reshape(-1, X)
        np.testing.assert_allclose(got_w, weights, atol=1e-5, rtol=0)
    assert len(np.unique(got_idx)) > 2  # the tokens really spread over the experts


@pytest.mark.parametrize("case", list(CASES))
def test_processing_keeps_log_probs(built, case):
    import jax

    path, tokens, ref = built(case)
    model = HookedTransformer.from_pretrained(path)
    assert model.cfg.normalization_type == "RMSPre"
    got = jax.nn.log_softmax(model(tokens), axis=-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.nn.log_softmax(ref["logits"], axis=-1)),
                               atol=1e-4, rtol=0)


def test_mixtral_hooks_match_transformer_lens(built):
    pytest.importorskip("transformer_lens.model_bridge")
    from tl_reference import close, shared_hooks

    path, tokens, _ = built("mixtral")
    jc, tc, shared = shared_hooks(path, tokens)
    assert {"blocks.1.mlp.hook_expert_weights", "blocks.1.mlp.hook_expert_indices", "blocks.0.hook_mlp_out"
            } <= set(shared)
    for name in shared:
        got, want = np.asarray(jc[name]), tc[name].numpy()
        if name.endswith("hook_attn_scores"):
            mask = np.tril(np.ones((T, T), bool))
            got, want = got[..., mask], want[..., mask]
        elif name.endswith("hook_expert_indices"):  # the same experts, maybe in another order
            got, want = np.sort(got.reshape(want.shape), -1), np.sort(want, -1)
        elif got.shape != want.shape:  # TL 4.3's routing hooks are over flattened tokens
            got = got.reshape(want.shape)
        close(got, want, name)


def test_routing_and_expert_hooks_are_patchable(built):
    import jax.numpy as jnp

    path, tokens, _ = built("mixtral")
    model = HookedTransformer.from_pretrained_no_processing(path)
    base = np.asarray(model(tokens))
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.mlp.hook_expert_weights"])
    weights = np.asarray(cache["blocks.0.mlp.hook_expert_weights"])
    only_expert_3 = np.zeros_like(weights)
    only_expert_3[..., 3] = 1.0
    rerouted = np.asarray(model.run_with_hooks(tokens, fwd_hooks=[(
        "blocks.0.mlp.hook_expert_weights", lambda x, hook: jnp.asarray(only_expert_3))]))
    assert not np.allclose(rerouted, base, atol=1e-3)
    # routing everything to expert 3 equals zeroing every other expert's output by hand
    _, c3 = model.run_with_cache(tokens, names_filter=["blocks.0.mlp.experts.3.hook_post"])
    assert c3["blocks.0.mlp.experts.3.hook_post"].shape == (2, T, model.cfg.d_mlp)
    ablated = np.asarray(model.run_with_hooks(tokens, fwd_hooks=[(
        "blocks.0.mlp.experts.3.hook_post", lambda x, hook: jnp.zeros_like(x))]))
    uses_3 = (weights[..., 3] > 0).any()
    assert uses_3 == (not np.allclose(ablated, base, atol=1e-6))


@pytest.mark.parametrize("case", list(CASES))
def test_batched_expert_layout_loads_the_same(built, tmp_path, case):
    """save_pretrained writes one tensor per expert; transformers 5 holds them batched (an in-memory model's
    state dict and some checkpoints): both give the same params."""
    path = built(case)[0]
    tensors = load_file(path / "model.safetensors")
    gate, up, down = {"mixtral": ("w1", "w3", "w2")}.get(case, ("gate_proj", "up_proj", "down_proj"))
    moe = "block_sparse_moe" if case == "mixtral" else "mlp"
    for layer in range(2):
        p = f"model.layers.{layer}."
        def take(n, p=p):
            return np.stack([tensors.pop(p + f"{moe}.experts.{e}.{n}.weight") for e in range(X)])

        tensors[p + "mlp.experts.gate_up_proj"] = np.concatenate([take(gate), take(up)], axis=1)
        tensors[p + "mlp.experts.down_proj"] = take(down)
        tensors[p + "mlp.gate.weight"] = tensors.pop(p + f"{moe}.gate.weight")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    (cfg, params), (cfg_want, want) = converters.load(tmp_path), converters.load(path)
    assert cfg == cfg_want
    np.testing.assert_array_equal(params["blocks"]["mlp"]["W_gate"], want["blocks"]["mlp"]["W_gate"])
    for k in ("W_in", "W_gate", "W_out"):
        got, expected = params["blocks"]["mlp"]["experts"][k], want["blocks"]["mlp"]["experts"][k]
        np.testing.assert_array_equal(got, expected)


def test_dense_layers_among_experts_are_refused(built):
    import json

    hf = json.loads((built("qwen3_moe")[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="mlp_only_layers"):
        converters.family_for(hf).config_from_hf({**hf, "mlp_only_layers": [1]})
    with pytest.raises(CheckpointError, match="decoder_sparse_step"):
        converters.family_for(hf).config_from_hf({**hf, "decoder_sparse_step": 2})


@pytest.mark.parametrize("fields,message", [
    (dict(num_experts=4), "set both"),
    (dict(num_experts=4, experts_per_token=5), "set both"),
    (dict(shared_expert_d_mlp=8), "needs a mixture of experts"),
])
def test_inconsistent_expert_config_is_refused(fields, message):
    from jaxlens import Config
    from jaxlens.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        Config(d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16, d_vocab=11, n_ctx=8, **fields)
