"""Patching metrics: the logit difference between a correct and a competing answer (Wang et al. 2022,
"Interpretability in the Wild"), and patching results normalised between the corrupted and clean runs.

    metric = logit_diff_metric(answer_ids, wrong_ids)              # logits [batch pos d_vocab] -> scalar
    grid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    grid = normalise_patching(grid, metric(clean_logits), metric(corrupted_logits))   # 1 clean, 0 corrupted
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

#: The smallest |clean - corrupted| `normalise_patching` divides by (a metric the corruption does not move).
MIN_DENOMINATOR = 1e-6


def logit_diff_metric(answer_ids: Int[Array, " batch"], wrong_ids: Int[Array, " batch"],
                      per_prompt: bool = False) -> Callable[[Array], Array]:
    """metric(logits) = logit of the answer minus logit of the wrong token at the last position.

    Args:
        answer_ids: the correct next token of each prompt.
        wrong_ids: the competing token of each prompt (in IOI, the subject's name).
        per_prompt: return the [batch] differences instead of their mean.

    Returns:
        A function logits [batch pos d_vocab] -> scalar (or [batch]), computed in float32. It reads only the
        answer and wrong logits at the last position, so patching sweeps compute just those
        (`jaxlens.patching.logit_reads`).
    """
    rows = jnp.arange(answer_ids.shape[0])

    def metric(logits):
        last = logits[:, -1].astype(jnp.float32)
        diff = last[rows, answer_ids] - last[rows, wrong_ids]
        return diff if per_prompt else diff.mean()

    return metric


def normalise_patching(values: ArrayLike, clean: ArrayLike, corrupted: ArrayLike) -> np.ndarray:
    """(values - corrupted) / (clean - corrupted): 1 where a patch restores the clean metric fully, 0 where it
    has no effect. A difference smaller than MIN_DENOMINATOR in size is replaced by MIN_DENOMINATOR.

    Args:
        values: patching results (any shape), in the metric's units.
        clean, corrupted: the metric of the clean and corrupted runs (scalars).
    """
    denom = float(clean) - float(corrupted)
    if abs(denom) <= MIN_DENOMINATOR:
        denom = MIN_DENOMINATOR
    return (np.asarray(values) - float(corrupted)) / denom
