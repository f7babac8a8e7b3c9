"""Indirect-object-identification prompts (Wang et al. 2022, "Interpretability in the Wild"): name-swapped
clean / corrupted pairs of equal token length, for patching with the logit difference as the metric.

    "When Mary and John went to the store, John gave a drink to"  -> " Mary"   (clean: the indirect object)
    "When John and Mary went to the store, Mary gave a drink to"  -> " John"   (corrupted: the names swapped)

    p = ioi_prompts(model, 8)
    metric = logit_diff_metric(p.answer_ids, p.wrong_ids)          # jaxlens.analysis.metrics
    grid = patching.get_act_patch_resid_pre(model, p.corrupted_tokens, clean_cache, metric)
    labels = position_labels(model, p)                              # "When", "[IO]", " and", "[S1]", ...
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from jaxlens.errors import InputError

NAMES = (" Mary", " John", " Alice", " Bob", " Sarah", " Tom", " Anna", " James", " Emma", " David")
PLACES = (" store", " park", " school", " beach")
OBJECTS = (" drink", " book", " ball", " gift")
TEMPLATE = "When{a} and{b} went to the{place},{b} gave a{obj} to"


@dataclasses.dataclass(frozen=True)
class IOIPrompts:
    """Name-swapped prompt pairs: texts, token ids (BOS first, all of one length) and answer token ids.

    Attributes:
        clean, corrupted: the prompts; corrupted[i] is clean[i] with the two names swapped.
        answers, wrong: the clean answer (the indirect object) and the other name, as text.
        clean_tokens, corrupted_tokens: [batch pos] token ids.
        answer_ids, wrong_ids: [batch] the single tokens of `answers` and `wrong`.
    """

    clean: list[str]
    corrupted: list[str]
    answers: list[str]
    wrong: list[str]
    clean_tokens: Int[Array, "batch pos"]
    corrupted_tokens: Int[Array, "batch pos"]
    answer_ids: Int[Array, " batch"]
    wrong_ids: Int[Array, " batch"]


def ioi_prompts(model, n_prompts: int) -> IOIPrompts:
    """`n_prompts` IOI pairs from TEMPLATE, cycling through the name pairs of NAMES (every other round with
    the two names in the other order) and through PLACES and OBJECTS.

    Only names, places and objects that are one token for `model.tokenizer` are used, so every prompt has the
    same token length and positions line up across the batch.

    Args:
        model: a HookedTransformer with a tokenizer.
        n_prompts: pairs to build.

    Raises:
        InputError: fewer than two of the names are single tokens, or the prompts tokenize to different
            lengths.
    """
    single = lambda words: [w for w in words if len(model.to_str_tokens(w, prepend_bos=False)) == 1]
    names = single(NAMES)
    # varied places / objects only where each is one token (keeps prompts aligned); else the first throughout
    places, objects = single(PLACES) or list(PLACES[:1]), single(OBJECTS) or list(OBJECTS[:1])
    if len(names) < 2:
        raise InputError(f"The IOI prompts need two names that are single tokens; of {list(NAMES)} this "
                         f"tokenizer keeps only {names} whole.")
    rows = []
    for i in range(n_prompts):
        a, b = names[(2 * i) % len(names)], names[(2 * i + 1) % len(names)]
        if (i // max(1, len(names) // 2)) % 2:
            a, b = b, a
        place, obj = places[i % len(places)], objects[i % len(objects)]
        rows.append((TEMPLATE.format(a=a, b=b, place=place, obj=obj),
                     TEMPLATE.format(a=b, b=a, place=place, obj=obj), a, b))
    lengths = {len(model.to_str_tokens(r[k])) for r in rows for k in (0, 1)}
    if len(lengths) != 1:
        raise InputError(f"The IOI prompts tokenize to different lengths {sorted(lengths)}; patching by "
                         "position needs aligned prompts.")
    return IOIPrompts(
        clean=[r[0] for r in rows], corrupted=[r[1] for r in rows], answers=[r[2] for r in rows],
        wrong=[r[3] for r in rows], clean_tokens=model.to_tokens([r[0] for r in rows]),
        corrupted_tokens=model.to_tokens([r[1] for r in rows]),
        answer_ids=jnp.asarray([model.to_single_token(r[2]) for r in rows]),
        wrong_ids=jnp.asarray([model.to_single_token(r[3]) for r in rows]))


def position_labels(model, prompts: IOIPrompts) -> list[str]:
    """A label for each position of the clean prompts: the token where every prompt has the same one, else
    its role: "[IO]" (the answer's name), "[S1]" / "[S2]" (first / second mention of the subject) or
    "[varies]"."""
    clean = np.asarray(prompts.clean_tokens)
    io, s = np.asarray(prompts.answer_ids), np.asarray(prompts.wrong_ids)
    labels: list[str] = []
    for pos in range(clean.shape[1]):
        col = clean[:, pos]
        if (col == col[0]).all():
            labels.append(model.to_string(col[:1]))
        elif (col == io).all():
            labels.append("[IO]")
        elif (col == s).all():
            labels.append("[S2]" if "[S1]" in labels else "[S1]")
        else:
            labels.append("[varies]")
    return labels
