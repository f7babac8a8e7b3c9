"""The inputs of a sweep: one corrupted forward, the clean source activation, the checked metric.

Before any cell runs, the corrupted model runs once with the activations the chunk functions read (the hook
itself, the residual entering every layer, the keys and values, the final residual), the clean activation is
fetched (from a cache, from clean token ids, or given as values) and compared with the corrupted one to find
where the patch can change anything, and the metric is evaluated once, checked, and analysed for the logits
it reads (`logit_reads`).
"""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.cache import ActivationCache
from jaxlens.errors import InputError
from jaxlens.model.forward import check_tokens, run
from jaxlens.patching.logit_reads import LogitReads, analyse
from jaxlens.patching.plan import Target


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a sweep reads besides the cells: the corrupted run, the clean source and the metric's reads."""

    data: dict  # arrays the chunk function reads
    target_act: jax.Array
    diff: np.ndarray | None  # None without prefix reuse
    logits: jax.Array
    base: np.ndarray  # metric of the unpatched corrupted run
    reads: LogitReads | None  # the logits the metric reads (None: all of them)

    @property
    def n_logits(self) -> int:
        """Logits computed per batch row and cell: positions x vocabulary entries the metric reads."""
        _, P, V = self.logits.shape
        if self.reads is None:
            return P * V
        return len(self.reads.positions) * (V if self.reads.vocab is None else len(self.reads.vocab))


@functools.partial(jax.jit, static_argnames=("cfg", "names"))
def cached_run(params, cfg, tokens, names):
    """(logits, {name: activation}) of one forward, jitted (`names` a tuple of hook names)."""
    out, cache, _ = run(params, cfg, tokens, cache_names=names)
    return out, cache


def prepare(params, cfg, tokens, clean, target: Target, metric, metric_names, reuse: bool) -> Prepared:
    """Run the corrupted model once, fetch the source, check the metric, find the logits it reads."""
    L = cfg.n_layers
    rotary = cfg.positional_embedding_type == "rotary"
    final = f"blocks.{L - 1}.hook_resid_post"
    k = "blocks.attn.hook_rot_k" if rotary else "blocks.attn.hook_k"
    names = (target.full_name, final, "blocks.hook_resid_pre", k, "blocks.attn.hook_v")
    logits, cache = cached_run(params, cfg, tokens, tuple(dict.fromkeys(names)))
    tgt = cache[target.full_name]
    src = source_activation(params, cfg, clean, target, tgt.shape)
    base = check_metric(metric, logits, metric_names)
    reads = analyse(metric, tuple(logits.shape), logits.dtype)
    if reads is not None:
        sub = logits[:, reads.positions]
        sub = sub if reads.vocab is None else sub[:, :, reads.vocab]
        if not np.allclose(np.asarray(reads(sub)), base, rtol=1e-5, atol=1e-6, equal_nan=True):
            reads = None
    diff = differs(src, tgt) if reuse else None
    data = {"tokens": tokens, "source": src, "logits": logits, "final_resid": cache[final],
            "resid_pre": cache["blocks.hook_resid_pre"], "k": cache[k], "v": cache["blocks.attn.hook_v"]}
    return Prepared(data, tgt, diff, logits, base, reads)


def differs(src: jax.Array, tgt: jax.Array) -> np.ndarray:
    """Where the clean activation really differs from the corrupted one, broadcast to the corrupted shape.

    A clean cache from `run_with_cache` comes from another compiled program than the corrupted run here, so
    positions the prompts share can differ by rounding (~1e-6 in float32). Treating those as changes would
    switch position reuse off, so differences within a few units of rounding (64 ulp of the activation's scale
    in float32, 2 ulp of each value in 16-bit types) count as equal. `prefix_reuse=False` patches every cell.
    """
    src, tgt = jnp.broadcast_arrays(src.astype(tgt.dtype), tgt)
    eps = float(jnp.finfo(tgt.dtype).eps)
    a, b = src.astype(jnp.float32), tgt.astype(jnp.float32)
    if tgt.dtype == jnp.float32:
        tol = 64 * eps * (jnp.abs(b) + jnp.mean(jnp.abs(b)))
    else:
        tol = 2 * eps * jnp.abs(b)
    return np.asarray(jnp.abs(a - b) > tol)


def source_activation(params, cfg, clean, target: Target, shape):
    """The clean activation (stacked over layers for block hooks), checked against the corrupted shape."""
    name = target.full_name
    if isinstance(clean, ActivationCache):
        clean = clean.cache_dict
    if isinstance(clean, Mapping):
        if name in clean:
            src = clean[name]
        elif target.kind == "block" and all(f"blocks.{l}.{target.rel}" in clean for l in range(cfg.n_layers)):
            src = jnp.stack([clean[f"blocks.{l}.{target.rel}"] for l in range(cfg.n_layers)])
        else:
            raise InputError(f"The clean cache holds no {name!r} (for every layer). Cache it, e.g. "
                             f"model.run_with_cache(clean_tokens, names_filter=[{name!r}]).")
    else:
        arr = jnp.asarray(clean)
        if jnp.issubdtype(arr.dtype, jnp.integer):
            clean_tokens = check_tokens(arr, cfg)
            src = cached_run(params, cfg, clean_tokens, (name,))[1][name]
        else:
            src = arr
    src = jnp.asarray(src)
    ok = src.ndim == len(shape) and all(a in (1, b) for a, b in zip(src.shape, shape, strict=True))
    if not ok:
        raise InputError(
            f"The clean activation {name!r} has shape {tuple(src.shape)}, the corrupted run's has "
            f"{tuple(shape)}: "
            "clean and corrupted prompts must have the same shape [batch pos] (pad or trim them to match)."
        )
    return src.astype(jnp.result_type(src.dtype))


def check_metric(metric, logits, metric_names) -> np.ndarray:
    """The metric on the corrupted logits, checked to be a scalar (or the declared vector)."""
    want = () if metric_names is None else (len(metric_names),)
    try:
        out = metric(logits)
    except Exception as e:
        raise InputError(f"The metric failed on logits of shape {tuple(logits.shape)}: {e}") from e
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != want:
        found = "a " + type(out).__name__ if shape is None else f"shape {tuple(shape)}"
        hint = ("declare vector metrics with metric_names=[...]" if metric_names is None
                else f"it must return {len(metric_names)} values, one per name")
        raise InputError(f"The metric must return a scalar array{'' if not want else f' of shape {want}'}; "
                         f"found {found}. Reduce over the batch (e.g. .mean()), or {hint}.")
    return np.asarray(out, np.float32)
