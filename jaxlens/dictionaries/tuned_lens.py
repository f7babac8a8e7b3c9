"""The tuned lens: one affine translator per layer that maps the residual stream entering that layer to
what the final layer would make of it, read through the model's own final norm and unembedding (Belrose et
al. 2023, "Eliciting latent predictions from transformers with the tuned lens"; the recipe of the
tuned-lens package 0.2.0).

    lens = train_tuned_lens(params, cfg, train_tokens, steps=250)
    cmp = compare_lenses(lens, params, cfg, held_out_tokens)
    cmp.tuned_kl, cmp.logit_kl          # [layer]: KL(final || lens) in nats, per token, per layer
    save_tuned_lens(lens, "lens.safetensors", params)

Translator i reads `blocks.{i}.hook_resid_pre` (the embedding for i = 0; the tuned-lens package's
`hidden_states[i]`) and is applied residually, `h + h @ W[i] + b[i]`, with W and b starting at zero: at
initialisation the tuned lens is exactly the logit lens. Training minimises the sum over layers of the KL
divergence from the model's final distribution, all layers in one loss computed from one cached forward, with
the package's default optimiser (SGD, Nesterov momentum 0.9, learning rate 0.1 decaying linearly to 0, weight
decay 1e-3, gradients clipped to norm 1). The weights here are `[d_model_in d_model_out]` (x @ W); the
package's `params.pt` holds PyTorch's `[out in]`, transposed on reading.
"""

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from jaxlens._atomic import atomic_path
from jaxlens.config import Config
from jaxlens.errors import CheckpointError, InputError, UnsafeCheckpointError
from jaxlens.model.forward import check_tokens, final_logits, forward
from jaxlens.shapes import AnyArray, Params

# einsum letters: l=layer b=batch p=pos d=d_model e=d_model (out) v=d_vocab

FORMAT = "jaxlens.tuned_lens"


class TunedLens(nnx.Module):
    """Per-layer affine translators, the identity at first: W [layer d_model d_model], b [layer d_model]."""

    def __init__(self, n_layers: int, d_model: int):
        self.W = nnx.Param(jnp.zeros((n_layers, d_model, d_model), jnp.float32))
        self.b = nnx.Param(jnp.zeros((n_layers, d_model), jnp.float32))

    @property
    def n_layers(self) -> int:
        return self.W.shape[0]

    @property
    def d_model(self) -> int:
        return self.W.shape[1]

    def translate(self, resid: Float[AnyArray, "layer ... d_model"],
                  layers: Sequence[int] | None = None) -> Float[Array, "layer ... d_model"]:
        """h + h @ W[i] + b[i] for each layer i (`layers`, default all) of a stack of residuals."""
        W, b = _select(self.W[...], self.b[...], self.n_layers, layers)
        resid = jnp.asarray(resid)
        if resid.ndim < 2 or resid.shape[0] != W.shape[0] or resid.shape[-1] != self.d_model:
            raise InputError(f"translate takes residuals [layer ... d_model] with {W.shape[0]} layers and "
                             f"d_model={self.d_model}; found shape {resid.shape}.")
        return _translate(W, b, resid.astype(jnp.float32))

    def logits(self, params: Params, cfg: Config, resid: Float[AnyArray, "layer batch pos d_model"],
               layers: Sequence[int] | None = None) -> Float[Array, "layer batch pos d_vocab"]:
        """The lens's logits: each translated residual through the final norm and the unembedding."""
        _check_model(self, cfg)
        h = self.translate(resid, layers)
        return jax.vmap(lambda x: final_logits(params, cfg, x))(h)


@dataclasses.dataclass(frozen=True)
class LensComparison:
    """Mean KL(final || lens) per token, in nats, for each layer ([layer]): tuned lens and logit lens."""

    tuned_kl: np.ndarray
    logit_kl: np.ndarray


def recipe_optimizer(steps: int, learning_rate: float = 0.1, weight_decay: float = 1e-3,
                     clip: float = 1.0) -> optax.GradientTransformation:
    """The tuned-lens package's default optimiser: clip, weight decay, Nesterov SGD (momentum 0.9) with a
    learning rate decaying linearly from `learning_rate` to 0 over `steps`."""
    schedule = optax.linear_schedule(learning_rate, 0.0, max(steps, 1))
    return optax.chain(optax.clip_by_global_norm(clip), optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=0.9, nesterov=True))


