"""Evaluation of a dictionary as SAELens defines it (sae-lens 6.54.12 `evals.py`; shared/RESEARCH.md 2.4), on
held-out text.

    metrics = evaluate(sae, params, cfg, held_out, context_size=128, n_sequences=64)
    metrics["explained_variance"], metrics["ce_loss_recovered"], metrics["dead_fraction"]

Rows: `n_sequences` rows spread evenly over the whole held-out text (`evaluation_rows`: the middle row of each
of n equal strata), not its first rows, whose banners and title pages are not typical text.

Positions left out (as the activation store leaves them out, `store.keep_positions`): the BOS position with
`exclude_bos`, positions holding `exclude_token_ids` (SAELens 6's `run_evals(exclude_special_tokens=...)`),
and with `exclude_norm_ratio` positions whose activation norm exceeds that multiple of the median norm over
the batch's other positions. As in SAELens, a left-out position is not patched and counts in no metric (its
next-token loss and KL included); the counts are reported (`excluded_bos_position`, `excluded_special_tokens`,
`excluded_high_norm`).

Reconstruction, over every kept token:
- `explained_variance = 1 - sum ||x - x_hat||^2 / (sum ||x||^2 - N ||mean x||^2)`, accumulated in float64
  (SAELens's `ExplainedVarianceCalculator`); `fvu = 1 - explained_variance`;
- `mse` = mean per-token ||x - x_hat||^2; `cossim` mean cosine(x, x_hat); `l2_ratio` mean ||x_hat|| / ||x||;
- `l0` = mean number of active features per token, `l1` = mean sum |f|;
- feature density = fraction of tokens each feature fires on; `dead_fraction` = features that never fire,
  `dense_fraction` = features firing on more than `dense_threshold` of the tokens.
For a transcoder x is the activation at `hook_name_out` (its target) and x_hat the transcoder of `hook_name`.

Downstream, the model's next-token loss with the reconstruction in place of the activation (at the
dictionary's hook; a transcoder's output hook), against the clean model and against the activation
zero-ablated:
`ce_loss_recovered = (CE_zero - CE_dict) / (CE_zero - CE_clean)`, `ce_loss_increase = CE_dict - CE_clean`;
`kl_div_score = (KL_zero - KL_dict) / KL_zero` with KL(clean || patched) summed over the vocabulary, averaged
over the kept positions (the prediction made at each). The reconstruction is computed from the clean run's
activation and patched in (`Patch`): for an SAE this is exactly splicing it at its hook (upstream of the
hook nothing changes), which the tests check against `splice.spliced`; it works as well for a transcoder,
which reads one hook and writes another.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.dictionaries.base import Dictionary, DictionaryError
from jaxlens.dictionaries.corpus import CorpusError, TokenCorpus
from jaxlens.dictionaries.store import check_exclusions, keep_positions
from jaxlens.errors import InputError
from jaxlens.interventions import Patch
from jaxlens.model.forward import lm_cross_entropy_loss, run
from jaxlens.shapes import Params


def evaluate(dictionary: Dictionary, params: Params, cfg: Config, corpus: TokenCorpus, *,
             context_size: int = 128, n_sequences: int = 64, batch_size: int = 8, exclude_bos: bool = True,
             exclude_token_ids: Sequence[int] = (), exclude_norm_ratio: float | None = None,
             rows: Sequence[int] | None = None, dense_threshold: float = 0.1) -> dict[str, float]:
    """SAELens's evaluation metrics of `dictionary` on `n_sequences` rows spread over `corpus`.

    Args:
        dictionary: an SAE or per-layer transcoder whose `cfg.hook_name` (and `hook_name_out`) name hooks of
            the model.
        params, cfg: the model.
        corpus: held-out text (`corpus.load_corpus(corpus.HELDOUT_SOURCE, tokenizer)`).
        context_size, n_sequences, batch_size: rows of tokens to evaluate on (`evaluation_rows`), and per
            forward.
        exclude_bos: leave the BOS position out of every metric and un-patched.
        exclude_token_ids: leave the positions holding these ids out too (`store.special_token_ids`).
        exclude_norm_ratio: leave out positions whose norm at the hook (a transcoder: either hook) exceeds
            this multiple of the median over the batch's other positions (None: off).
        rows: the corpus rows to use instead of `evaluation_rows(n, n_sequences)`.
        dense_threshold: the firing frequency above which a feature counts as dense.

    Returns:
        {explained_variance, fvu, mse, cossim, l2_ratio, l0, l1, dead_fraction, dense_fraction,
        ce_loss_clean, ce_loss_with_dictionary, ce_loss_zero_ablation, ce_loss_recovered, ce_loss_increase,
        kl_div_with_dictionary, kl_div_zero_ablation, kl_div_score, tokens, excluded_bos_position,
        excluded_special_tokens, excluded_high_norm} as floats (counts as ints).

    Raises:
        DictionaryError: a dictionary without hook names, a cross-layer transcoder, or a width that does not
            match the hook.
        UnknownHookError: a hook the model lacks.
        CorpusError: a corpus shorter than one row, or rows out of range.
        InputError: bad exclusion arguments.
    """
    ids, ratio = check_exclusions(exclude_token_ids, exclude_norm_ratio, cfg.d_vocab)
    dcfg = dictionary.cfg
    if dcfg.architecture == "clt":
        raise DictionaryError("evaluate takes an SAE or a per-layer transcoder; evaluate a cross-layer "
                              "transcoder layer by layer.")
    hook_in = dcfg.hook_name
    hook_out = dcfg.hook_name_out if dcfg.is_transcoder else dcfg.hook_name
    if not hook_in or not hook_out:
        raise DictionaryError("The dictionary has no hook_name (and a transcoder no hook_name_out): evaluate "
                              "needs to know where it reads and writes.")
    table = hook_names.decoder_table(cfg)
    for h in (hook_in, hook_out):
        layer, _ = table.parse(h)
        if layer == "all":
            raise InputError(f"evaluate needs the hook of one layer; found {h!r}.")
    idx = evaluation_rows(corpus.n_sequences(context_size), n_sequences) if rows is None else rows
    tokens = corpus.sequences(context_size, idx)
    graphdef, state = nnx.split(dictionary)
    totals: dict[str, np.ndarray] = {}
    for i in range(0, len(tokens), batch_size):
        stats = _batch_stats(params, cfg, jnp.asarray(tokens[i:i + batch_size]), graphdef, state, hook_in,
                             hook_out, exclude_bos, ids, ratio)
        for k, v in jax.device_get(stats).items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    counts = {f"excluded_{k}": int(totals.pop(k)) for k in ("bos_position", "special_tokens", "high_norm")}
    return _finish(totals, dense_threshold) | counts


def evaluation_rows(n_rows: int, n_sequences: int) -> np.ndarray:
    """The rows an evaluation reads: `n_sequences` (at most `n_rows`) spread over rows 0..n_rows-1, the
    middle row of each of n equal strata, floor((i + 1/2) n_rows / n) for i < n; all rows when n = n_rows.

    Raises:
        CorpusError: no rows, or n_sequences below 1.
    """
    if n_rows < 1 or n_sequences < 1:
        raise CorpusError(f"An evaluation needs at least one row; found a corpus of {n_rows} rows and "
                          f"n_sequences={n_sequences}. Use more text, a shorter context_size, or "
                          "n_sequences >= 1.")
    n = min(n_sequences, n_rows)
    return (2 * np.arange(n, dtype=np.int64) + 1) * n_rows // (2 * n)


def evaluate_transcoder_set(transcoders: Mapping[int, Dictionary], params: Params, cfg: Config,
                            corpus: TokenCorpus, *, context_size: int = 128, n_sequences: int = 64,
                            batch_size: int = 8, exclude_bos: bool = True,
                            dense_threshold: float = 0.1) -> dict[str, Any]:
    """A per-layer transcoder set on held-out text: each layer's reconstruction metrics (as `evaluate`), and
    the next-token loss with every MLP of the set replaced by its transcoder at once (`replaced_logits`),
    against the clean model and against those MLPs zero-ablated.

    Args:
        transcoders: {layer: per-layer transcoder}, all of one shape, reading `blocks.{layer}.<in>` and
            writing `blocks.{layer}.<out>` with the same relative names at every layer (e.g.
            `ln2.hook_normalized` -> `hook_mlp_out`); <in> must come before <out> in the block.
        params, cfg, corpus, context_size, n_sequences, batch_size, exclude_bos, dense_threshold: as
            `evaluate` (exclude_bos also keeps the BOS position's MLPs as they are).

    Returns:
        {"layers": {layer: {explained_variance, fvu, mse, cossim, l2_ratio, l0, l1, dead_fraction,
        dense_fraction, tokens}}, ce_loss_clean, ce_loss_with_dictionary (every MLP replaced),
        ce_loss_zero_ablation (every MLP zeroed), ce_loss_recovered, ce_loss_increase, kl_div_with_dictionary,
        kl_div_zero_ablation, kl_div_score, tokens}.

    Raises:
        DictionaryError: no transcoders, dictionaries that are not per-layer transcoders of one shape, hooks
            not of the form above, or widths that do not match the model.
        CorpusError: a corpus shorter than one row.
    """
    layers, rel_in, rel_out = _set_hooks(transcoders, cfg)
    graphdef, state = _stack(transcoders, layers)
    rows = corpus.sequences(context_size, evaluation_rows(corpus.n_sequences(context_size), n_sequences))
    totals: dict[str, np.ndarray] = {}
    for i in range(0, len(rows), batch_size):
        stats = _set_stats(params, cfg, jnp.asarray(rows[i:i + batch_size]), graphdef, state, layers, rel_in,
                           rel_out, exclude_bos)
        for k, v in jax.device_get(stats).items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    per_layer = {l: _recon_metrics({k: v[j] for k, v in totals.items() if k in _RECON_KEYS}, dense_threshold)
                 for j, l in enumerate(layers)}
    return {"layers": per_layer, **_ce_metrics(totals), "tokens": per_layer[layers[0]]["tokens"]}


def replaced_logits(params: Params, cfg: Config, tokens, graphdef, state, layers: tuple[int, ...],
                    rel_in: str, rel_out: str, mask=None) -> jax.Array:
    """Logits [batch pos d_vocab] with the output of every layer in `layers` (at `blocks.L.<rel_out>`)
    replaced by its transcoder of the same run's `blocks.L.<rel_in>`: one pass of the block runner, the
    input carried from one hook to the other (`runner.run_blocks_carried`).

    Args:
        graphdef, state: the transcoders, `state` stacked over `layers` (`nnx.split` of each, stacked).
        mask: [batch pos] where to replace (default everywhere).
    """
    from jaxlens.model import runner
    from jaxlens.model.attention import Context
    from jaxlens.model.forward import final_logits

    resid0 = run(params, cfg, tokens, stop_at_layer=0)[0]
    b, p = tokens.shape
    on = jnp.zeros((cfg.n_layers,), bool).at[jnp.asarray(layers)].set(True)
    slot = jnp.zeros((cfg.n_layers,), jnp.int32).at[jnp.asarray(layers)].set(jnp.arange(len(layers)))
    full = jax.tree_util.tree_map(lambda a: a[slot], state)  # layer l reads slot l (unused where off)
    where = jnp.ones((b, p), bool) if mask is None else mask
    ivs = {f"blocks.{rel_in}": _CarryInput(),
           f"blocks.{rel_out}": _FromCarry(full, on[:, None, None, None] & where[None, :, :, None], graphdef)}
    _, block_iv = runner.split_interventions(hook_names.decoder_table(cfg), ivs)
    ctx = Context(positions=jnp.broadcast_to(jnp.arange(p), (b, p)), key_valid=None, offset=0)
    carry = jnp.zeros((b, p, cfg.d_model), resid0.dtype)
    resid, _, _, _ = runner.run_blocks_carried(params["blocks"], cfg, resid0, ctx, block_iv, start=0,
                                               stop=cfg.n_layers, carry=carry)
    return final_logits(params, cfg, resid)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _CarryInput:
    """Leave the activation as it is and put it in the carry (the transcoder's input)."""

    uses_carry: ClassVar[bool] = True
    is_intervention: ClassVar[bool] = True

    def __call__(self, x, hook, carry):
        return x, x.reshape(carry.shape).astype(carry.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _FromCarry:
    """Where `mask`, the transcoder (state per layer) of the carried input instead of the activation."""

    state: Any
    mask: jax.Array  # [layer batch pos 1] (sliced to one layer in the scan)
    graphdef: Any = dataclasses.field(metadata=dict(static=True))
    uses_carry: ClassVar[bool] = True
    is_intervention: ClassVar[bool] = True

    def __call__(self, x, hook, carry):
        recon = nnx.merge(self.graphdef, self.state)(carry).astype(x.dtype)
        return jnp.where(self.mask, recon.reshape(x.shape), x), carry


_RECON_KEYS = ("n", "err", "sum_sq", "sum_x", "cos", "l2_ratio", "l0", "l1", "fires")


@functools.partial(jax.jit, static_argnames=("cfg", "graphdef", "layers", "rel_in", "rel_out", "exclude_bos"))
def _set_stats(params, cfg, tokens, graphdef, state, layers, rel_in, rel_out, exclude_bos):
    """Per-layer reconstruction sums [n_layers_in_set ...] and the replaced / zeroed losses of one batch."""
    names = (f"blocks.{rel_in}", f"blocks.{rel_out}")
    logits, cache, _ = run(params, cfg, tokens, cache_names=names)
    idx = jnp.asarray(layers)
    x_in, x = cache[names[0]][idx], cache[names[1]][idx]
    keep = _keep(tokens, exclude_bos)
    sums = jax.vmap(lambda s, a, b: _recon_sums(nnx.merge(graphdef, s), a, b, keep, names[0], names[1])[0])(
        state, x_in, x)
    replaced = replaced_logits(params, cfg, tokens, graphdef, state, layers, rel_in, rel_out, keep)
    zero_mask = jnp.zeros((cfg.n_layers, 1, 1, 1), bool).at[idx].set(True) & keep[None, :, :, None]
    zero = Patch(value=jnp.zeros((cfg.n_layers, 1, 1, 1), x.dtype), mask=zero_mask)
    zeroed = run(params, cfg, tokens, interventions={names[1]: zero})[0]
    return sums | _ce_sums(tokens, logits, replaced, zeroed, keep)


def _set_hooks(transcoders, cfg: Config) -> tuple[tuple[int, ...], str, str]:
    if not transcoders:
        raise DictionaryError("evaluate_transcoder_set needs at least one transcoder; found none.")
    layers = tuple(sorted(int(l) for l in transcoders))
    rels = set()
    for l in layers:
        c = transcoders[l].cfg
        if c.architecture not in ("transcoder", "skip_transcoder"):
            raise DictionaryError(f"evaluate_transcoder_set takes per-layer transcoders; layer {l} holds a "
                                  f"{c.architecture}.")
        pre = f"blocks.{l}."
        if not (c.hook_name.startswith(pre) and (c.hook_name_out or "").startswith(pre)):
            raise DictionaryError(f"The transcoder of layer {l} reads {c.hook_name!r} and writes "
                                  f"{c.hook_name_out!r}; both must be hooks of block {l} ('{pre}...').")
        rels.add((c.hook_name.removeprefix(pre), c.hook_name_out.removeprefix(pre)))
    if len(rels) != 1:
        raise DictionaryError(f"The transcoders of a set read and write the same hooks at every layer; found "
                              f"{sorted(rels)}.")
    if layers[-1] >= cfg.n_layers or layers[0] < 0:
        raise DictionaryError(f"Transcoder layers {list(layers)} do not all exist in a model of "
                              f"{cfg.n_layers} layers.")
    rel_in, rel_out = rels.pop()
    table = hook_names.decoder_table(cfg)
    table.parse(f"blocks.{rel_in}"), table.parse(f"blocks.{rel_out}")  # UnknownHookError for a bad name
    return layers, rel_in, rel_out


def _stack(transcoders, layers):
    """(graphdef of the first, states stacked over `layers`); raises for transcoders of other shapes."""
    split = [nnx.split(transcoders[l]) for l in layers]
    try:
        state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[s for _, s in split])
    except ValueError as e:
        raise DictionaryError(f"The transcoders of a set must all have one shape and architecture "
                              f"({e}).") from None
    return split[0][0], state


@functools.partial(jax.jit, static_argnames=("cfg", "graphdef", "hook_in", "hook_out", "exclude_bos", "ids",
                                             "ratio"))
def _batch_stats(params, cfg, tokens, graphdef, state, hook_in, hook_out, exclude_bos, ids=(), ratio=None):
    """Sums over one batch of rows (the caller adds them up in float64), and the positions left out."""
    names = tuple(dict.fromkeys((hook_in, hook_out)))
    logits, cache, _ = run(params, cfg, tokens, cache_names=names)
    x_in, x = cache[hook_in], cache[hook_out]
    cand = _keep(tokens, exclude_bos)
    norms = [jnp.linalg.norm(cache[h].reshape(tokens.shape + (-1,)), axis=-1) for h in names]
    keep, counts = keep_positions(tokens, norms, ids, ratio, candidates=cand)
    sums, recon = _recon_sums(nnx.merge(graphdef, state), x_in, x, keep, hook_in, hook_out)
    mask = keep.reshape(keep.shape + (1,) * (x.ndim - 2))
    patched = {hook_out: Patch(value=recon, mask=mask)}
    zeroed = {hook_out: Patch(value=jnp.zeros_like(x), mask=mask)}
    logits_dict = run(params, cfg, tokens, interventions=patched)[0]
    logits_zero = run(params, cfg, tokens, interventions=zeroed)[0]
    counts["bos_position"] = (~cand).sum()
    return sums | _ce_sums(tokens, logits, logits_dict, logits_zero, keep) | counts


def _keep(tokens, exclude_bos: bool):
    """[batch pos]: the positions evaluated and patched (all but the BOS position with exclude_bos)."""
    return jnp.ones(tokens.shape, bool).at[:, 0].set(not exclude_bos)


def _recon_sums(module: Dictionary, x_in, x, keep, hook_in: str, hook_out: str):
    """(reconstruction sums over the kept positions, the reconstruction shaped as x) of `module` reading
    x_in [batch pos ...] against its target x [batch pos ...]."""
    dcfg = module.cfg
    flat_in = x_in.reshape(x_in.shape[:2] + (-1,))
    if flat_in.shape[-1] != dcfg.d_in:
        raise DictionaryError(f"The dictionary reads width d_in={dcfg.d_in}, but {hook_in!r} has activations "
                              f"of shape {x_in.shape[2:]} per token. Use the hook it was trained on.")
    acts = module.encode(flat_in)
    recon_flat = module(flat_in).astype(x.dtype)
    if recon_flat.shape[-1] != math.prod(x.shape[2:]):
        raise DictionaryError(f"The dictionary writes width {recon_flat.shape[-1]}, but {hook_out!r} has "
                              f"activations of shape {x.shape[2:]} per token.")
    w = keep.astype(jnp.float32)
    xf, rf = x.reshape(x.shape[:2] + (-1,)), recon_flat
    err = jnp.square(xf - rf).sum(-1)
    norm_x, norm_r = jnp.linalg.norm(xf, axis=-1), jnp.linalg.norm(rf, axis=-1)
    cos = (xf * rf).sum(-1) / jnp.maximum(norm_x * norm_r, 1e-12)
    fired = (acts != 0) & keep[..., None]
    sums = {"n": w.sum(), "err": (err * w).sum(), "sum_sq": (jnp.square(xf).sum(-1) * w).sum(),
            "sum_x": (xf * w[..., None]).sum((0, 1)), "cos": (cos * w).sum(),
            "l2_ratio": (norm_r / jnp.maximum(norm_x, 1e-12) * w).sum(),
            "l0": fired.sum(-1).astype(jnp.float32).sum(), "l1": (jnp.abs(acts).sum(-1) * w).sum(),
            "fires": fired.sum((0, 1))}
    return sums, recon_flat.reshape(x.shape)


def _ce_sums(tokens, logits, logits_dict, logits_zero, keep):
    """Summed next-token losses and KL(clean || patched) of the clean, dictionary and zero-ablated runs, over
    the predictions made at the kept positions `keep` [batch pos] (SAELens's masks: the loss of the pair
    (i, i + 1) counts when position i is kept; the last position has no pair)."""
    pair = keep[:, :-1].astype(jnp.float32)
    ce = lambda lg: (lm_cross_entropy_loss(lg, tokens, per_token=True) * pair).sum()  # noqa: E731
    logp_clean = jax.nn.log_softmax(logits.astype(jnp.float32), -1)

    def kl(lg):
        logp = jax.nn.log_softmax(lg.astype(jnp.float32), -1)
        return ((jnp.exp(logp_clean) * (logp_clean - logp)).sum(-1) * keep.astype(jnp.float32)).sum()

    return {"n_pairs": pair.sum(), "n_kl": keep.astype(jnp.float32).sum(),
            "ce_clean": ce(logits), "ce_dict": ce(logits_dict), "ce_zero": ce(logits_zero),
            "kl_dict": kl(logits_dict), "kl_zero": kl(logits_zero)}


def _finish(t: dict, dense_threshold: float) -> dict[str, float]:
    return _recon_metrics(t, dense_threshold) | _ce_metrics(t)


def _recon_metrics(t: dict, dense_threshold: float) -> dict[str, float]:
    n = float(t["n"])
    var = float(t["sum_sq"]) - float(np.square(t["sum_x"]).sum()) / n
    ev = 1.0 - float(t["err"]) / var
    density = np.asarray(t["fires"]) / n
    return {"explained_variance": ev, "fvu": 1.0 - ev, "mse": float(t["err"]) / n,
            "cossim": float(t["cos"]) / n,
            "l2_ratio": float(t["l2_ratio"]) / n, "l0": float(t["l0"]) / n, "l1": float(t["l1"]) / n,
            "dead_fraction": float((density == 0).mean()),
            "dense_fraction": float((density > dense_threshold).mean()), "tokens": int(n)}


def _ce_metrics(t: dict) -> dict[str, float]:
    pairs = float(t["n_pairs"])
    ce_clean, ce_dict, ce_zero = (float(t[k]) / pairs for k in ("ce_clean", "ce_dict", "ce_zero"))
    kl_dict, kl_zero = float(t["kl_dict"]) / float(t["n_kl"]), float(t["kl_zero"]) / float(t["n_kl"])
    return {"ce_loss_clean": ce_clean, "ce_loss_with_dictionary": ce_dict, "ce_loss_zero_ablation": ce_zero,
            "ce_loss_recovered": (ce_zero - ce_dict) / (ce_zero - ce_clean),
            "ce_loss_increase": ce_dict - ce_clean, "kl_div_with_dictionary": kl_dict,
            "kl_div_zero_ablation": kl_zero, "kl_div_score": (kl_zero - kl_dict) / kl_zero}
