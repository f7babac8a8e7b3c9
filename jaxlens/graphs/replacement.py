"""The local replacement model of attribution graphs (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer
0.5, `replacement_model_transformerlens.py`; ../shared/RESEARCH.md 1.2).

The model runs on one prompt with every attention pattern and every norm's scale (ln1, ln2, ln1_post,
ln2_post, ln_final `hook_scale`) behind `stop_gradient`, and each MLP output (the transcoders' output hook)
replaced by

    stop_gradient(mlp_out) + skip(x) - stop_gradient(skip(x)) + source injection,

x being the transcoder input at its hook. The forward value is the original model's, bit for bit, while the
Jacobian from the additive source sites (the embedding, every MLP output) to every transcoder input and to the
final normalised residual is linear: attention acts through OV with fixed patterns, norms are fixed linear
maps and an MLP passes only its transcoder's linear skip.

    ts = transcoder_set(transcoders, model.cfg)
    resid0 = embedding(model.params, model.cfg, tokens)
    out = frozen_forward(model.params, model.cfg, ts, resid0, zero_sources(model.cfg, n_pos))
    out.logits, out.inputs, out.mlp_out        # [1 pos d_vocab], [layer pos d_model] x2

Attribution rows differentiate it with the clean run's frozen activations (`out.frozen`) patched in as
constants, so the forward's own values are dead code in the vector-Jacobian product, and with sources for only
the lowest layers (the rows of a feature at layer l need blocks [0, l] only): the truncated forward.

It is the block runner (`jaxlens.model.runner.run_blocks_carried`) with interventions: the transcoder input is
carried from its hook to `hook_mlp_out` of the same block (the skip term), so there is no other layer loop.

Transcoder input hooks are jaxlens's (TransformerLens's) block hooks: `hook_resid_mid`, `hook_mlp_in`,
`hook_resid_pre`, `ln2.hook_normalized` (before ln2's weights, as in TransformerLens), and circuit-tracer's
`mlp.hook_in`, the MLP's input after ln2's weights (and bias), which jaxlens has no hook for: it is read at
`ln2.hook_normalized` and the weights applied. The output hook is `hook_mlp_out` (`mlp.hook_out`, the same
point in blocks without post-norms).
"""

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.dictionaries.base import DictionaryConfig
from jaxlens.dictionaries.transcoder import CrossLayerTranscoder, Transcoder, activate
from jaxlens.errors import InputError
from jaxlens.interventions import HookPoint, Patch
from jaxlens.model import runner
from jaxlens.model.attention import Context
from jaxlens.model.forward import run, unembed
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm

# einsum letters: l=layer (source) o=layer (target) p=pos i=d_in f=d_sae d=d_model

#: Block hooks a transcoder may read (`mlp.hook_in`: circuit-tracer's MLP input, after ln2's weights).
INPUT_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized", "mlp.hook_in")
#: Block hooks a transcoder may write.
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
_NAME = re.compile(r"^blocks\.(\d+|\{layer\})\.(.+)$")


class TranscoderError(InputError):
    """A transcoder set that does not fit the model (hooks, widths, layers)."""


@dataclasses.dataclass(frozen=True)
class TranscoderSet:
    """A per-layer transcoder set or a cross-layer transcoder as stacked arrays (a pytree; `kind`, hooks and
    the dictionary config are static).

    Attributes:
        W_enc: [layer d_model d_sae]; b_enc, threshold (None unless JumpReLU): [layer d_sae].
        W_dec: [layer d_sae d_model] (kind "plt") or [layer(source) d_sae layer(target) d_model] ("clt",
            zero below the diagonal).
        b_dec: [layer d_model]; W_skip: [layer d_model d_model] (x @ W_skip.T) or None.
        kind: "plt" or "clt". input_hook, output_hook: relative block hook names. dcfg: the first
            transcoder's DictionaryConfig (activation, k). name: circuit-tracer's `scan`.
    """

    W_enc: Array
    b_enc: Array
    W_dec: Array
    b_dec: Array
    threshold: Array | None
    W_skip: Array | None
    kind: str = dataclasses.field(metadata=dict(static=True))
    input_hook: str = dataclasses.field(metadata=dict(static=True))
    output_hook: str = dataclasses.field(metadata=dict(static=True))
    dcfg: DictionaryConfig = dataclasses.field(metadata=dict(static=True))
    name: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[-1]


