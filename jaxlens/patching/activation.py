"""TransformerLens's activation-patching functions, same names, arguments, shapes and values, as sweeps.

    from jaxlens.patching import get_act_patch_attn_head_out_by_pos
    _, clean_cache = model.run_with_cache(clean_tokens)
    grid = get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric)   # [layer pos head]

Each function is one `sweep` (or a few, stacked, for the `*_every` helpers) and takes the sweep's options as
keywords (`memory_budget`, `chunk_size`, `prefix_reuse`, `devices`, `checkpoint_dir`, `progress`, ...).
Semantics follow TransformerLens (`transformer_lens/patching.py`): every index is patched across the whole
batch; keys and values sweep `n_key_value_heads` under grouped-query attention (the `*_every` helpers pad them
with zeros to n_heads); the pattern sweeps are indexed (layer, head_index, dest_pos[, src_pos]).

`get_act_patch_direct_path` is path patching of one source head into later heads' query, key or value inputs.
"""

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxlens.errors import InputError
from jaxlens.model.forward import check_tokens
from jaxlens.patching.sweep import cached_run, sweep

# (hook, axes) of each TransformerLens sweep, by the suffix of its name.
SPECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("hook_resid_mid", ("layer", "pos")),
    "attn_out": ("hook_attn_out", ("layer", "pos")),
    "mlp_out": ("hook_mlp_out", ("layer", "pos")),
    "attn_head_out_by_pos": ("attn.hook_z", ("layer", "pos", "head")),
    "attn_head_q_by_pos": ("attn.hook_q", ("layer", "pos", "head")),
    "attn_head_k_by_pos": ("attn.hook_k", ("layer", "pos", "head")),
    "attn_head_v_by_pos": ("attn.hook_v", ("layer", "pos", "head")),
    "attn_head_pattern_by_pos": ("attn.hook_pattern", ("layer", "head_index", "dest_pos")),
    "attn_head_pattern_dest_src_pos": ("attn.hook_pattern", ("layer", "head_index", "dest_pos", "src_pos")),
    "attn_head_out_all_pos": ("attn.hook_z", ("layer", "head")),
    "attn_head_q_all_pos": ("attn.hook_q", ("layer", "head")),
    "attn_head_k_all_pos": ("attn.hook_k", ("layer", "head")),
    "attn_head_v_all_pos": ("attn.hook_v", ("layer", "head")),
    "attn_head_pattern_all_pos": ("attn.hook_pattern", ("layer", "head_index")),
}
# The `*_every` helpers: stacked sweeps on a leading patch_type axis.
EVERY: dict[str, tuple[str, ...]] = {
    "attn_head_all_pos_every": ("attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos",
                                "attn_head_v_all_pos", "attn_head_pattern_all_pos"),
    "attn_head_by_pos_every": ("attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos",
                               "attn_head_v_by_pos", "attn_head_pattern_by_pos"),
    "block_every": ("resid_pre", "attn_out", "mlp_out"),
}


def stack_every(kind: str, grids: list, n_heads: int) -> jax.Array:
    """Stack the sweeps of a `*_every` helper as TransformerLens does: k/v zero-padded to n_heads, the
    by-position pattern grid [layer head pos] moved to [layer pos head]."""
    out = []
    for name, g in zip(EVERY[kind], grids, strict=True):
        g = jnp.asarray(g)
        if name == "attn_head_pattern_by_pos":
            g = jnp.swapaxes(g, -1, -2)
        if "_k_" in name or "_v_" in name:
            g = jnp.pad(g, [(0, 0)] * (g.ndim - 1) + [(0, n_heads - g.shape[-1])])
        out.append(g)
    return jnp.stack(out)


def _sweep_function(kind: str, summary: str) -> Callable:
    def patch(model, corrupted_tokens, clean_cache, patching_metric, **options) -> Float[Array, "..."]:
        if kind in EVERY:
            grids = []
            for part in EVERY[kind]:
                opts = dict(options)
                if opts.get("checkpoint_dir") is not None:
                    opts["checkpoint_dir"] = Path(opts["checkpoint_dir"]) / part
                grids.append(_one(part, model, corrupted_tokens, clean_cache, patching_metric, opts))
            return stack_every(kind, grids, model.cfg.n_heads)
        return jnp.asarray(_one(kind, model, corrupted_tokens, clean_cache, patching_metric, options))

    hook, axes = SPECS.get(kind, (None, None))
    shape = (f"[{len(EVERY[kind])}, " + ", ".join(_TL_AXES[kind]) + "]") if kind in EVERY else \
        "[" + ", ".join(axes) + "]"
    patch.__name__ = patch.__qualname__ = f"get_act_patch_{kind}"
    patch.__doc__ = f"""{summary} As TransformerLens's `get_act_patch_{kind}`.

    Args:
        model: a HookedTransformer (anything with `.cfg` and `.params`).
        corrupted_tokens: the corrupted prompts [batch pos].
        clean_cache: the clean run's cache (ActivationCache or dict), or clean token ids [batch pos].
        patching_metric: logits [batch pos d_vocab] -> scalar.
        **options: `sweep` options (memory_budget, chunk_size, prefix_reuse, devices, checkpoint_dir, progress,
            on_chunk, metric_names).

    Returns:
        The metric for each patch, shape {shape}.
    """
    return patch


