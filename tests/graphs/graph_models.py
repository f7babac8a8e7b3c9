"""Tiny random models of several families and random transcoders (plain, skip, cross-layer) for the graph
tests, and an independent frozen model built from ordinary Patch interventions (no replacement-model code)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens import HookedTransformer, forward, testing
from jaxlens.dictionaries import DictionaryConfig, init_dictionary
from jaxlens.interventions import Add, Patch

BASE = dict(d_model=16, n_layers=3, n_heads=4, d_head=4, d_mlp=20, d_vocab=29, n_ctx=12)
FAMILIES = {
    "llama": dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, act_fn="silu",
                  n_key_value_heads=2),
    "gpt2": dict(normalization_type="LN"),
    "gemma2": dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                   act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True, n_key_value_heads=1),
    "parallel": dict(normalization_type="LN", positional_embedding_type="rotary", parallel_attn_mlp=True,
                     act_fn="gelu"),
}
D_SAE = 24
TOKENS = [3, 7, 1, 12, 5, 9]


def tiny_model(family: str, seed: int = 0, **overrides) -> HookedTransformer:
    """A random model of `family` (norm gains 1 + noise, random biases: numpy_params), no tokenizer."""
    cfg = testing.tiny_config(**{**BASE, **FAMILIES[family], **overrides})
    return HookedTransformer(cfg, testing.numpy_params(cfg, seed))


def random_transcoders(cfg, kind: str, hook: str = "hook_resid_mid", seed: int = 0, activation: str = "relu",
                       d_sae: int = D_SAE):
    """{layer: Transcoder} ("plt", "skip") or a CrossLayerTranscoder ("clt") with random weights, reading
    `hook` and writing hook_mlp_out; about a third of the features fire on the tiny models' activations."""
    rng = np.random.RandomState(seed)
    D, L = cfg.d_model, cfg.n_layers
    r = lambda *shape, s=1.0: jnp.asarray(s * rng.randn(*shape), jnp.float32)
    if kind == "clt":
        c = DictionaryConfig(architecture="clt", d_in=D, d_sae=d_sae, n_layers=L, activation=activation,
                             hook_name=f"blocks.{{layer}}.{hook}",
                             hook_name_out="blocks.{layer}.hook_mlp_out")
        t = init_dictionary(c, seed)
        t.W_enc[...] = r(L, D, d_sae, s=D**-0.5)
        t.b_enc[...] = r(L, d_sae, s=0.3) - 0.3
        t.W_dec[...] = r(L, d_sae, L, D, s=0.3) * np.triu(np.ones((L, L)))[:, None, :, None]
        t.b_dec[...] = r(L, D, s=0.1)
        if activation == "jumprelu":
            t.threshold[...] = jnp.asarray(rng.uniform(0, 0.2, (L, d_sae)), jnp.float32)
        return t
    out = {}
    for l in range(L):
        c = DictionaryConfig(architecture="skip_transcoder" if kind == "skip" else "transcoder", d_in=D,
                             d_sae=d_sae, activation=activation, hook_name=f"blocks.{l}.{hook}",
                             hook_name_out=f"blocks.{l}.hook_mlp_out")
        t = init_dictionary(c, seed + l)
        t.W_enc[...] = r(D, d_sae, s=D**-0.5)
        t.b_enc[...] = r(d_sae, s=0.3) - 0.3
        t.W_dec[...] = r(d_sae, D, s=0.3)
        t.b_dec[...] = r(D, s=0.1)
        if activation == "jumprelu":
            t.threshold[...] = jnp.asarray(rng.uniform(0, 0.2, d_sae), jnp.float32)
        if kind == "skip":
            t.W_skip[...] = r(D, D, s=0.2)
        out[l] = t
    return out


# -- the independent frozen model ----------------------------------------------------------------------------
def _read_name(hook: str) -> str:
    return "ln2.hook_normalized" if hook == "mlp.hook_in" else hook


def _inputs(params, cfg, cache, hook: str) -> jax.Array:
    """[layer pos d_model] transcoder inputs from a cache (mlp.hook_in: ln2's output, weights applied)."""
    x = cache[f"blocks.{_read_name(hook)}"][:, 0]
    if hook == "mlp.hook_in":
        ln2 = params["blocks"]["ln2"]
        x = x * ln2["w"][:, None] + (ln2["b"][:, None] if "b" in ln2 else 0.0)
    return x


def frozen_names(cfg) -> list[str]:
    """The activations the frozen model patches to their clean values (the MLP outputs last)."""
    norms = ["ln1", "ln2"] + (["ln1_post", "ln2_post"] if cfg.use_normalization_before_and_after else [])
    return (["blocks.attn.hook_pattern", "ln_final.hook_scale"] + [f"blocks.{n}.hook_scale" for n in norms]
            + ["blocks.hook_mlp_out"])


def skip_of(transcoders, x):
    """[layer pos d_model] each layer's skip term of its input (zeros without skip connections)."""
    if not isinstance(transcoders, dict):
        return jnp.zeros_like(x)
    return jnp.stack([transcoders[l].skip(x[l]) for l in range(x.shape[0])])


def pre_activations(transcoders, x):
    """[layer pos d_sae] every feature's pre-activation from the transcoder inputs."""
    if not isinstance(transcoders, dict):
        return jnp.moveaxis(transcoders.hidden_pre(jnp.moveaxis(x, 0, 1)), 0, 1)
    return jnp.stack([transcoders[l].hidden_pre(x[l]) for l in range(x.shape[0])])


def frozen_reference(model, transcoders, hook: str, tokens):
    """A function (embed delta [pos d_model], mlp-out delta [layer pos d_model]) -> (pre-activations
    [layer pos d_sae], demeaned last-position logits [d_vocab]) of the model with every attention pattern,
    norm scale and MLP output patched to its clean value (ordinary Patch / Add interventions), plus the change
    of each skip transcoder's skip term (found layer by layer: n_layers + 1 forwards)."""
    params, cfg = model.params, model.cfg
    tok = jnp.asarray(tokens)[None]
    frozen = frozen_names(cfg)
    names = frozen + [f"blocks.{_read_name(hook)}"]
    _, clean = forward(params, cfg, tok, cache_names=names)
    x_clean = _inputs(params, cfg, clean, hook)
    skip_clean = skip_of(transcoders, x_clean)
    n_runs = cfg.n_layers + 1 if isinstance(transcoders, dict) and hasattr(transcoders[0], "W_skip") else 1

    @jax.jit
    def run(d_embed, d_mlp):
        skip_diff = jnp.zeros_like(d_mlp)
        for _ in range(n_runs):
            ivs = {n: Patch(clean[n]) for n in frozen[:-1]}
            ivs["blocks.hook_mlp_out"] = Patch(clean["blocks.hook_mlp_out"] + (skip_diff + d_mlp)[:, None])
            ivs["hook_embed"] = Add(d_embed[None])
            logits, cache = forward(params, cfg, tok, interventions=ivs, cache_names=names)
            x = _inputs(params, cfg, cache, hook)
            skip_diff = skip_of(transcoders, x) - skip_clean
        last = logits[0, -1]
        return pre_activations(transcoders, x), last - last.mean()

    return run
