"""Sparse autoencoders as Flax NNX modules: standard ReLU (L1 weighted by decoder norms), TopK (with AuxK),
BatchTopK (saved as JumpReLU) and JumpReLU (straight-through threshold; step or tanh sparsity), following
SAELens 6.x (`saes/standard_sae.py`, `topk_sae.py`, `batchtopk_sae.py`, `jumprelu_sae.py`; Bricken et al.
2023, Gao et al. 2024, Bussmann et al. 2024, Rajamanoharan et al. 2024). Shapes: W_enc [d_in d_sae], W_dec
[d_sae d_in], b_enc [d_sae], b_dec [d_in]; the contract is in `base.py`.

    sae = init_dictionary(DictionaryConfig(architecture="jumprelu", d_in=64, d_sae=256), jax.random.key(0))
    acts = sae.encode(x)                      # x [... 64] -> [... 256]
    loss, aux = sae.training_loss(x, coefficients={"sparsity": 5e-3})

Encoding: x~ = x - b_dec (if apply_b_dec_to_input), h = x~ W_enc + b_enc, then
standard relu(h); topk: the k largest of h (times the decoder norms with rescale_acts_by_decoder_norm) ReLU'd;
jumprelu relu(h) * 1[h > threshold]; batchtopk (inference, as saved) the JumpReLU of its running threshold.
Decoding: acts W_dec + b_dec (topk with rescale divides acts by the decoder norms first).
"""

import functools
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
    mean_l0,
    mse,
    register,
    topk_acts,
)
from jaxlens.shapes import AnyArray


