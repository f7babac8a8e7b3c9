"""forward(params, cfg, tokens, *, interventions, cache_names) -> (logits, cache): the model as a pure
function.

    logits, cache = forward(params, cfg, tokens,
                            interventions={"blocks.3.attn.hook_z": zero_ablate(mask)},
                            cache_names=("blocks.5.hook_resid_post", "blocks.attn.hook_pattern"))

Blocks run under `jax.lax.scan` over the stacked `layer` axis: compile time does not grow with depth.
Per-layer differences (attention windows) and stacked interventions are scanned data; an intervention
addressed to one layer is applied where the scanned layer index equals it. Nothing is mutated and no hook is
registered. `run(..., layout=layout.prepare(params, cfg))` (what the façade does) runs shallow models on CPU
unrolled on per-layer weight views instead, with the same results (`jaxlens.model.layout`).
"""

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.model import runner
from jaxlens.model.attention import Context, KVState
from jaxlens.model.hooks import Hooks
from jaxlens.model.layout import Layout
from jaxlens.model.loss import lm_cross_entropy_loss as lm_cross_entropy_loss  # re-exported
from jaxlens.model.norms import norm
from jaxlens.shapes import AnyArray, Params, ParamsLike, resolve_params

# einsum letters: b=batch p=pos d=d_model v=d_vocab