def train_tuned_lens(params: Params, cfg: Config, tokens: AnyArray, *, steps: int = 250, batch_size: int = 8,
                     key: Array | None = None, optimizer: optax.GradientTransformation | None = None,
                     layers: Sequence[int] | None = None, lens: TunedLens | None = None,
                     layer_chunk: int = 8) -> TunedLens:
    """Train a tuned lens on token sequences.

    Each step draws `batch_size` sequences (with `key`), runs the model once caching every hook_resid_pre,
    and takes one optimiser step on the sum over layers of mean KL(final || lens_i): all translators in one
    compiled step.

    Args:
        params, cfg: the model (a lens applies to the weights it was trained on: processed or not).
        tokens: [n_seq pos] token ids.
        steps: optimiser steps. batch_size: sequences per step.
        key: draws the batches (default key 0).
        optimizer: default `recipe_optimizer(steps)`.
        layers: train only these translators (the others stay the identity); default all.
        lens: continue from this lens (default a fresh identity lens).
        layer_chunk: layers whose logits are computed at once (memory: layer_chunk x tokens x d_vocab).

    Returns:
        The trained TunedLens.

    Raises:
        InputError: tokens not [n_seq pos], batch_size above n_seq, a lens of another model's shape.
    """
    tokens = _tokens(tokens, cfg)
    if not 1 <= batch_size <= tokens.shape[0]:
        raise InputError(f"batch_size must be between 1 and the number of sequences ({tokens.shape[0]}); "
                         f"found {batch_size}.")
    lens = TunedLens(cfg.n_layers, cfg.d_model) if lens is None else lens
    _check_model(lens, cfg)
    idx = _layer_index(cfg.n_layers, layers)
    opt = recipe_optimizer(steps) if optimizer is None else optimizer
    graphdef, state = nnx.split(lens)
    key = jax.random.key(0) if key is None else key
    opt_state = opt.init(state)
    step = _train_step(cfg, opt, batch_size, layer_chunk)
    for k in jax.random.split(key, steps):
        state, opt_state, _ = step(params, state, opt_state, tokens, idx, k)
    return nnx.merge(graphdef, state)


def lens_kl(params: Params, cfg: Config, tokens: AnyArray, lens: TunedLens | None = None, *,
            layers: Sequence[int] | None = None, batch_size: int = 8, layer_chunk: int = 8) -> np.ndarray:
    """Mean KL(final || lens) per token at each layer ([layer], nats, or [len(layers)] for those layers);
    lens None: the logit lens.

    Raises:
        InputError: tokens not [n_seq pos]; a lens of another model's shape.
    """
    tokens = _tokens(tokens, cfg)
    lens = TunedLens(cfg.n_layers, cfg.d_model) if lens is None else lens
    _check_model(lens, cfg)
    W, b, idx = lens.W[...], lens.b[...], _layer_index(cfg.n_layers, layers)
    total, count = np.zeros(idx.shape[0]), 0
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size]
        total += np.asarray(_kl_sums(params, cfg, W, b, chunk, idx, layer_chunk), np.float64)
        count += chunk.size
    return total / count


def compare_lenses(lens: TunedLens, params: Params, cfg: Config, tokens: AnyArray, *,
                   layers: Sequence[int] | None = None, batch_size: int = 8) -> LensComparison:
    """The tuned lens's and the logit lens's KL to the final distribution at every layer (or `layers`)."""
    kw = dict(layers=layers, batch_size=batch_size)
    return LensComparison(lens_kl(params, cfg, tokens, lens, **kw), lens_kl(params, cfg, tokens, None, **kw))