# -- JumpReLU's straight-through estimators (SAELens `JumpReLU`, `Step`) -------------------------------------
def _rect(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(g, shape):
    return g.reshape((-1,) + shape).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def jumprelu(h: jax.Array, threshold: jax.Array, bandwidth: float, ste_to_input: bool = False) -> jax.Array:
    """h * 1[h > threshold]; d/dh = 1[h > threshold], d/dthreshold = -(threshold / bandwidth) rect((h -
    threshold) / bandwidth) (also added to d/dh with ste_to_input)."""
    return h * (h > threshold).astype(h.dtype)


def _jumprelu_fwd(h, threshold, bandwidth, ste_to_input):
    return jumprelu(h, threshold, bandwidth, ste_to_input), (h, threshold)


def _jumprelu_bwd(bandwidth, ste_to_input, res, g):
    h, threshold = res
    ste = (threshold / bandwidth) * _rect((h - threshold) / bandwidth) * g
    dh = (h > threshold).astype(h.dtype) * g + (ste if ste_to_input else 0.0)
    return dh, _sum_to(-ste, threshold.shape).astype(threshold.dtype)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def step(h: jax.Array, threshold: jax.Array, bandwidth: float, ste_to_input: bool = False) -> jax.Array:
    """1[h > threshold]; d/dthreshold = -(1 / bandwidth) rect((h - threshold) / bandwidth), d/dh = 0 (its
    negation with ste_to_input)."""
    return (h > threshold).astype(h.dtype)


def _step_fwd(h, threshold, bandwidth, ste_to_input):
    return step(h, threshold, bandwidth, ste_to_input), (h, threshold)


def _step_bwd(bandwidth, ste_to_input, res, g):
    h, threshold = res
    ste = (1.0 / bandwidth) * _rect((h - threshold) / bandwidth) * g
    dh = ste if ste_to_input else jnp.zeros_like(h)
    return dh, _sum_to(-ste, threshold.shape).astype(threshold.dtype)


step.defvjp(_step_fwd, _step_bwd)


# -- the modules --------------------------------------------------------------------------------------------
class SAE(Dictionary):
    """Shared parameters and pre-activations of the SAE architectures."""

    def __init__(self, cfg: DictionaryConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.jnp_dtype
        W_dec = init_decoder(rngs.params(), cfg.d_sae, cfg.d_in, cfg.decoder_init_norm, dt)
        self.W_dec = nnx.Param(W_dec)
        self.W_enc = nnx.Param(W_dec.T)
        self.b_enc = nnx.Param(jnp.zeros((cfg.d_sae,), dt))
        self.b_dec = nnx.Param(jnp.zeros((cfg.d_in,), dt))

    def hidden_pre(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        """h = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc (before any decoder-norm rescaling)."""
        x = self.check_input(x)
        if self.cfg.b_dec_to_input:
            x = x - self.b_dec[...]
        return x @ self.W_enc[...] + self.b_enc[...]

    def decode(self, acts: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        return acts @ self.W_dec[...] + self.b_dec[...]

    def _target(self, x, target):
        return self.check_input(x) if target is None else self.check_input(target)


@register
class StandardSAE(SAE):
    """ReLU SAE; training loss MSE + l1 * mean_tokens ||acts * ||W_dec rows|| ||_p (p = lp_norm)."""

    architectures = ("standard",)

    def encode(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        return jax.nn.relu(self.hidden_pre(x))

    def training_loss(self, x, target=None, *, coefficients: Mapping[str, Any] | None = None, dead_mask=None):
        acts = self.encode(x)
        recon = self.decode(acts)
        weighted = acts * self.decoder_norms()
        p = self.cfg.lp_norm
        sparsity = jnp.abs(weighted).sum(-1) if p == 1 else jnp.linalg.norm(weighted, ord=p, axis=-1)
        terms = {
            "mse": mse(recon, self._target(x, target)),
            "l1": coefficient(coefficients, "l1") * sparsity.mean(),
        }
        return _total(terms, acts)


@register
class TopKSAE(SAE):
    """TopK SAE: k active features per token; training loss MSE + AuxK (with `dead_mask`)."""

    architectures = ("topk",)

    def scaled_pre(self, x):
        h = self.hidden_pre(x)
        return h * self.decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else h

    def encode(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        return topk_acts(self.scaled_pre(x), self.cfg.k)

    def decode(self, acts: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.decoder_norms()
        return acts @ self.W_dec[...] + self.b_dec[...]

    def _activate_train(self, h):
        return topk_acts(h, self.cfg.k), {}

    def fold_W_dec_norm(self) -> "TopKSAE":
        """Fold the decoder row norms n into the encoder (SAELens 6 `_fold_norm_topk`, done when it saves a
        TopK SAE trained with `rescale_acts_by_decoder_norm`): W_enc[:, i] *= n_i, b_enc *= n_i,
        W_dec[i] /= n_i. The outputs are unchanged and the decoder rows have unit norm. In place; returned.

        Raises:
            DictionaryError: the SAE does not rescale by decoder norms (folding would change the top-k
                choice).
        """
        if not self.cfg.rescale_acts_by_decoder_norm:
            raise DictionaryError("Folding the decoder norms into a TopK SAE changes which features win "
                                  "unless it rescales by them (rescale_acts_by_decoder_norm=False here); "
                                  "SAELens refuses it too.")
        n = self.decoder_norms()
        self.W_enc[...] = self.W_enc[...] * n
        self.b_enc[...] = self.b_enc[...] * n
        self.W_dec[...] = self.W_dec[...] / n[:, None]
        return self

    def training_loss(self, x, target=None, *, coefficients: Mapping[str, Any] | None = None, dead_mask=None):
        h = self.scaled_pre(x)
        acts, extra = self._activate_train(h)
        recon = self.decode(acts)
        y = self._target(x, target)
        aux = auxk_loss(y, recon, h, self.W_dec[...], dead_mask, self.cfg.rescale_acts_by_decoder_norm)
        terms = {"mse": mse(recon, y), "auxk": coefficient(coefficients, "auxk") * aux}
        return _total(terms, acts, extra)


@register
class BatchTopKSAE(TopKSAE):
    """BatchTopK: in training, the k * n_tokens largest ReLU'd activations over the whole batch (every leading
    axis) survive, and a running threshold follows the smallest surviving activation
    (thr <- (1 - topk_threshold_lr) thr + topk_threshold_lr min, returned as aux['topk_threshold']; write it
    back with `apply_updates`). `encode` is the inference form SAELens saves: JumpReLU at that threshold."""

    architectures = ("batchtopk",)

    def __init__(self, cfg: DictionaryConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.topk_threshold = nnx.BatchStat(jnp.zeros((), jnp.float32))

    def encode(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        h = self.scaled_pre(x)
        return jax.nn.relu(h) * (h > self.topk_threshold[...].astype(h.dtype)).astype(h.dtype)

    def encode_batch(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        """The training activation: batch top-k over every vector of x together."""
        return batch_topk(self.scaled_pre(x), self.cfg.k)

    def _activate_train(self, h):
        acts = batch_topk(h, self.cfg.k)
        return acts, {"topk_threshold": running_threshold(acts, self.topk_threshold[...], self.cfg)}


@register
class JumpReLUSAE(SAE):
    """JumpReLU SAE: relu(h) * 1[h > threshold]. Training (SAELens): threshold clamped at 0 (straight
    through), straight-through gradients with `jumprelu_bandwidth`; sparsity 'step' (sum of Step(h), DeepMind)
    or 'tanh' (sum tanh(c * acts * ||W_dec||), Anthropic), weighted by coefficients['sparsity'] (SAELens's
    l0_coefficient); 'pre_act' (Anthropic's, on dead features) weighted by coefficients['pre_act']
    (default 0).
    """

    architectures = ("jumprelu",)

    def __init__(self, cfg: DictionaryConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.threshold = nnx.Param(jnp.full((cfg.d_sae,), cfg.jumprelu_init_threshold, jnp.float32))

    def encode(self, x: Float[AnyArray, "..."]) -> Float[AnyArray, "..."]:
        h = self.hidden_pre(x)
        return jax.nn.relu(h) * (h > self.threshold[...].astype(h.dtype)).astype(h.dtype)

    def training_loss(self, x, target=None, *, coefficients: Mapping[str, Any] | None = None, dead_mask=None):
        h = self.hidden_pre(x)
        acts, terms = jumprelu_terms(
            self.cfg, h, self.threshold[...], self.decoder_norms(), coefficients, dead_mask
        )
        recon = self.decode(acts)
        return _total({"mse": mse(recon, self._target(x, target)), **terms}, acts)


# -- shared by SAEs and transcoders --------------------------------------------------------------------------
def batch_topk(h: jax.Array, k: int | float) -> jax.Array:
    """SAELens's BatchTopK: ReLU, then keep the int(k * n_vectors) largest values over all of h."""
    acts = jax.nn.relu(h)
    flat = acts.reshape(-1)
    n = int(k * (flat.shape[0] // h.shape[-1]))
    vals, idx = jax.lax.top_k(flat, n)
    return jnp.zeros_like(flat).at[idx].set(vals).reshape(h.shape)


def running_threshold(acts: jax.Array, old: jax.Array, cfg: DictionaryConfig) -> jax.Array:
    """BatchTopK's running threshold after one batch: (1 - lr) old + lr * the smallest surviving activation
    (lr = `cfg.topk_threshold_lr`; unchanged when nothing fired), gradient stopped."""
    pos = acts > 0
    smallest = jnp.min(jnp.where(pos, acts, jnp.inf)).astype(jnp.float32)
    lr = cfg.topk_threshold_lr
    new = jnp.where(pos.any(), (1 - lr) * old + lr * smallest, old)
    return jax.lax.stop_gradient(new)


def jumprelu_terms(cfg: DictionaryConfig, h, threshold, norms, coefficients, dead_mask):
    """JumpReLU training activations and their loss terms ('sparsity', 'pre_act'); see `JumpReLUSAE`."""
    thr = threshold + jax.lax.stop_gradient(
        jnp.maximum(threshold, 0.0) - threshold
    )  # clamp, straight through
    thr = thr.astype(h.dtype)
    bw, to_input = cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input
    acts = jumprelu(h, thr, bw, to_input)
    if cfg.jumprelu_sparsity_loss_mode == "step":
        per_item = step(h, thr, bw, to_input).sum(-1)
    else:
        per_item = jnp.tanh(cfg.jumprelu_tanh_scale * acts * norms).sum(-1)
    terms = {"sparsity": (coefficient(coefficients, "sparsity") * per_item).mean()}
    if dead_mask is not None:
        pre = (jax.nn.relu(thr - h) * dead_mask.astype(h.dtype) * norms).sum(-1).mean()
        terms["pre_act"] = coefficient(coefficients, "pre_act") * pre
    return acts, terms


def init_decoder(key, d_sae: int, d_out: int, norm: float, dtype) -> jax.Array:
    """SAELens's decoder init: kaiming-uniform rows rescaled to `norm`."""
    bound = (6.0 / d_out) ** 0.5
    W = jax.random.uniform(key, (d_sae, d_out), jnp.float32, -bound, bound)
    W = W / jnp.linalg.norm(W, axis=-1, keepdims=True) * norm
    return W.astype(dtype)


def _total(terms: dict, acts, extra: dict | None = None):
    loss = sum(terms.values())
    aux = {**terms, "l0": mean_l0(acts), "acts": acts, **(extra or {})}
    return loss, aux