jax.tree_util.register_dataclass(TranscoderSet)


class Sources(NamedTuple):
    """Additive inputs at the source sites: the embedding [pos d_model] and every MLP output
    [layer pos d_model]."""

    embed: Array
    mlp_out: Array


class FrozenOutputs(NamedTuple):
    """What the frozen forward returns: logits [1 pos d_vocab], the transcoder inputs [layer pos d_model], the
    MLP outputs at the output hook [layer pos d_model], the final normalised residual [pos d_model] (the
    unembedding's input), and (with keep_frozen) the frozen activations, every attention pattern and norm
    scale: {relative block name: [layer 1 ...], "ln_final.hook_scale": [1 pos 1]}. `layer` counts the layers
    run; logits and final are None when that is fewer than n_layers."""

    logits: Array | None
    inputs: Array
    mlp_out: Array
    final: Array | None
    frozen: dict[str, Array]


def transcoder_set(transcoders: Any, cfg: Config) -> TranscoderSet:
    """{layer: Transcoder}, a CrossLayerTranscoder, or a circuit-tracer path, checked against `cfg`.

    Raises:
        TranscoderError: a hook the model lacks or that is not an MLP's input / output, hooks that differ
            between layers, a missing or extra layer, widths that are not d_model, mixed activations or
            widths, a model with a mixture-of-experts MLP, or `mlp.hook_in` on a model whose norm weights
            were folded.
    """
    if isinstance(transcoders, (str, Path)):
        from jaxlens.dictionaries import load_circuit_tracer

        ts = transcoder_set(load_circuit_tracer(transcoders), cfg)
        return dataclasses.replace(ts, name=Path(transcoders).name)
    if cfg.num_experts:
        raise TranscoderError("Attribution graphs replace dense MLPs; this model has a mixture of experts, "
                              f"num_experts={cfg.num_experts}, whose routing is not a transcoder's.")
    if isinstance(transcoders, CrossLayerTranscoder):
        return _clt_set(transcoders, cfg)
    if isinstance(transcoders, Mapping) and transcoders and all(
            isinstance(t, Transcoder) for t in transcoders.values()):
        return _plt_set(transcoders, cfg)
    raise TranscoderError(
        "transcoders must be {layer: Transcoder} (one per layer), a CrossLayerTranscoder, or a path that "
        f"jaxlens.dictionaries.load_circuit_tracer reads; found {type(transcoders).__name__}.")


def embedding(params, cfg: Config, tokens: Int[Array, "1 pos"]) -> Float[Array, "1 pos d_model"]:
    """The residual stream entering block 0 (token and positional embeddings)."""
    return run(params, cfg, tokens, stop_at_layer=0)[0]


def zero_sources(cfg: Config, n_pos: int) -> Sources:
    """Sources of zeros (the clean run)."""
    return Sources(jnp.zeros((n_pos, cfg.d_model), jnp.float32),
                   jnp.zeros((cfg.n_layers, n_pos, cfg.d_model), jnp.float32))