def save_tuned_lens(lens: TunedLens, path: str | Path, params: Params | None = None) -> Path:
    """Write the lens as one safetensors file (atomically): tensors W, b; metadata format, n_layers, d_model
    and, with `params`, a hash of the unembedding it was trained for (checked on loading)."""
    from safetensors.numpy import save_file

    meta = {"format": FORMAT, "version": "1", "n_layers": str(lens.n_layers), "d_model": str(lens.d_model)}
    if params is not None:
        meta["unembed_sha256"] = unembed_hash(params)
    tensors = {"W": np.asarray(lens.W[...], np.float32), "b": np.asarray(lens.b[...], np.float32)}
    with atomic_path(path, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_tuned_lens(path: str | Path, cfg: Config, params: Params | None = None) -> TunedLens:
    """Read a lens written by `save_tuned_lens`, checked against the model it is for.

    Raises:
        CheckpointError: not a tuned-lens file, a corrupt file, or one for another model (n_layers, d_model,
            or, with `params`, the unembedding differs).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Cannot read the tuned lens {path}: {e}. Is it a safetensors file written by "
                              "save_tuned_lens?") from e
    if meta.get("format") != FORMAT or set(tensors) != {"W", "b"}:
        raise CheckpointError(f"{path} is not a jaxlens tuned lens (metadata format {meta.get('format')!r}, "
                              f"tensors {sorted(tensors)}); expected format {FORMAT!r} with tensors W and b.")
    found = (int(meta["n_layers"]), int(meta["d_model"]))
    if found != (cfg.n_layers, cfg.d_model):
        raise CheckpointError(f"The tuned lens {path} is for a model with n_layers={found[0]}, d_model="
                              f"{found[1]}; this model has n_layers={cfg.n_layers}, d_model={cfg.d_model}. "
                              "Load the lens trained for this model, or train one.")
    if params is not None and "unembed_sha256" in meta and meta["unembed_sha256"] != unembed_hash(params):
        raise CheckpointError(f"The tuned lens {path} was trained for a different unembedding (sha256 "
                              f"{meta['unembed_sha256'][:12]}..., this model's "
                              f"{unembed_hash(params)[:12]}...): "
                              "another model, or the same one with other weight processing (a lens trained "
                              "without fold_ln / centering does not apply to processed weights).")
    return _from_arrays(tensors["W"], tensors["b"], cfg, path)


def load_tuned_lens_package(path: str | Path, cfg: Config, *, allow_pickle: bool = False) -> TunedLens:
    """Read a directory in the tuned-lens package's format (`config.json` + `params.pt`, or a converted
    `params.safetensors` with the same keys): translators `{i}.weight` [out in] and `{i}.bias`.

    `params.pt` is a PyTorch pickle: it is read only with allow_pickle=True, and then with torch's restricted
    unpickler (`weights_only=True`), which loads tensors but executes no code from the file.

    Raises:
        UnsafeCheckpointError: only params.pt and allow_pickle is False.
        CheckpointError: a missing or unexpected config, a lens for another model, missing tensors.
    """
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has no readable tuned-lens config.json: {e}.") from e
    if config.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise CheckpointError(f"{path}: lens_type {config['lens_type']!r} is not supported; jaxlens reads "
                              "'linear_tuned_lens'.")
    found = (config.get("num_hidden_layers"), config.get("d_model"))
    if found != (cfg.n_layers, cfg.d_model):
        raise CheckpointError(f"The tuned lens in {path} is for a model with num_hidden_layers={found[0]}, "
                              f"d_model={found[1]}; this model has n_layers={cfg.n_layers}, d_model="
                              f"{cfg.d_model}.")
    tensors = _package_tensors(path, allow_pickle)
    try:
        W = np.stack([tensors[f"{i}.weight"].T for i in range(cfg.n_layers)])
        bias = config.get("bias", True)
        b = (np.stack([tensors[f"{i}.bias"] for i in range(cfg.n_layers)]) if bias
             else np.zeros((cfg.n_layers, cfg.d_model), np.float32))
    except KeyError as e:
        raise CheckpointError(f"The tuned lens in {path} lacks the tensor {e.args[0]!r}; it has "
                              f"{sorted(tensors)[:6]}...") from None
    return _from_arrays(W, b, cfg, path)


def unembed_hash(params: Params) -> str:
    """sha256 of the unembedding (W_U, float32 bytes): which model a lens belongs to."""
    return hashlib.sha256(np.asarray(params["unembed"]["W_U"], np.float32).tobytes()).hexdigest()


# -- private -------------------------------------------------------------------------------------------------


def _translate(W, b, h):
    bias = b.reshape(b.shape[:1] + (1,) * (h.ndim - 2) + b.shape[1:])
    return h + jnp.einsum("l...d,lde->l...e", h, W) + bias


def _select(W, b, n_layers, layers):
    if layers is None:
        return W, b
    idx = _layer_index(n_layers, layers)
    return W[idx], b[idx]


def _layer_index(n_layers: int, layers) -> Array:
    if layers is None:
        return jnp.arange(n_layers)
    idx = np.asarray(layers, np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n_layers or len(set(idx.tolist())) != idx.size:
        raise InputError(f"layers must be distinct layer indices in [0, {n_layers}); found {list(layers)}.")
    return jnp.asarray(idx, jnp.int32)


def _tokens(tokens, cfg: Config) -> Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise InputError(f"The tuned lens trains and evaluates on token sequences [n_seq pos]; found shape "
                         f"{tokens.shape}.")
    return check_tokens(tokens, cfg)


def _check_model(lens: TunedLens, cfg: Config) -> None:
    if (lens.n_layers, lens.d_model) != (cfg.n_layers, cfg.d_model):
        raise InputError(f"This tuned lens has {lens.n_layers} translators of width {lens.d_model}; the "
                         f"model has n_layers={cfg.n_layers}, d_model={cfg.d_model}.")


def _from_arrays(W, b, cfg: Config, path) -> TunedLens:
    L, D = cfg.n_layers, cfg.d_model
    if W.shape != (L, D, D) or b.shape != (L, D):
        raise CheckpointError(f"The tuned lens {path} has W {W.shape} and b {b.shape}; this model needs W "
                              f"{(L, D, D)} and b {(L, D)}.")
    lens = TunedLens(L, D)
    lens.W[...] = jnp.asarray(W, jnp.float32)
    lens.b[...] = jnp.asarray(b, jnp.float32)
    return lens


def _package_tensors(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if (path / "params.safetensors").exists():
        from safetensors.numpy import load_file

        return load_file(str(path / "params.safetensors"))
    if not (path / "params.pt").exists():
        raise CheckpointError(f"{path} has neither params.safetensors nor params.pt.")
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path / 'params.pt'} is a PyTorch pickle. jaxlens does not unpickle files unless asked: pass "
            "allow_pickle=True (read with torch's weights_only unpickler; needs torch), or convert it once "
            "to params.safetensors with the same keys.")
    try:
        import torch
    except ImportError:
        raise CheckpointError("Reading params.pt needs torch: pip install torch.") from None
    state = torch.load(path / "params.pt", map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()}


def _layer_kl(params, cfg, W, b, resid, logp_final):
    """Sum over tokens of KL(final || lens) for one layer's translator: resid [b p d], logp_final [b p v]."""
    h = _translate(W[None], b[None], resid[None])[0]
    logq = jax.nn.log_softmax(final_logits(params, cfg, h).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp_final) * (logp_final - logq))


