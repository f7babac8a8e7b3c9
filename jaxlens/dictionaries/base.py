"""Dictionaries (sparse autoencoders and transcoders): the shared config, the module contract and the
helpers a trainer needs. Formulas follow SAELens 6.x (sae-lens 6.54.12, `saes/*.py`); see
../shared/RESEARCH.md 2.2-2.3.

    cfg = DictionaryConfig(architecture="topk", d_in=576, d_sae=4608, k=32,
                           hook_name="blocks.15.hook_resid_post")
    sae = init_dictionary(cfg, jax.random.key(0))
    graphdef, state = nnx.split(sae)                       # params (nnx.Param) + buffers (nnx.BatchStat)
    loss, aux = nnx.merge(graphdef, state).training_loss(x, coefficients={"auxk": 1.0}, dead_mask=dead)

The contract every architecture keeps (`Dictionary` subclasses, Flax NNX modules):

- `encode(x) -> acts`, `decode(acts) -> recon`, `__call__(x) -> recon`, on any leading shape: x is
  `[... d_in]` (a cross-layer transcoder reads `[... n_layers d_in]`), acts `[... d_sae]`, recon
  `[... d_out]`. `decode` is the decoder alone; `__call__` adds what is not a function of the features
  (a skip transcoder's `x @ W_skip.T`).
- `training_loss(x, target=None, *, coefficients=None, dead_mask=None) -> (loss, aux)`: target defaults to
  x (a transcoder's target is the activation at `hook_name_out`). `coefficients` maps loss-term names to
  weights (floats or traced arrays, so a trainer can warm them up); a term missing from it has SAELens's
  default (`DEFAULT_COEFFICIENTS`). `dead_mask` [d_sae] (True: a dead feature) feeds AuxK and the
  pre-activation loss. aux holds 'mse' (sum over d_out, mean over tokens, SAELens's), 'l0' (mean number of
  active features per token), 'acts' (feature activations, for dead-feature tracking), every loss term of
  the architecture ('l1', 'auxk', 'sparsity', 'pre_act') and, for BatchTopK, 'topk_threshold' (the updated
  running threshold: write it back with `apply_updates`). It is a pure function of the module's state.
- Parameters are `nnx.Param`s; running statistics (BatchTopK's threshold) are `nnx.BatchStat`s, so
  `nnx.split(module, nnx.Param, ...)` separates what the optimiser updates.

Helpers: `init_dictionary(cfg, key)`, `normalise_decoder(module_or_state)` (unit-norm decoder rows for the
architectures whose training wants it, `DECODER_NORMALISED`), `fold_scaling(module, scale, scale_out=None)`
(inputs scaled by `scale` during training, targets by `scale_out`, folded into the weights so the result
reads raw activations), `apply_updates(module, aux)`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlens.errors import JaxlensError
from jaxlens.shapes import AnyArray

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu", "transcoder", "skip_transcoder", "clt"]
ARCHITECTURES: tuple[str, ...] = (
    "standard",
    "topk",
    "batchtopk",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "clt",
)
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
#: SAELens's default weights of each loss term (l1_coefficient, l0_coefficient, aux_loss_coefficient).
DEFAULT_COEFFICIENTS = {"l1": 1.0, "sparsity": 1.0, "auxk": 1.0, "pre_act": 0.0}
#: Architectures whose training keeps unit-norm decoder rows (their loss is not weighted by decoder norms).
DECODER_NORMALISED = frozenset({"topk", "batchtopk"})


class DictionaryError(JaxlensError, ValueError):
    """A dictionary config, file or input that does not fit."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DictionaryConfig:
    """Architecture and placement of one dictionary. Frozen and hashable (static under jit).

    Attributes:
        architecture: one of `ARCHITECTURES`.
        d_in, d_sae: input width and number of features; d_out: output width (transcoders; default d_in).
        k: active features per token (topk, batchtopk, and activation "topk").
        activation: transcoders and CLTs: "relu", "jumprelu" or "topk" (per-layer transcoders also
            "batchtopk": trained as BatchTopK, saved as JumpReLU at its threshold; SAEs: implied by the
            architecture).
        hook_name: the hook the dictionary reads (TransformerLens name); hook_name_out: the hook a transcoder
            writes. A CLT's names hold "{layer}" (e.g. "blocks.{layer}.ln2.hook_normalized").
        n_layers: a CLT's number of layers.
        dtype: parameter dtype name.
        apply_b_dec_to_input: subtract b_dec from the input before encoding (SAEs; False for transcoders).
        rescale_acts_by_decoder_norm: topk: pre-activations times the decoder row norms (decode divides).
        reshape_activations: "hook_z" flattens [... n_heads d_head] inputs.
        jumprelu_bandwidth, jumprelu_init_threshold, jumprelu_sparsity_loss_mode, jumprelu_tanh_scale,
            jumprelu_ste_to_input: JumpReLU training (SAELens's names and defaults).
        lp_norm: the standard SAE's sparsity norm (1: L1).
        topk_threshold_lr: BatchTopK's running-threshold rate.
        decoder_init_norm: initial decoder row norm.
        metadata: free-form (model name, hook head index, ...), kept through save and load; a tuple of pairs.
    """

    architecture: str  # one of ARCHITECTURES (a str, so a bad value meets the error below, not a type check)
    d_in: int
    d_sae: int
    d_out: int | None = None
    k: int | float | None = None
    activation: str = "relu"
    hook_name: str = ""
    hook_name_out: str | None = None
    n_layers: int | None = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool | None = None
    rescale_acts_by_decoder_norm: bool = False
    reshape_activations: str = "none"
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    jumprelu_sparsity_loss_mode: str = "step"
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False
    lp_norm: float = 1.0
    topk_threshold_lr: float = 0.01
    decoder_init_norm: float = 0.1
    metadata: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise DictionaryError(
                f"Unknown dictionary architecture {self.architecture!r}; known: {', '.join(ARCHITECTURES)}."
            )
        if self.activation not in ACTIVATIONS:
            raise DictionaryError(f"Unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}.")
        for name, allowed in (
            ("reshape_activations", ("none", "hook_z")),
            ("jumprelu_sparsity_loss_mode", ("step", "tanh")),
        ):
            if getattr(self, name) not in allowed:
                raise DictionaryError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        for name in ("d_in", "d_sae"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DictionaryError(f"{name} must be a positive int; found {getattr(self, name)!r}.")
        if self.uses_topk and (self.k is None or not 0 < self.k <= self.d_sae):
            raise DictionaryError(
                f"Architecture {self.architecture!r} (activation {self.activation!r}) "
                f"needs "
                f"k in [1, d_sae={self.d_sae}]; found k={self.k!r}."
            )
        if self.architecture == "clt" and self.activation == "batchtopk":
            raise DictionaryError("A cross-layer transcoder has no batchtopk activation; use relu, jumprelu "
                                  "or topk, or per-layer transcoders.")
        if self.architecture == "clt" and (self.n_layers is None or self.n_layers <= 0):
            raise DictionaryError(f"A cross-layer transcoder needs n_layers > 0; found {self.n_layers!r}.")
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise DictionaryError(
                "Transcoders read one hook and write another: apply_b_dec_to_input must be "
                "False (b_dec lives in the output space)."
            )
        if self.d_out is not None and self.d_out != self.d_in and not self.is_transcoder:
            raise DictionaryError(
                f"An SAE reconstructs its input: d_out={self.d_out} must equal "
                f"d_in={self.d_in} "
                "(use a transcoder architecture to write another width)."
            )

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in ("transcoder", "skip_transcoder", "clt")

    @property
    def out_width(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    @property
    def b_dec_to_input(self) -> bool:
        return not self.is_transcoder if self.apply_b_dec_to_input is None else self.apply_b_dec_to_input

    @property
    def act(self) -> str:
        """The activation function the encoder uses."""
        if self.is_transcoder:
            return self.activation
        return {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}[
            self.architecture
        ]

    @property
    def uses_topk(self) -> bool:
        return self.architecture in ("topk", "batchtopk") or (
            self.is_transcoder and self.activation in ("topk", "batchtopk")
        )

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


class Dictionary(nnx.Module):
    """Base of every architecture; see the module docstring for the contract."""

    architectures: ClassVar[tuple[str, ...]] = ()
    cfg: DictionaryConfig

    def encode(self, x: AnyArray) -> jax.Array:
        raise NotImplementedError

    def decode(self, acts: AnyArray) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: AnyArray) -> jax.Array:
        return self.decode(self.encode(x))

    def training_loss(
        self,
        x: AnyArray,
        target: AnyArray | None = None,
        *,
        coefficients: Mapping[str, Any] | None = None,
        dead_mask: AnyArray | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def decoder_norms(self) -> jax.Array:
        """Norm of each feature's decoder direction [d_sae] (a CLT: over every layer it writes)."""
        return jnp.linalg.norm(self.W_dec[...], axis=-1)

    def check_input(self, x: AnyArray, width: int | None = None) -> jax.Array:
        """x as the config dtype, its last axis checked (hook_z inputs flattened)."""
        width = self.cfg.d_in if width is None else width
        x = jnp.asarray(x)
        if self.cfg.reshape_activations == "hook_z" and x.ndim >= 2 and x.shape[-1] != width:
            x = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
        if x.ndim == 0 or x.shape[-1] != width:
            raise DictionaryError(
                f"The {self.cfg.architecture} dictionary at {self.cfg.hook_name or '?'!r} "
                f"reads "
                f"vectors of width d_in={width}; found an input of shape {x.shape}. "
                "Check the hook the dictionary was trained on."
            )
        return x.astype(self.cfg.jnp_dtype)


REGISTRY: dict[str, type[Dictionary]] = {}


def register(cls: type[Dictionary]) -> type[Dictionary]:
    """Class decorator: `init_dictionary` builds `cls` for each of its `architectures`."""
    for a in cls.architectures:
        REGISTRY[a] = cls
    return cls


def init_dictionary(cfg: DictionaryConfig, key: jax.Array | nnx.Rngs | int = 0) -> Dictionary:
    """A freshly initialised dictionary of `cfg`'s architecture (SAELens's init: decoder rows of norm
    `decoder_init_norm`, encoder its transpose where the widths allow, zero biases)."""
    rngs = key if isinstance(key, nnx.Rngs) else nnx.Rngs(params=key)
    return REGISTRY[cfg.architecture](cfg, rngs=rngs)


def normalise_decoder(module_or_state, cfg: DictionaryConfig | None = None, *, force: bool = False):
    """Decoder rows rescaled to unit norm for the architectures in `DECODER_NORMALISED` (or any, with force).

    A module is updated in place and returned; a state (from `nnx.split`, possibly stacked over layers) needs
    `cfg` and comes back as a new state."""
    if isinstance(module_or_state, Dictionary):
        m = module_or_state
        if force or m.cfg.architecture in DECODER_NORMALISED:
            m.W_dec[...] = _unit_rows(m.W_dec[...])
        return m
    if cfg is None:
        raise DictionaryError("normalise_decoder on a state needs the dictionary's cfg.")
    if not (force or cfg.architecture in DECODER_NORMALISED):
        return module_or_state
    state = jax.tree_util.tree_map(lambda v: v, module_or_state)
    state["W_dec"][...] = _unit_rows(state["W_dec"][...])
    return state


def fold_scaling(module: Dictionary, scale, scale_out=None) -> Dictionary:
    """Fold an input scaling into the weights (SAELens `fold_activation_norm_scaling_factor`): the module was
    trained on `scale * x` (targets `scale_out * y`, default the same), and afterwards reads raw x and writes
    raw y. W_enc *= scale; W_dec, b_dec /= scale_out; W_skip *= scale / scale_out. Updated in place, returned.
    A CLT takes per-layer scales ([n_layers]) as well as scalars."""
    cfg = module.cfg
    s_in = jnp.asarray(scale, cfg.jnp_dtype)
    s_out = s_in if scale_out is None else jnp.asarray(scale_out, cfg.jnp_dtype)
    if not cfg.is_transcoder and scale_out is not None:
        raise DictionaryError("An SAE reconstructs its input: fold_scaling takes one scale.")
    if cfg.architecture == "clt":
        s_in = jnp.broadcast_to(s_in, (cfg.n_layers,))
        s_out = jnp.broadcast_to(s_out, (cfg.n_layers,))
        module.W_enc[...] = module.W_enc[...] * s_in[:, None, None]
        module.W_dec[...] = module.W_dec[...] / s_out[None, None, :, None]
        module.b_dec[...] = module.b_dec[...] / s_out[:, None]
        return module
    module.W_enc[...] = module.W_enc[...] * s_in
    module.W_dec[...] = module.W_dec[...] / s_out
    module.b_dec[...] = module.b_dec[...] / s_out
    if hasattr(module, "W_skip"):
        module.W_skip[...] = module.W_skip[...] * (s_in / s_out)
    if cfg.rescale_acts_by_decoder_norm and hasattr(module, "topk_threshold"):
        # the threshold is in units of pre-activation times decoder norm, and the norms shrank by s_out
        module.topk_threshold[...] = module.topk_threshold[...] / s_out.astype(jnp.float32)
    return module


def apply_updates(module: Dictionary, aux: Mapping[str, jax.Array]) -> Dictionary:
    """Write the running statistics a training step returned in `aux` (BatchTopK's 'topk_threshold') back
    into the module. In place; returned."""
    if "topk_threshold" in aux and hasattr(module, "topk_threshold"):
        module.topk_threshold[...] = aux["topk_threshold"]
    return module


# -- shared pieces of the formulas ---------------------------------------------------------------------------
def coefficient(coefficients: Mapping[str, Any] | None, name: str):
    """The weight of loss term `name` (SAELens's default where not given)."""
    if coefficients and name in coefficients:
        return coefficients[name]
    return DEFAULT_COEFFICIENTS[name]


def mse(recon: jax.Array, target: jax.Array) -> jax.Array:
    """SAELens's MSE: squared error summed over the last axis, mean over the rest."""
    return jnp.square(recon - target).sum(-1).mean()


def mean_l0(acts: jax.Array) -> jax.Array:
    """Mean number of non-zero features per token (over every leading axis)."""
    return (acts != 0).sum(-1).astype(jnp.float32).mean()


def topk_acts(h: jax.Array, k: int) -> jax.Array:
    """SAELens's TopK: keep the k largest pre-activations of each vector, ReLU them, zero the rest."""
    vals, idx = jax.lax.top_k(h, k)
    return _scatter_last(jnp.zeros_like(h), idx, jax.nn.relu(vals))


def auxk_loss(
    x: jax.Array,
    recon: jax.Array,
    h: jax.Array,
    W_dec: jax.Array,
    dead_mask: jax.Array | None,
    rescale: bool = False,
) -> jax.Array:
    """TopK's AuxK loss (Gao et al.; SAELens `calculate_topk_aux_loss`), unweighted: the top
    min(d_in // 2, n_dead) pre-activations among dead features (not ReLU'd, as SAELens) decode (W_dec, no
    bias; divided by the decoder norms with `rescale`) the detached residual x - recon; the squared error
    (summed over the width, mean over tokens) is scaled by min(n_dead / (d_in // 2), 1). Zero without dead
    features.
    """
    if dead_mask is None:
        return jnp.zeros((), jnp.float32)
    d_in, d_sae = x.shape[-1], h.shape[-1]
    k_aux = max(d_in // 2, 1)
    n_dead = dead_mask.sum()
    scale = jnp.minimum(n_dead.astype(jnp.float32) / k_aux, 1.0)
    masked = jnp.where(dead_mask, h, -jnp.inf)
    vals, idx = jax.lax.top_k(masked, min(k_aux, d_sae))
    vals = jnp.where(jnp.isfinite(vals), vals, 0.0)  # fewer dead features than k_aux
    acts = _scatter_last(jnp.zeros_like(h), idx, vals)
    if rescale:
        acts = acts / jnp.linalg.norm(W_dec, axis=-1)
    residual = jax.lax.stop_gradient(x - recon)
    err = jnp.square(acts @ W_dec - residual).sum(-1).mean()
    return jnp.where(n_dead > 0, scale * err, 0.0)


def _scatter_last(zeros: jax.Array, idx: jax.Array, vals: jax.Array) -> jax.Array:
    lead = zeros.shape[:-1]
    flat = zeros.reshape(-1, zeros.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    out = flat.at[rows, idx.reshape(-1, idx.shape[-1])].set(vals.reshape(-1, vals.shape[-1]))
    return out.reshape(lead + (zeros.shape[-1],))


def _unit_rows(W: jax.Array) -> jax.Array:
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-12)