def frozen_forward(params, cfg: Config, ts: TranscoderSet, resid0: Float[Array, "1 pos d_model"],
                   sources: Sources, frozen: Mapping[str, Array] | None = None,
                   keep_frozen: bool = False) -> FrozenOutputs:
    """The replacement model's forward with `sources` added (see the module docstring).

    Args:
        params, cfg: the model.
        ts: the transcoder set (`transcoder_set`).
        resid0: the residual stream entering block 0 (`embedding`).
        sources: additive inputs at hook_embed (the same as adding to resid0) and at the MLP outputs of the
            layers to run: `sources.mlp_out` [n_run pos d_model] runs blocks [0, n_run) (every layer: the
            logits too).
        frozen: None, or a clean run's `FrozenOutputs.frozen` (at least n_run layers): the patterns and norm
            scales are then those constants (Patch) rather than this run's activations behind stop_gradient:
            the same values and Jacobian at the clean run, but a vector-Jacobian product that needs none of
            the forward's values.
        keep_frozen: return the frozen activations (`FrozenOutputs.frozen`; else {}: recording them changes
            the compiled program, whose values then differ from the model's forward in the last bit).
    """
    n_run, n_pos = sources.mlp_out.shape[0], resid0.shape[1]
    scale, shift = (a[:n_run] for a in _input_transform(params, cfg, ts))
    read_at = "ln2.hook_normalized" if ts.input_hook == "mlp.hook_in" else ts.input_hook
    names = ["attn.hook_pattern", *_norm_scales(cfg)]
    stacked = {name: [StopGradient() if frozen is None else Patch(frozen[name][:n_run])] for name in names}
    W_skip = ts.W_skip[:n_run] if ts.W_skip is not None else jnp.zeros((n_run, 0, 0), jnp.float32)
    stacked[read_at] = stacked.get(read_at, []) + [ReadInput(scale, shift)]
    out_at = "hook_mlp_out"
    stacked[out_at] = stacked.get(out_at, []) + [ReplaceMLP(W_skip, sources.mlp_out[:, None])]
    ivs = runner.BlockInterventions(stacked, {})
    ctx = Context(positions=jnp.arange(n_pos)[None], key_valid=None, offset=0)
    resid = resid0 + sources.embed[None].astype(resid0.dtype)
    carry = jnp.zeros((1, n_pos, cfg.d_model), jnp.float32)
    resid, rec, _, _ = runner.run_blocks_carried(params["blocks"], cfg, resid, ctx, ivs, start=0, stop=n_run,
                                                 cache=frozenset({read_at, out_at, *names * keep_frozen}),
                                                 carry=carry)
    inputs = _mlp_input(rec[read_at][:, 0], scale[:, None], shift[:, None])
    kept = {name: rec[name] for name in names * keep_frozen}
    if n_run < cfg.n_layers:
        return FrozenOutputs(None, inputs, rec[out_at][:, 0], None, kept)
    top_scale = "ln_final.hook_scale"
    top = Hooks(here={top_scale: [StopGradient() if frozen is None or top_scale not in frozen
                                  else Patch(frozen[top_scale])]},
                names_to_cache=frozenset({top_scale} if keep_frozen else ()))
    final = norm(params.get("ln_final", {}), resid, cfg, top, "ln_final")
    logits = unembed(params, cfg, final)
    return FrozenOutputs(logits, inputs, rec[out_at][:, 0], final[0], {**kept, **top.cache})


def encode(ts: TranscoderSet, x: Float[Array, "layer pos d_model"]) -> Float[Array, "layer pos d_sae"]:
    """Every layer's feature activations from its transcoder input."""
    h = jnp.einsum("lpi,lif->lpf", x, ts.W_enc) + ts.b_enc[:, None]
    thr = None if ts.threshold is None else ts.threshold[:, None]
    return activate(ts.dcfg, h, thr)


def reconstruct(ts: TranscoderSet, acts: Float[Array, "layer pos d_sae"],
                x: Float[Array, "layer pos d_model"]) -> Float[Array, "layer pos d_model"]:
    """The transcoders' outputs: decoded features (a CLT's from every layer at or below), b_dec and skip."""
    if ts.kind == "clt":
        out = jnp.einsum("lpf,lfod->opd", acts, _clt_decoder(ts))
    else:
        out = jnp.einsum("lpf,lfd->lpd", acts, ts.W_dec)
    out = out + ts.b_dec[:, None]
    if ts.W_skip is not None:
        out = out + jnp.einsum("lpi,ldi->lpd", x, ts.W_skip)
    return out