def _kl_per_layer(params, cfg, W, b, tokens, idx, layer_chunk):
    """[len(idx)] summed KL from one cached forward."""
    logits, cache = forward(params, cfg, tokens, cache_names=("blocks.hook_resid_pre",))
    logp = jax.lax.stop_gradient(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    resid = jax.lax.stop_gradient(cache["blocks.hook_resid_pre"].astype(jnp.float32))[idx]
    one = lambda xs: _layer_kl(params, cfg, xs[0], xs[1], xs[2], logp)
    return jax.lax.map(one, (W[idx], b[idx], resid), batch_size=layer_chunk)


@functools.partial(jax.jit, static_argnums=(1, 6))
def _kl_sums(params, cfg, W, b, tokens, idx, layer_chunk):
    return _kl_per_layer(params, cfg, W, b, tokens, idx, layer_chunk)


@functools.lru_cache(maxsize=16)
def _train_step(cfg: Config, opt, batch_size: int, layer_chunk: int):
    @jax.jit
    def step(params, state, opt_state, tokens, idx, key):
        rows = jax.random.choice(key, tokens.shape[0], (batch_size,), replace=False)
        batch = tokens[rows]

        def loss_fn(s):
            kl = _kl_per_layer(params, cfg, s["W"][...], s["b"][...], batch, idx, layer_chunk)
            return kl.sum() / batch.size

        loss, grads = jax.value_and_grad(loss_fn)(state)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    return step
