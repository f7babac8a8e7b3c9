"""Edge-level interventions as data: a mask over the graph's edges decides, for every reader, which sources it
sees from the current run and which from the corrupted one.

For a destination d with input `resid_in(d)` in the current run,

    input_d = resid_in(d) + sum_s (1 - mask[s, d]) * (corrupted_out(s) - current_out(s)),

so mask 1 keeps the edge (the circuit) and mask 0 patches it (Hanna et al. 2024, `evaluate_graph`;
the edge-level interchange of ACDC). The differences `corrupted_out(s) - current_out(s)` are the carry of the
block runner (`runner.run_blocks_carried`): a [n_src, batch, pos, d_model] stack that `WriteSources`
fills at each layer's `attn.hook_result` and `hook_mlp_out` and `ReadSources` reads at the layer's split
`hook_q_input` / `hook_k_input` / `hook_v_input` and `hook_mlp_in`, so the edge mask travels as stacked
per-layer data through the one layer loop and a stack of masks vmaps. A float mask interpolates.

    data = source_outputs(params, cfg, corrupted_tokens)         # what the patched edges carry
    value = masked_metric(params, cfg, layout, clean_tokens, data, mask, metric)   # mask: [n_edges]
"""

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens.circuits.graph import Layout
from jaxlens.config import Config
from jaxlens.interventions import HookPoint
from jaxlens.model import runner
from jaxlens.model.attention import Context
from jaxlens.model.forward import final_logits, run, unembed
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm
from jaxlens.shapes import Params

# einsum letters: s=source b=batch p=pos d=d_model h=head_index (or kv_head_index) v=d_vocab


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReadSources:
    """Add the carried source differences to a reader's input: x + sum_s weight[s, h] carry[s] (per head for
    [batch pos head d_model] inputs, weight [n_src]: one reader for [batch pos d_model])."""

    weight: Array
    uses_carry: ClassVar[bool] = True

    def __call__(self, x: Array, hook: HookPoint, carry: Array) -> tuple[Array, Array]:
        w = self.weight.astype(carry.dtype)
        if x.ndim == 4:
            return x + jnp.einsum("sbpd,sh->bphd", carry, w).astype(x.dtype), carry
        return x + jnp.einsum("sbpd,s->bpd", carry, w).astype(x.dtype), carry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WriteSources:
    """Store `corrupted - x` in the carry at sources start.. (one per head for [batch pos head d_model])."""

    corrupted: Array
    start: Array  # [] (one layer) or [layer] (stacked)
    uses_carry: ClassVar[bool] = True

    def __call__(self, x: Array, hook: HookPoint, carry: Array) -> tuple[Array, Array]:
        diff = (self.corrupted - x).astype(carry.dtype)
        diff = jnp.moveaxis(diff, 2, 0) if diff.ndim == 4 else diff[None]
        zero = jnp.zeros((), jnp.int32)
        return x, jax.lax.dynamic_update_slice(carry, diff, (self.start.astype(jnp.int32), zero, zero, zero))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SourceOutputs:
    """What every source writes in one run: the input [batch pos d_model], per-head results
    [layer batch pos head d_model] and MLP outputs [layer batch pos d_model]."""

    resid0: Array
    result: Array
    mlp_out: Array

    def stack(self) -> Float[Array, "n_src batch pos d_model"]:
        """The outputs in source order (input, then per layer its heads and its MLP)."""
        L = self.result.shape[0]
        per_layer = jnp.concatenate([jnp.moveaxis(self.result, 3, 1), self.mlp_out[:, None]], axis=1)
        return jnp.concatenate([self.resid0[None], per_layer.reshape((L * per_layer.shape[1],)
                                                                    + per_layer.shape[2:])], axis=0)


SOURCE_HOOKS = ("blocks.0.hook_resid_pre", "blocks.attn.hook_result", "blocks.hook_mlp_out")


def source_outputs(params: Params, cfg: Config, tokens: Int[Array, "batch pos"]) -> SourceOutputs:
    """Every source's output on `tokens` (one forward)."""
    _, cache, _ = run(params, cfg, tokens, cache_names=SOURCE_HOOKS)
    return SourceOutputs(*(cache[n] for n in SOURCE_HOOKS))