# -- interventions of the frozen forward ---------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopGradient:
    """The activation as it is, with no gradient through it (a frozen pattern or norm scale)."""

    is_intervention: ClassVar[bool] = True

    def __call__(self, x: Array, hook: HookPoint) -> Array:
        return jax.lax.stop_gradient(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReadInput:
    """Carry the transcoder input (x * scale + shift: circuit-tracer's `mlp.hook_in`, else x) to the block's
    MLP output; the activation is unchanged."""

    scale: Array
    shift: Array
    is_intervention: ClassVar[bool] = True
    uses_carry: ClassVar[bool] = True

    def __call__(self, x: Array, hook: HookPoint, carry: Array) -> tuple[Array, Array]:
        return x, _mlp_input(x, self.scale, self.shift).astype(carry.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReplaceMLP:
    """stop_gradient(x) + skip(input) - stop_gradient(skip(input)) + delta: the MLP output's value, with only
    the transcoder's linear skip as its gradient path (W_skip [d_model d_in], or [0 0] for none)."""

    W_skip: Array
    delta: Array
    is_intervention: ClassVar[bool] = True
    uses_carry: ClassVar[bool] = True

    def __call__(self, x: Array, hook: HookPoint, carry: Array) -> tuple[Array, Array]:
        y = jax.lax.stop_gradient(x)
        if self.W_skip.size:
            skip = jnp.einsum("bpi,di->bpd", carry, self.W_skip)
            y = y + (skip - jax.lax.stop_gradient(skip)).astype(x.dtype)
        return y + self.delta.astype(x.dtype), carry


# -- helpers -------------------------------------------------------------------------------------------------
def _mlp_input(x, scale, shift):
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _input_transform(params, cfg: Config, ts: TranscoderSet):
    """[layer d_model] scale and shift taking the activation at the read hook to the transcoder input."""
    L, D = cfg.n_layers, cfg.d_model
    ones, zeros = jnp.ones((L, D), jnp.float32), jnp.zeros((L, D), jnp.float32)
    if ts.input_hook != "mlp.hook_in" or not cfg.has_norm_weights:
        return ones, zeros
    ln2 = params["blocks"]["ln2"]
    return ln2["w"].astype(jnp.float32), ln2["b"].astype(jnp.float32) if "b" in ln2 else zeros


def _norm_scales(cfg: Config) -> list[str]:
    names = set(hook_names.decoder_table(cfg).block_axes)
    return [f"{n}.hook_scale" for n in ("ln1", "ln2", "ln1_post", "ln2_post") if f"{n}.hook_scale" in names]


def _clt_decoder(ts: TranscoderSet):
    L = ts.n_layers
    mask = (jnp.arange(L)[:, None] <= jnp.arange(L)[None, :]).astype(ts.W_dec.dtype)
    return ts.W_dec * mask[:, None, :, None]


def _split(name: str, what: str) -> tuple[str, str]:
    m = _NAME.match(name or "")
    if m is None:
        raise TranscoderError(f"A transcoder's {what} hook must be a block hook 'blocks.<layer>.<name>'; "
                              f"found {name!r}. Set DictionaryConfig.hook_name / hook_name_out.")
    return m.group(1), m.group(2)


def _check_hooks(cfg: Config, hin: str, hout: str, where: str) -> tuple[str, str]:
    """The relative (input, output) hooks, checked against the model."""
    block = set(hook_names.decoder_table(cfg).block_axes)
    ok_in = [h for h in INPUT_HOOKS if h in block or (h == "mlp.hook_in" and "hook_mlp_in" in block)]
    if hin not in ok_in:
        raise TranscoderError(
            f"{where} reads {hin!r}, which is not an MLP input of this model; a replacement-model transcoder "
            f"reads one of {', '.join(ok_in)} and writes hook_mlp_out. Check the transcoders belong to this "
            "model (and its parallel / sequential block).")
    post = cfg.use_normalization_before_and_after
    if hout not in OUTPUT_HOOKS or (hout == "mlp.hook_out" and post):
        raise TranscoderError(
            f"{where} writes {hout!r}; the replacement model replaces the MLP output at hook_mlp_out"
            + (" (mlp.hook_out, before ln2_post, is not supported on post-norm models)" if post else "")
            + ". Check the transcoders' output hook.")
    if hin == "mlp.hook_in" and cfg.normalization_type in ("LNPre", "RMSPre"):
        raise TranscoderError(
            f"{where} reads circuit-tracer's mlp.hook_in (the MLP input after ln2's weights), but this model "
            f"was loaded with fold_ln (normalization_type={cfg.normalization_type!r}), so those weights are "
            "folded into W_in and the activation does not exist. Load the model with fold_ln=False "
            "(HookedTransformer.from_pretrained_no_processing), as circuit-tracer does.")
    return hin, "hook_mlp_out"


def _check_width(cfg: Config, dcfg: DictionaryConfig, where: str) -> None:
    if dcfg.d_in != cfg.d_model or dcfg.out_width != cfg.d_model:
        raise TranscoderError(
            f"{where} reads d_in={dcfg.d_in} and writes d_out={dcfg.out_width}, but the model's d_model is "
            f"{cfg.d_model}. These transcoders belong to another model.")


def _plt_set(tcs: Mapping[int, Transcoder], cfg: Config) -> TranscoderSet:
    L = cfg.n_layers
    layers = sorted(tcs)
    if layers != list(range(L)):
        missing = sorted(set(range(L)) - set(layers))
        extra = sorted(set(layers) - set(range(L)))
        raise TranscoderError(
            f"A per-layer transcoder set needs exactly one transcoder for each of the model's {L} layers; "
            f"missing layers {missing}, unexpected layers {extra}.")
    first = tcs[0].cfg
    hooks = None
    for l in layers:
        c = tcs[l].cfg
        where = f"The transcoder for layer {l}"
        _check_width(cfg, c, where)
        (li, hin), (lo, hout) = _split(c.hook_name, "input"), _split(c.hook_name_out or "", "output")
        if li != str(l) or lo != str(l):
            raise TranscoderError(f"{where} is placed at {c.hook_name!r} -> {c.hook_name_out!r}, another "
                                  "layer. Key each transcoder by the layer it reads.")
        got = _check_hooks(cfg, hin, hout, where)
        if hooks is not None and got != hooks:
            raise TranscoderError(f"{where} reads {hin!r} and writes {hout!r}; layer 0's reads {hooks[0]!r}. "
                                  "A transcoder set reads and writes the same hooks at every layer.")
        hooks = got
        if (c.d_sae, c.activation, c.k) != (first.d_sae, first.activation, first.k):
            raise TranscoderError(
                f"{where} has d_sae={c.d_sae}, activation {c.activation!r}, k={c.k}; layer 0's has "
                f"d_sae={first.d_sae}, {first.activation!r}, k={first.k}. Use one width and activation.")
    stack = lambda attr: jnp.stack([jnp.asarray(getattr(tcs[l], attr)[...], jnp.float32) for l in layers])
    has_skip = [hasattr(tcs[l], "W_skip") for l in layers]
    W_skip = None
    if any(has_skip):
        W_skip = jnp.stack([jnp.asarray(tcs[l].W_skip[...], jnp.float32) if s
                            else jnp.zeros((cfg.d_model, cfg.d_model), jnp.float32)
                            for l, s in zip(layers, has_skip, strict=True)])
    thr = stack("threshold") if first.activation == "jumprelu" else None
    return TranscoderSet(stack("W_enc"), stack("b_enc"), stack("W_dec"), stack("b_dec"), thr, W_skip,
                         kind="plt", input_hook=hooks[0], output_hook=hooks[1], dcfg=first)


def _clt_set(clt: CrossLayerTranscoder, cfg: Config) -> TranscoderSet:
    c = clt.cfg
    where = "The cross-layer transcoder"
    if c.n_layers != cfg.n_layers:
        raise TranscoderError(f"{where} covers n_layers={c.n_layers}; the model has {cfg.n_layers} layers.")
    _check_width(cfg, c, where)
    (_, hin), (_, hout) = _split(c.hook_name, "input"), _split(c.hook_name_out or "", "output")
    hin, hout = _check_hooks(cfg, hin, hout, where)
    f32 = lambda a: jnp.asarray(a[...], jnp.float32)
    thr = f32(clt.threshold) if c.activation == "jumprelu" else None
    return TranscoderSet(f32(clt.W_enc), f32(clt.b_enc), f32(clt.W_dec), f32(clt.b_dec), thr, None,
                         kind="clt", input_hook=hin, output_hook=hout, dcfg=c)


def numpy_decoder_rows(ts: TranscoderSet, active: np.ndarray, values: np.ndarray):
    """Decoder rows a_s W_dec_s of the active features [n_active 3] (layer, pos, feature): (vectors
    [n_rows d_model], output layer [n_rows], position [n_rows], source index [n_rows]); a CLT feature has one
    row per layer it writes (its own and every later one)."""
    l, p, f = active[:, 0], active[:, 1], active[:, 2]
    W = np.asarray(ts.W_dec)
    if ts.kind == "plt":
        return W[l, f] * values[:, None], l, p, np.arange(len(l))
    L = ts.n_layers
    src = np.concatenate([np.full(L - li, i) for i, li in enumerate(l)]).astype(np.int64) if len(l) else \
        np.zeros((0,), np.int64)
    out_layer = np.concatenate([np.arange(li, L) for li in l]).astype(np.int64) if len(l) else src
    vecs = W[l[src], f[src], out_layer] * values[src, None]
    return vecs, out_layer, p[src], src