_TL_AXES = {"attn_head_all_pos_every": ("n_layers", "n_heads"), "attn_head_by_pos_every": ("n_layers", "pos", "n_heads"),
            "block_every": ("n_layers", "pos")}


def _one(kind, model, corrupted_tokens, clean_cache, metric, options):
    hook, axes = SPECS[kind]
    return sweep(model.params, model.cfg, corrupted_tokens, clean_cache, metric, hook=hook, axes=axes,
                 **options).values


get_act_patch_resid_pre = _sweep_function(
    "resid_pre", "Patch the residual stream entering each block, by position.")
get_act_patch_resid_mid = _sweep_function(
    "resid_mid", "Patch the residual stream between attention and MLP, by position.")
get_act_patch_attn_out = _sweep_function("attn_out", "Patch each attention layer's output, by position.")
get_act_patch_mlp_out = _sweep_function("mlp_out", "Patch each MLP layer's output, by position.")
get_act_patch_attn_head_out_by_pos = _sweep_function(
    "attn_head_out_by_pos", "Patch each head's output (z), by position.")
get_act_patch_attn_head_q_by_pos = _sweep_function(
    "attn_head_q_by_pos", "Patch each head's queries, by position.")
get_act_patch_attn_head_k_by_pos = _sweep_function(
    "attn_head_k_by_pos", "Patch each key head's keys, by position.")
get_act_patch_attn_head_v_by_pos = _sweep_function(
    "attn_head_v_by_pos", "Patch each value head's values, by position.")
get_act_patch_attn_head_pattern_by_pos = _sweep_function(
    "attn_head_pattern_by_pos", "Patch each head's attention pattern row, by destination position.")
get_act_patch_attn_head_pattern_dest_src_pos = _sweep_function(
    "attn_head_pattern_dest_src_pos", "Patch each (destination, source) entry of each head's attention pattern.")
get_act_patch_attn_head_out_all_pos = _sweep_function(
    "attn_head_out_all_pos", "Patch each head's output at every position.")
get_act_patch_attn_head_q_all_pos = _sweep_function(
    "attn_head_q_all_pos", "Patch each head's queries at every position.")
get_act_patch_attn_head_k_all_pos = _sweep_function(
    "attn_head_k_all_pos", "Patch each key head's keys at every position.")
get_act_patch_attn_head_v_all_pos = _sweep_function(
    "attn_head_v_all_pos", "Patch each value head's values at every position.")
get_act_patch_attn_head_pattern_all_pos = _sweep_function(
    "attn_head_pattern_all_pos", "Patch each head's whole attention pattern.")
get_act_patch_attn_head_all_pos_every = _sweep_function(
    "attn_head_all_pos_every", "Every head patched at every position, for output, q, k, v and pattern, stacked.")
get_act_patch_attn_head_by_pos_every = _sweep_function(
    "attn_head_by_pos_every", "Every head patched by position, for output, q, k, v and pattern, stacked.")
get_act_patch_block_every = _sweep_function(
    "block_every", "resid_pre, attn_out and mlp_out patched by position, stacked.")


# TransformerLens's setters, each "copy the clean value at this index, across the batch": what a sweep does.
_TL_SETTERS = ("layer_pos_patch_setter", "layer_pos_head_vector_patch_setter", "layer_head_vector_patch_setter",
               "layer_head_pattern_patch_setter", "layer_head_pos_pattern_patch_setter",
               "layer_head_dest_src_pos_pattern_patch_setter")


def generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, patch_setter=None,
                             activation_name: str | None = None, index_axis_names=None,
                             **options) -> Float[Array, "..."]:
    """TransformerLens's `generic_activation_patch`, same argument order: sweep `activation_name` ("z",
    "resid_pre", "pattern", ...) over `index_axis_names` (the first is "layer").

    `patch_setter` may be None or one of TransformerLens's own setters (all of which copy the clean value at the
    index across the batch, as every sweep does); custom setters are refused: write the change as a sweep
    over the axes it indexes, or as an intervention.
    """
    setter = getattr(patch_setter, "__name__", patch_setter)
    if patch_setter is not None and setter not in _TL_SETTERS:
        raise InputError(f"patch_setter {setter!r} is not one of TransformerLens's setters {_TL_SETTERS}; "
                         "jaxlens sweeps always copy the clean value at the index across the batch. Leave "
                         "patch_setter out, or express the change as a sweep or an intervention.")
    if activation_name is None or index_axis_names is None:
        raise InputError("generic_activation_patch needs activation_name (e.g. 'z') and index_axis_names "
                         "(e.g. ('layer', 'pos', 'head_index')).")
    return jnp.asarray(sweep(model.params, model.cfg, corrupted_tokens, clean_cache, patching_metric,
                             hook=activation_name, axes=tuple(index_axis_names), **options).values)


