"""Transcoders: dictionaries that read one hook and write another (Dunefsky et al. 2024; SAELens
`saes/transcoder.py`; circuit-tracer `transcoder/*.py`), as Flax NNX modules with the contract of `base.py`.

- `Transcoder` ("transcoder", "skip_transcoder"): W_enc [d_in d_sae], b_enc [d_sae], W_dec [d_sae d_out],
  b_dec [d_out], optional threshold [d_sae] (activation "jumprelu"); a skip transcoder adds W_skip [d_out
  d_in] and `__call__(x) = decode(encode(x)) + x @ W_skip.T`. No b_dec is subtracted from the input.
- `CrossLayerTranscoder` ("clt"; Ameisen et al. 2025): one encoder per layer, and each layer's features write
  to that layer and every later one. W_enc [layer d_in d_sae], b_enc [layer d_sae], W_dec
  [layer(source) d_sae layer(target) d_out] (entries with target < source are zero and stay zero),
  b_dec [layer d_out]. It reads the stacked inputs [... layer d_in] and writes [... layer d_out].

    tc = init_dictionary(DictionaryConfig(architecture="transcoder", d_in=64, d_out=64, d_sae=256,
                                          hook_name="blocks.3.ln2.hook_normalized",
                                          hook_name_out="blocks.3.hook_mlp_out"), jax.random.key(0))
    loss, aux = tc.training_loss(mlp_in, mlp_out, coefficients={"l1": 1e-3})

Training losses as the SAE of the same activation (`sae.py`): relu -> L1 weighted by decoder norms, jumprelu
-> step/tanh sparsity, topk and batchtopk -> AuxK (per-layer transcoders only). A batchtopk transcoder trains
with BatchTopK (the k * n_tokens largest activations of the batch survive) and keeps the running threshold
`topk_threshold` (an `nnx.BatchStat`, as `BatchTopKSAE`); it encodes, and is saved, as JumpReLU at it.
A CLT feature's decoder norm is taken over every layer it writes.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Float

from jaxlens.dictionaries.base import (
    Dictionary,
    DictionaryConfig,
    DictionaryError,
    auxk_loss,
    coefficient,
    mse,
    register,
    topk_acts,
)
from jaxlens.dictionaries.sae import _total, batch_topk, init_decoder, jumprelu_terms, running_threshold
from jaxlens.shapes import AnyArray

# einsum letters: l=layer (source) o=layer (target) i=d_in f=d_sae d=d_out


@register
class Transcoder(Dictionary):
    """A per-layer transcoder (skip transcoder with architecture "skip_transcoder")."""

    architectures = ("transcoder", "skip_transcoder")

    def __init__(self, cfg: DictionaryConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.jnp_dtype
        bound = 1.0 / cfg.d_in**0.5
        self.W_enc = nnx.Param(
            jax.random.uniform(rngs.params(), (cfg.d_in, cfg.d_sae), jnp.float32, -bound, bound).astype(dt)
        )
        self.b_enc = nnx.Param(jnp.zeros((cfg.d_sae,), dt))
        self.W_dec = nnx.Param(
            init_decoder(rngs.params(), cfg.d_sae, cfg.out_width, cfg.decoder_init_norm, dt)
        )
        self.b_dec = nnx.Param(jnp.zeros((cfg.out_width,), dt))
        if cfg.activation == "jumprelu":
            self.threshold = nnx.Param(jnp.full((cfg.d_sae,), cfg.jumprelu_init_threshold, jnp.float32))
        if cfg.activation == "batchtopk":
            self.topk_threshold = nnx.BatchStat(jnp.zeros((), jnp.float32))
        if cfg.architecture == "skip_transcoder":
            self.W_skip = nnx.Param(jnp.zeros((cfg.out_width, cfg.d_in), dt))

    def hidden_pre(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        return self.check_input(x) @ self.W_enc[...] + self.b_enc[...]

    def encode(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        thr = getattr(self, "threshold", getattr(self, "topk_threshold", None))
        return activate(self.cfg, self.hidden_pre(x), thr)

    def decode(self, acts: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        return acts @ self.W_dec[...] + self.b_dec[...]

    def skip(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        """The skip connection's contribution x @ W_skip.T (zeros without one)."""
        x = self.check_input(x)
        if not hasattr(self, "W_skip"):
            return jnp.zeros(x.shape[:-1] + (self.cfg.out_width,), x.dtype)
        return x @ self.W_skip[...].T

    def __call__(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        return self.decode(self.encode(x)) + self.skip(x)

    def training_loss(self, x, target=None, *, coefficients: Mapping[str, Any] | None = None, dead_mask=None):
        y = _transcoder_target(self.cfg, x, target)
        h = self.hidden_pre(x)
        acts, terms = _training_acts(self, h, coefficients, dead_mask)
        extra = {"topk_threshold": terms.pop("topk_threshold")} if "topk_threshold" in terms else {}
        recon = self.decode(acts) + self.skip(x)
        y = self.check_input(y, self.cfg.out_width)
        if self.cfg.activation in ("topk", "batchtopk"):
            terms["auxk"] = coefficient(coefficients, "auxk") * auxk_loss(
                y, recon, h, self.W_dec[...], dead_mask
            )
        return _total({"mse": mse(recon, y), **terms}, acts, extra)


@register
class CrossLayerTranscoder(Dictionary):
    """A cross-layer transcoder over `cfg.n_layers` layers (see the module docstring)."""

    architectures = ("clt",)

    def __init__(self, cfg: DictionaryConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        L, F, dt = cfg.n_layers, cfg.d_sae, cfg.jnp_dtype
        bound = 1.0 / cfg.d_in**0.5
        self.W_enc = nnx.Param(
            jax.random.uniform(rngs.params(), (L, cfg.d_in, F), jnp.float32, -bound, bound).astype(dt)
        )
        self.b_enc = nnx.Param(jnp.zeros((L, F), dt))
        W = jax.random.uniform(rngs.params(), (L, F, L, cfg.out_width), jnp.float32, -1.0, 1.0)
        W = W * self.layer_mask()[:, None, :, None].astype(W.dtype)
        W = W / jnp.linalg.norm(W, axis=(2, 3), keepdims=True) * cfg.decoder_init_norm
        self.W_dec = nnx.Param(W.astype(dt))
        self.b_dec = nnx.Param(jnp.zeros((L, cfg.out_width), dt))
        if cfg.activation == "jumprelu":
            self.threshold = nnx.Param(jnp.full((L, F), cfg.jumprelu_init_threshold, jnp.float32))

    def layer_mask(self) -> jax.Array:
        """[source target]: True where a source layer's features write to the target (target >= source)."""
        L = self.cfg.n_layers
        return jnp.arange(L)[:, None] <= jnp.arange(L)[None, :]

    def check_layers(self, x, width):
        x = self.check_input(x, width)
        if x.ndim < 2 or x.shape[-2] != self.cfg.n_layers:
            raise DictionaryError(
                f"A cross-layer transcoder over {self.cfg.n_layers} layers reads "
                f"[... layer={self.cfg.n_layers} d_in={self.cfg.d_in}]; found shape "
                f"{x.shape}."
            )
        return x

    def hidden_pre(self, x: Float[AnyArray, "... layer d_in"]) -> Float[AnyArray, "... layer d_sae"]:
        x = self.check_layers(x, self.cfg.d_in)
        return jnp.einsum("...li,lif->...lf", x, self.W_enc[...]) + self.b_enc[...]

    def encode(self, x: Float[AnyArray, "... layer d_in"]) -> Float[AnyArray, "... layer d_sae"]:
        return activate(self.cfg, self.hidden_pre(x), getattr(self, "threshold", None))

    def decode(self, acts: Float[AnyArray, "... layer d_sae"]) -> Float[AnyArray, "... layer d_out"]:
        W = self.W_dec[...] * self.layer_mask()[:, None, :, None].astype(self.W_dec[...].dtype)
        return jnp.einsum("...lf,lfod->...od", acts, W) + self.b_dec[...]

    def decoder_norms(self) -> jax.Array:
        """[layer d_sae]: each feature's decoder norm over every layer it writes."""
        W = self.W_dec[...] * self.layer_mask()[:, None, :, None].astype(self.W_dec[...].dtype)
        return jnp.sqrt(jnp.square(W).sum((2, 3)))

    def training_loss(self, x, target=None, *, coefficients: Mapping[str, Any] | None = None, dead_mask=None):
        y = _transcoder_target(self.cfg, x, target)
        acts, terms = _training_acts(self, self.hidden_pre(x), coefficients, dead_mask)
        recon = self.decode(acts)
        y = self.check_layers(y, self.cfg.out_width)
        flat = lambda a: a.reshape(a.shape[:-2] + (-1,))
        return _total({"mse": mse(flat(recon), flat(y)), **terms}, acts)  # l0: mean per (token, layer)


# -- helpers -------------------------------------------------------------------------------------------------
def _training_acts(tc, h: jax.Array, coefficients, dead_mask) -> tuple[jax.Array, dict]:
    """A transcoder's (per-layer or cross-layer) training activations and sparsity terms: JumpReLU's
    straight-through terms, ReLU's decoder-norm-weighted L1, none for top-k
    (its AuxK needs the reconstruction)."""
    if tc.cfg.activation == "jumprelu":
        return jumprelu_terms(tc.cfg, h, tc.threshold[...], tc.decoder_norms(), coefficients, dead_mask)
    if tc.cfg.activation == "batchtopk":
        acts = batch_topk(h, tc.cfg.k)
        return acts, {"topk_threshold": running_threshold(acts, tc.topk_threshold[...], tc.cfg)}
    acts, terms = activate(tc.cfg, h, None), {}
    if tc.cfg.activation == "relu":
        terms["l1"] = coefficient(coefficients, "l1") * _weighted_l1(acts, tc.decoder_norms(), tc.cfg)
    return acts, terms


def activate(cfg: DictionaryConfig, h: jax.Array, threshold) -> jax.Array:
    """The inference activation of a transcoder: relu, relu(h) * 1[h > threshold] (jumprelu; batchtopk at
    its running threshold, as saved), or top-k."""
    if cfg.activation == "relu":
        return jax.nn.relu(h)
    if cfg.activation in ("jumprelu", "batchtopk"):
        return jax.nn.relu(h) * (h > threshold.astype(h.dtype)).astype(h.dtype)
    return topk_acts(h, cfg.k)


def _weighted_l1(acts, norms, cfg: DictionaryConfig):
    weighted = acts * norms
    p = cfg.lp_norm
    if acts.ndim >= 2 and cfg.architecture == "clt":
        weighted = weighted.reshape(weighted.shape[:-2] + (-1,))
    sparsity = jnp.abs(weighted).sum(-1) if p == 1 else jnp.linalg.norm(weighted, ord=p, axis=-1)
    return sparsity.mean()


def _transcoder_target(cfg: DictionaryConfig, x, target):
    if target is not None:
        return target
    if cfg.out_width != cfg.d_in:
        where = cfg.hook_name_out or "its output hook"
        raise DictionaryError(
            f"A transcoder writing d_out={cfg.out_width} from d_in={cfg.d_in} needs the "
            f"target: training_loss(x, target) with the activation at {where}."
        )
    return x