def forward(
    params: ParamsLike,
    cfg: Config,
    tokens: Int[Array, "batch pos"] | Float[Array, "batch pos d_model"],
    *,
    interventions: Mapping[str, Any] | None = None,
    cache_names: Iterable[str] = (),
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    attention_mask: Bool[Array, "batch pos"] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Run the model with interventions and return (logits, cache).

    Args:
        params: the params pytree (`params.param_shapes`).
        cfg: the architecture (static under jit).
        tokens: token ids [batch pos]; with `start_at_layer`, the residual stream [batch pos d_model] entering
            that layer instead (TransformerLens's semantics).
        interventions: {hook name: intervention or list of them}. `blocks.3.x` addresses layer 3,
            `blocks.x` every layer (array leaves with a leading `layer` axis). See `jaxlens.interventions`.
        cache_names: hook names to record. `blocks.x` without a layer index records every layer run, stacked.
        start_at_layer, stop_at_layer: run only blocks [start, stop). With stop_at_layer the output is the
            residual stream entering block `stop_at_layer` (no final norm or unembedding).
        attention_mask: True for real tokens, False for padding (keys masked; positions count real tokens).

    Returns:
        (logits [batch pos d_vocab] or the residual stream, {hook name: activation}).

    Raises:
        InputError: tokens of the wrong rank, out of the vocabulary, longer than n_ctx, bad layer bounds.
        UnknownHookError: an intervention or cache name that is not a hook point.
        InterventionError: an intervention that does not fit its activation.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlens import forward, init_params, testing, zero_ablate
        >>> cfg = testing.tiny_config()                  # 3 layers, 5 heads of 8, d_model 40, vocab 97
        >>> params = init_params(cfg, jax.random.key(0))
        >>> tokens = jnp.array([[1, 5, 9, 2, 7]])
        >>> logits, cache = forward(params, cfg, tokens, cache_names=["blocks.1.hook_resid_post"])
        >>> logits.shape, cache["blocks.1.hook_resid_post"].shape
        ((1, 5, 97), (1, 5, 40))
        >>> head_2 = (jnp.arange(cfg.n_heads) == 2)[:, None]   # broadcasts over [batch pos head_index d_head]
        >>> ablated, _ = forward(params, cfg, tokens,
        ...                      interventions={"blocks.1.attn.hook_z": zero_ablate(head_2)})
        >>> bool(jnp.abs(ablated - logits).max() > 0)
        True
    """
    params, cfg = resolve_params(params, cfg)
    out, cache, _ = run(params, cfg, tokens, interventions=interventions, cache_names=cache_names,
                        start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
                        attention_mask=attention_mask)
    return out, cache


def run(
    params: ParamsLike,
    cfg: Config,
    tokens: Int[AnyArray, "batch pos"] | Float[AnyArray, "batch pos d_model"],
    *,
    interventions: Mapping[str, Any] | None = None,
    cache_names: Iterable[str] = (),
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    attention_mask: Bool[AnyArray, "batch max_pos"] | Int[AnyArray, "batch max_pos"] | None = None,
    kv_cache: KVState | None = None,
    pos_offset: Int[Array, ""] | int = 0,
    stacked_cache: bool = False,
    layout: Layout | None = None,
) -> tuple[Array, dict[str, Array] | tuple[dict[str, Array], dict[str, Array]], KVState | None]:
    """`forward`, plus incremental decoding: with `kv_cache` (KVState with a leading layer axis, max_pos long)
    the tokens are placed at absolute positions pos_offset.. and the updated cache is returned third.

    With `kv_cache`, `attention_mask` covers every cache slot ([batch max_pos]): keys are masked over the
    whole cache and positions count the valid slots up to each query (left-padded batched decoding).

    With `stacked_cache` the second output is `runner.stacks`'s pair ({global or stacked name: activation},
    {relative block name: activations stacked over the layers `runner.stack_layers` lists}): one output per
    hook, for `ActivationCache`.

    With `layout` (`layout.prepare(params, cfg)`, made outside jit) the blocks run unrolled on its per-layer
    weights and the unembedding reads its transposed W_U: the fast path of shallow models on CPU, same
    results."""
    params, cfg = resolve_params(params, cfg)
    if kv_cache is not None and attention_mask is not None:
        n_mask, n_slots = jnp.shape(attention_mask)[-1], kv_cache.k.shape[2]
        if n_mask != n_slots:
            raise InputError(f"With a KV cache, attention_mask must cover all {n_slots} cache slots "
                             f"([batch max_pos], True for valid keys); found length {n_mask}.")
    table = hook_names.decoder_table(cfg)
    start, stop = runner.layer_bounds(cfg.n_layers, start_at_layer, stop_at_layer)
    glob_iv, block_iv = runner.split_interventions(table, interventions, start, stop)
    cache_names = tuple(cache_names)
    glob_cache, block_cache = table.split(cache_names)
    top = Hooks(here=glob_iv, names_to_cache=frozenset(glob_cache))

    if start_at_layer is None:
        tokens = check_tokens(tokens, cfg, pos_offset if isinstance(pos_offset, int) else 0)
        resid, positions = _embed(params, cfg, tokens, top, attention_mask, pos_offset)
    else:
        resid = jnp.asarray(tokens)
        if resid.ndim != 3 or resid.shape[-1] != cfg.d_model:
            raise InputError(
                f"With start_at_layer the input is the residual stream [batch pos d_model={cfg.d_model}]; "
                f"found shape {resid.shape}."
            )
        positions = _positions(resid.shape[:2], attention_mask, pos_offset)
    key_valid = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    ctx = Context(positions=positions, key_valid=key_valid, offset=pos_offset)
    lay = Layout(None, None) if layout is None else layout
    if lay.layers is not None and len(lay.layers) != cfg.n_layers:
        raise InputError(f"The weight layout has {len(lay.layers)} layers; the model has n_layers="
                         f"{cfg.n_layers}. Make it from these params with layout.prepare(params, cfg).")
    resid, recorded, new_kv = runner.run_blocks(params["blocks"], cfg, resid, ctx, block_iv, start=start,
                                                stop=stop, cache=block_cache, kv=kv_cache, layers=lay.layers)
    out = resid if stop_at_layer is not None else final_logits(params, cfg, resid, top, W_U_T=lay.W_U_T)
    gather = runner.stacks if stacked_cache else runner.collect
    return out, gather(table, cache_names, top.cache, recorded, start, stop), new_kv


def final_logits(params: Params, cfg: Config, resid: Float[Array, "batch pos d_model"],
                 hooks: Hooks | None = None,
                 vocab: Int[Array, " n"] | None = None, *,
                 W_U_T: Float[Array, "d_vocab d_model"] | None = None) -> Float[Array, "batch pos d_vocab"]:
    """ln_final then the unembedding (with `vocab`, only those logits)."""
    hooks = Hooks() if hooks is None else hooks
    x = norm(params.get("ln_final", {}), resid, cfg, hooks, "ln_final")
    return unembed(params, cfg, x, hooks, vocab, W_U_T=W_U_T)


def unembed(params: Params, cfg: Config, x: Float[Array, "batch pos d_model"], hooks: Hooks | None = None,
            vocab: Int[Array, " n"] | None = None, *,
            W_U_T: Float[Array, "d_vocab d_model"] | None = None) -> Float[Array, "batch pos d_vocab"]:
    """Logits from the final normalised residual (with output softcapping where the config has it); with
    `vocab`, only the logits of those token ids ([batch pos n]). `W_U_T`: the same W_U stored transposed
    (`layout.Layout`), which XLA's CPU dot reads faster."""
    W_U, b_U = params["unembed"]["W_U"], params["unembed"]["b_U"]
    if vocab is not None:
        W_U, b_U, W_U_T = W_U[:, vocab], b_U[vocab], None
    if hooks is not None:
        x = hooks("unembed.hook_in", x)
    if W_U_T is None:
        logits = jnp.einsum("bpd,dv->bpv", x, W_U) + b_U
    else:
        logits = jnp.einsum("bpd,vd->bpv", x, W_U_T) + b_U
    if cfg.output_logits_soft_cap is not None:
        logits = cfg.output_logits_soft_cap * jnp.tanh(logits / cfg.output_logits_soft_cap)
    return logits if hooks is None else hooks("unembed.hook_out", logits)


def check_tokens(tokens: Any, cfg: Config, pos_offset: int = 0) -> Int[Array, "batch pos"]:
    """Tokens as an int array, checked: rank 2, ids inside the vocabulary, length within n_ctx.

    JAX's gather clamps out-of-range ids silently, so concrete tokens are checked before the embedding.
    """
    try:
        concrete = np.asarray(tokens)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    arr = jnp.asarray(tokens)
    if arr.ndim != 2:
        raise InputError(f"tokens must be [batch pos]; found shape {arr.shape}. "
                         "Use tokens[None] for one sequence.")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise InputError(f"tokens must be integer ids; found dtype {arr.dtype}.")
    if pos_offset + arr.shape[1] > cfg.n_ctx:
        raise InputError(
            f"Sequence of {arr.shape[1]} tokens (from position {pos_offset}) is longer than the model's "
            f"context n_ctx={cfg.n_ctx}. Shorten the input or split it."
        )
    if concrete is not None and concrete.size:
        lo, hi = int(concrete.min()), int(concrete.max())
        if lo < 0 or hi >= cfg.d_vocab:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"Token id {bad} is outside the vocabulary [0, {cfg.d_vocab}). Check the tokenizer matches "
                "the model (jaxlens would otherwise read a clamped embedding silently)."
            )
    return arr


def _positions(shape, attention_mask, pos_offset) -> Int[Array, "batch pos"]:
    if attention_mask is not None:
        m = jnp.asarray(attention_mask, jnp.int32)
        if m.shape[1] != shape[1]:  # a mask over every KV-cache slot: the queries' slots are pos_offset..
            counts = jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)
            return jax.lax.dynamic_slice_in_dim(counts, pos_offset, shape[1], 1)
        return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0) + pos_offset
    return jnp.broadcast_to(jnp.arange(shape[1]) + pos_offset, shape)


def _embed(params, cfg: Config, tokens, hooks: Hooks, attention_mask, pos_offset):
    positions = _positions(tokens.shape, attention_mask, pos_offset)
    resid = hooks("hook_embed", params["embed"]["W_E"][tokens])
    if cfg.positional_embedding_type == "standard":
        resid = resid + hooks("hook_pos_embed", params["pos_embed"]["W_pos"][positions])
    return resid, positions