def get_act_patch_direct_path(model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric,
                              src_layer: int, src_head: int, component: str = "q", verbose: bool = True,
                              **options) -> Float[Array, "n_layers n_heads"]:
    """Path patching of one source head into each later head's query, key or value input.

    For every destination head B = (l, h) with l > src_layer, the corrupted run is re-run with one change: the
    input that head B's `component` ("q", "k" or "v") reads, the residual stream entering layer l before ln1
    (hook_<component>_input), becomes `resid_pre_corrupted[l] + delta` at every position, where
    `delta = (z_clean - z_corrupted)[:, :, src_head] @ W_O[src_layer, src_head]` is the source head's
    clean-minus-corrupted write to the residual stream (without b_O). Every other reader, including head B's
    other inputs, the MLPs and other heads, still sees the corrupted residual; ln1 is recomputed on the patched
    input (exact, folded LayerNorm or not); everything downstream of head B then runs normally. As
    TransformerLens 4.3's `get_act_patch_direct_path`.

    Args:
        model: a HookedTransformer (anything with `.cfg` and `.params`).
        corrupted_tokens: [batch pos].
        clean_cache: holds `blocks.{src_layer}.attn.hook_z` (or clean token ids [batch pos]).
        corrupted_cache: the corrupted run's cache, used for hook_z when it holds it (else recomputed).
        patching_metric: logits -> scalar.
        src_layer, src_head: the source head.
        component: "q", "k" or "v".
        verbose: show a progress bar.
        **options: `sweep` options.

    Returns:
        [n_layers, n_heads] (n_key_value_heads for "k"/"v" under grouped-query attention): the metric with the
        path into each head patched; rows l <= src_layer are 0.0 placeholders, as in TransformerLens.

    Raises:
        InputError: a component other than q/k/v, a source head outside the model, or a model whose attention
            output is normalised before the residual add (Gemma-2 ln1_post), where a head's write is not z @ W_O.

    Unlike TransformerLens, which refuses "k"/"v" under grouped-query attention, this patches the shared key or
    value head's input (columns are key/value heads).
    """
    cfg, params = model.cfg, model.params
    if component not in ("q", "k", "v"):
        raise InputError(f"component must be 'q', 'k' or 'v'; found {component!r}.")
    if not (0 <= src_layer < cfg.n_layers and 0 <= src_head < cfg.n_heads):
        raise InputError(f"Source head ({src_layer}, {src_head}) is outside the model "
                         f"({cfg.n_layers} layers x {cfg.n_heads} heads).")
    if cfg.use_normalization_before_and_after:
        raise InputError("Direct path patching needs each head's residual write to be z @ W_O, but this model "
                         "normalises the attention output (ln1_post) before adding it to the residual stream. "
                         "Use get_act_patch_attn_head_out_by_pos or a sweep over attn.hook_z instead.")
    tokens = check_tokens(jnp.asarray(corrupted_tokens), cfg)
    z_name = f"blocks.{src_layer}.attn.hook_z"
    corr = cached_run(params, cfg, tokens, ("blocks.hook_resid_pre", z_name))[1]
    z_corr = corrupted_cache[z_name] if corrupted_cache is not None and z_name in corrupted_cache else corr[z_name]
    if isinstance(clean_cache, (jax.Array, np.ndarray)):
        z_clean = cached_run(params, cfg, check_tokens(jnp.asarray(clean_cache), cfg), (z_name,))[1][z_name]
    else:
        z_clean = clean_cache[z_name]
    W_O = params["blocks"]["attn"]["W_O"][src_layer, src_head]
    # einsum letters: b=batch p=pos e=d_head d=d_model l=layer
    delta = jnp.einsum("bpe,ed->bpd", (z_clean - z_corr)[:, :, src_head], W_O)
    source = (corr["blocks.hook_resid_pre"] + delta[None])[:, :, :, None, :]  # [l b p 1 d], every head
    options.setdefault("progress", verbose)
    return jnp.asarray(sweep(params, cfg, tokens, source, patching_metric, hook=f"hook_{component}_input",
                             axes=("layer", "head"), layers=range(src_layer + 1, cfg.n_layers), fill=0.0,
                             **options).values)