def dense_patch(layout: Layout, edge_src, edge_dst, mask: Float[Array, " n_edges"]
                ) -> Float[Array, "n_src n_dst"]:
    """(1 - mask) scattered over [n_src, n_dst]: how much of each source's difference each reader gets."""
    patch = 1.0 - mask.astype(jnp.float32)
    return jnp.zeros((layout.n_src, layout.n_dst), jnp.float32).at[edge_src, edge_dst].set(patch)


def edge_interventions(layout: Layout, patch: Float[Array, "n_src n_dst"], corrupted: SourceOutputs
                       ) -> tuple[dict, Float[Array, " n_src"]]:
    """The stacked block interventions of one edge mask (`dense_patch`), and the logits' weights [n_src]."""
    L, H, KV, P = layout.n_layers, layout.n_heads, layout.n_kv, layout.per_layer
    per = jnp.moveaxis(patch[:, : L * P].reshape(layout.n_src, L, P), 1, 0)  # [L n_src P]
    starts = jnp.arange(L, dtype=jnp.int32) * (H + 1) + 1
    return {
        "blocks.hook_q_input": ReadSources(per[:, :, :H]),
        "blocks.hook_k_input": ReadSources(per[:, :, H:H + KV]),
        "blocks.hook_v_input": ReadSources(per[:, :, H + KV:H + 2 * KV]),
        "blocks.hook_mlp_in": ReadSources(per[:, :, P - 1]),
        "blocks.attn.hook_result": WriteSources(corrupted.result, starts),
        "blocks.hook_mlp_out": WriteSources(corrupted.mlp_out, starts + H),
    }, patch[:, L * P]


def masked_resid(params: Params, cfg: Config, layout: Layout, resid0: Float[Array, "batch pos d_model"],
                 corrupted: SourceOutputs, patch: Float[Array, "n_src n_dst"]
                 ) -> Float[Array, "batch pos d_model"]:
    """The residual the logits read, with the edges weighted by `patch` (`dense_patch`) taken from the
    corrupted run, starting from the current run's input `resid0`."""
    ivs, w_logits = edge_interventions(layout, patch, corrupted)
    table_ivs = runner.BlockInterventions({k.removeprefix("blocks."): [v] for k, v in ivs.items()}, {})
    ctx = context(resid0)
    carry = jnp.zeros((layout.n_src,) + resid0.shape, resid0.dtype)
    carry = carry.at[0].set((corrupted.resid0 - resid0).astype(resid0.dtype))
    resid, _, _, carry = runner.run_blocks_carried(params["blocks"], cfg, resid0, ctx, table_ivs, start=0,
                                                   stop=cfg.n_layers, carry=carry)
    return resid + jnp.einsum("sbpd,s->bpd", carry, w_logits.astype(carry.dtype)).astype(resid.dtype)


def context(resid: Float[Array, "batch pos d_model"]) -> Context:
    """The block runner's context of a run on `resid`: positions 0.., no padding."""
    b, s = resid.shape[:2]
    return Context(positions=jnp.broadcast_to(jnp.arange(s), (b, s)), key_valid=None, offset=0)


def masked_metric(params: Params, cfg: Config, layout: Layout, resid0, corrupted: SourceOutputs, edge_src,
                  edge_dst, mask: Float[Array, " n_edges"], metric: Callable, reads=None) -> Array:
    """metric(logits) of the current run (input `resid0`) with the edges where mask is 0 patched.

    With `reads` (a `patching.logit_reads.LogitReads`) only the logits the metric reads are computed."""
    patch = dense_patch(layout, edge_src, edge_dst, mask)
    resid = masked_resid(params, cfg, layout, resid0, corrupted, patch)
    return logits_metric(params, cfg, resid, metric, reads)


def logits_metric(params: Params, cfg: Config, resid, metric: Callable, reads=None) -> Array:
    """metric(final_logits(resid)), computing only the logits `reads` lists when given."""
    if reads is None:
        return metric(final_logits(params, cfg, resid))
    x = norm(params.get("ln_final", {}), resid[:, jnp.asarray(reads.positions)], cfg, Hooks(), "ln_final")
    vocab = None if reads.vocab is None else jnp.asarray(reads.vocab)
    return reads(unembed(params, cfg, x, vocab=vocab))


def embed(params: Params, cfg: Config, tokens: Int[Array, "batch pos"]) -> Float[Array, "batch pos d_model"]:
    """The residual entering block 0 (the input node's output)."""
    return run(params, cfg, tokens, stop_at_layer=0)[0]
