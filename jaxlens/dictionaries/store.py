"""The activation store: a model's activations at chosen hooks, streamed over a token corpus in shuffled
batches.

    store = ActivationStore(params, cfg, corpus, ["blocks.3.hook_resid_post"], context_size=128,
                            batch_size=4096, key=0)
    for step, batch in store.batches(start_step=0):     # batch: {hook name: [batch_size, d]}
        ...

One hook (an SAE), a pair (a transcoder reads `blocks.l.ln2.hook_normalized`, writes `blocks.l.hook_mlp_out`)
or the same hook at several layers (dictionaries trained together, one forward feeding all): every hook comes
from the same forward, which runs the block runner only up to the last layer asked for (`stop_at_layer`) and
is compiled once per (config, hooks) and reused for every chunk.

The data order is a pure function of the key and the step: rows of the corpus are visited in a permutation
drawn afresh each epoch; `buffer_sequences` consecutive rows make one shuffle buffer, whose activations
(`buffer_sequences * tokens_per_row`) are permuted together and cut into `batch_size` batches. A resumed run
recomputes the one buffer it stopped in and continues from the same batch, so an interrupted training sees the
same data in the same order as an uninterrupted one (no buffer state is saved). Permutations come from
NumPy's PCG64 seeded with (key, epoch) and (key, buffer): the same on every machine.

By default the BOS position is left out (`exclude_bos`): every row starts with BOS, whose activation is one
fixed vector (huge in many models' residual streams), so it would only waste capacity and skew the
normalisation. Activations with several trailing axes (`attn.hook_z`: head_index d_head) are flattened, as
SAELens's `reshape_activations="hook_z"` does.

Two more exclusions leave positions out, each explicit and counted (`exclusion_counts`, nothing dropped
silently):
- `exclude_token_ids`: positions whose token is one of these ids (SAELens 6's `exclude_special_tokens`, a list
  of ids, with the same semantics: `~torch.isin(token_ids, exclude_special_tokens)` over the stream;
  `special_token_ids(tokenizer)` gives SAELens's `exclude_special_tokens=True` set: BOS, EOS, PAD, SEP and
  decoder-start). The corpus puts BOS between documents, so rows hold BOS inside them too: the attention-sink
  positions of SmolLM2, whose layer-15 residual has norm 10k-19k against a median near 170.
- `exclude_norm_ratio`: positions where the activation's norm at any of the hooks exceeds this multiple of the
  median norm of that hook over the same shuffle buffer (positions not already left out). SAELens has no such
  filter. The median is the buffer's own, so the exclusion stays a pure function of the key and the buffer and
  a resumed run leaves out the same positions.
With either, a buffer holds a varying number of activations; `exclude_reserve` (default 5% when an exclusion
is on) is the share of a buffer kept in reserve so that every buffer still fills its `batches_per_buffer`
batches; a buffer that leaves out more raises InputError, naming the buffer and the counts.
"""

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.dictionaries.corpus import CorpusError, TokenCorpus
from jaxlens.errors import InputError
from jaxlens.model.forward import run
from jaxlens.shapes import Params

EXCLUDE_RESERVE = 0.05
"""The share of each shuffle buffer held in reserve for left-out positions when an exclusion is on."""

#: The tokenizer attributes whose ids SAELens 6 excludes with `exclude_special_tokens=True`
#: (`sae_lens.util.get_special_token_ids`).
SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
                       "decoder_start_token_id")


class ActivationStore:
    """Shuffled batches of activations at `hooks` over `corpus` (see the module docstring).

    Args:
        params, cfg: the model.
        corpus: the token stream (`corpus.TokenCorpus`).
        hooks: hook names with a layer index (or global ones such as `hook_embed`); activations must have
            axes `batch pos ...`.
        context_size: tokens per row fed to the model.
        batch_size: activations per training batch.
        buffer_sequences: rows whose activations are shuffled together (a multiple of `forward_batch`).
        forward_batch: rows per forward call.
        key: an int seed for the data order.
        exclude_bos: leave out the activations at position 0 (the BOS token).
        exclude_token_ids: leave out the positions holding these token ids (SAELens's
            `exclude_special_tokens`; `special_token_ids(tokenizer)` for its `True`).
        exclude_norm_ratio: leave out the positions whose norm at any hook exceeds this multiple (> 1) of that
            hook's median norm over the shuffle buffer (None: off).
        exclude_reserve: the share of each buffer held in reserve for exclusions (default EXCLUDE_RESERVE
            when an exclusion is on, else 0).
        dtype: dtype of the returned activations.

    Raises:
        UnknownHookError: a hook the model lacks.
        InputError: a hook without a `pos` axis, bad sizes, a buffer smaller than one batch, bad exclusion
            arguments; from `buffer`, a buffer that leaves out more than the reserve.
        CorpusError: a corpus with fewer rows than one buffer.
    """

    def __init__(self, params: Params, cfg: Config, corpus: TokenCorpus, hooks: Sequence[str], *,
                 context_size: int = 128, batch_size: int = 4096, buffer_sequences: int = 64,
                 forward_batch: int = 16, key: int = 0, exclude_bos: bool = True,
                 exclude_token_ids: Sequence[int] = (), exclude_norm_ratio: float | None = None,
                 exclude_reserve: float | None = None, dtype=jnp.float32):
        if isinstance(hooks, str):
            hooks = (hooks,)
        self.hooks = tuple(hooks)
        if not self.hooks:
            raise InputError("ActivationStore needs at least one hook name; found none.")
        if context_size > cfg.n_ctx:
            raise InputError(f"context_size={context_size} is longer than the model's n_ctx={cfg.n_ctx}.")
        if buffer_sequences < forward_batch or buffer_sequences % forward_batch:
            raise InputError(f"buffer_sequences={buffer_sequences} must be a positive multiple of "
                             f"forward_batch={forward_batch}.")
        self.params, self.cfg, self.corpus = params, cfg, corpus
        self.context_size, self.batch_size, self.key = context_size, batch_size, int(key)
        self.buffer_sequences, self.forward_batch = buffer_sequences, forward_batch
        self.exclude_bos, self.dtype = exclude_bos, dtype
        self.exclude_token_ids, self.exclude_norm_ratio = check_exclusions(
            exclude_token_ids, exclude_norm_ratio, cfg.d_vocab)
        on = bool(self.exclude_token_ids) or self.exclude_norm_ratio is not None
        reserve = (EXCLUDE_RESERVE if on else 0.0) if exclude_reserve is None else exclude_reserve
        if not (isinstance(reserve, (int, float)) and 0 <= reserve < 1):
            raise InputError(f"exclude_reserve must be a fraction in [0, 1); found {exclude_reserve!r}.")
        self.exclude_reserve = float(reserve)
        self.stop_at_layer = _stop_layer(cfg, self.hooks)
        self.widths = dict(zip(self.hooks, _widths(params, cfg, self.hooks), strict=True))
        self.tokens_per_row = context_size - int(exclude_bos)
        n_buf = buffer_sequences * self.tokens_per_row
        if n_buf < batch_size:
            raise InputError(f"A shuffle buffer holds {n_buf} activations ({buffer_sequences} rows of "
                             f"{self.tokens_per_row}), fewer than batch_size={batch_size}. Raise "
                             "buffer_sequences or lower batch_size.")
        self.batches_per_buffer = int(n_buf * (1 - self.exclude_reserve)) // batch_size
        if self.batches_per_buffer == 0:
            raise InputError(f"A shuffle buffer of {n_buf} activations less its exclusion reserve "
                             f"({self.exclude_reserve:.0%}) holds fewer than batch_size={batch_size}. Raise "
                             "buffer_sequences, or lower batch_size or exclude_reserve.")
        self.n_rows = corpus.n_sequences(context_size)
        if self.n_rows < buffer_sequences:
            raise CorpusError(f"The corpus {corpus.name!r} has {self.n_rows} rows of {context_size} "
                              f"tokens, fewer than one shuffle buffer (buffer_sequences={buffer_sequences}). "
                              "Use more text, or lower buffer_sequences or context_size.")
        self._cached: tuple[int, dict] | None = None
        self._counts: dict[int, dict[str, int]] = {}

    @property
    def tokens_per_step(self) -> int:
        """Model tokens read per training batch (activations per batch, BOS positions left out)."""
        return self.batch_size

    def buffer_rows(self, buffer: int) -> np.ndarray:
        """Corpus row indices of shuffle buffer `buffer` (epoch permutations laid end to end)."""
        start = buffer * self.buffer_sequences
        out, pos = [], start
        while pos < start + self.buffer_sequences:
            epoch, offset = divmod(pos, self.n_rows)
            perm = np.random.default_rng([self.key, 0, epoch]).permutation(self.n_rows)
            take = min(self.n_rows - offset, start + self.buffer_sequences - pos)
            out.append(perm[offset:offset + take])
            pos += take
        return np.concatenate(out)

    def buffer(self, buffer: int) -> dict[str, jax.Array]:
        """The shuffled activations of one buffer, excluded positions left out: {hook: [n_kept, d]}
        (n_kept is buffer_sequences * tokens_per_row without exclusions)."""
        if self._cached is not None and self._cached[0] == buffer:
            return self._cached[1]
        tokens = self.corpus.sequences(self.context_size, self.buffer_rows(buffer))
        parts = [activations(self.params, self.cfg, jnp.asarray(tokens[i:i + self.forward_batch]), self.hooks,
                             self.stop_at_layer, self.exclude_bos, self.dtype)
                 for i in range(0, len(tokens), self.forward_batch)]
        acts = {h: jnp.concatenate([p[h] for p in parts]) for h in self.hooks}
        ids = tokens[:, int(self.exclude_bos):].reshape(-1)  # the token at each activation, in the same order
        keep, counts = keep_positions(ids, [jnp.linalg.norm(acts[h], axis=-1) for h in self.hooks],
                                      self.exclude_token_ids, self.exclude_norm_ratio)
        counts = {"bos_position": len(tokens) if self.exclude_bos else 0, **jax.device_get(counts)}
        counts = {k: int(v) for k, v in counts.items()}
        n_kept, need = int(keep.sum()), self.batches_per_buffer * self.batch_size
        if n_kept < need:
            raise InputError(f"Shuffle buffer {buffer} kept {n_kept} of {len(ids)} activations after its "
                             f"exclusions ({counts}), fewer than the {need} its {self.batches_per_buffer} "
                             f"batches need. Raise exclude_reserve (now {self.exclude_reserve}), or exclude "
                             "fewer positions (a larger exclude_norm_ratio, fewer exclude_token_ids).")
        if n_kept < len(ids):
            idx = jnp.asarray(np.flatnonzero(np.asarray(keep)))
            acts = {h: a[idx] for h, a in acts.items()}
        perm = jnp.asarray(np.random.default_rng([self.key, 1, buffer]).permutation(n_kept))
        acts = {h: a[perm] for h, a in acts.items()}
        self._counts[buffer] = counts | {"kept": n_kept}
        self._cached = (buffer, acts)
        return acts

    def exclusion_counts(self) -> dict[str, int]:
        """Positions left out over the buffers this store has built, by reason: {bos_position (row starts),
        special_tokens (exclude_token_ids), high_norm (exclude_norm_ratio), kept, buffers}. Each buffer counts
        once however often it is rebuilt; a resumed run counts only the buffers it builds."""
        out = {"bos_position": 0, "special_tokens": 0, "high_norm": 0, "kept": 0}
        for c in self._counts.values():
            out = {k: out[k] + c[k] for k in out}
        return out | {"buffers": len(self._counts)}

    @property
    def metadata(self) -> dict:
        """The exclusion settings and `exclusion_counts()`, for a run's metadata."""
        return {"exclude_bos": self.exclude_bos, "exclude_token_ids": list(self.exclude_token_ids),
                "exclude_norm_ratio": self.exclude_norm_ratio, "exclude_reserve": self.exclude_reserve,
                "excluded": self.exclusion_counts()}

    def batch(self, step: int) -> dict[str, jax.Array]:
        """The batch of training step `step`: {hook: [batch_size, d]} (a pure function of key and step)."""
        buffer, i = divmod(step, self.batches_per_buffer)
        acts = self.buffer(buffer)
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return {h: a[sl] for h, a in acts.items()}

    def batches(self, start_step: int = 0, stop_step: int | None = None) -> Iterator[tuple[int, dict]]:
        """(step, batch) from `start_step` until `stop_step` (forever when None)."""
        step = start_step
        while stop_step is None or step < stop_step:
            yield step, self.batch(step)
            step += 1


@functools.partial(jax.jit, static_argnames=("cfg", "hooks", "stop_at_layer", "exclude_bos", "dtype"))
def activations(params: Params, cfg: Config, tokens: jax.Array, hooks: tuple[str, ...], stop_at_layer,
                exclude_bos: bool, dtype) -> dict[str, jax.Array]:
    """{hook: [rows * positions, d]} from one forward of `tokens` [rows pos] that stops after the last layer
    needed (position 0 dropped with `exclude_bos`; trailing axes flattened)."""
    _, cache, _ = run(params, cfg, tokens, cache_names=hooks, stop_at_layer=stop_at_layer)
    out = {}
    for h in hooks:
        a = cache[h][:, 1:] if exclude_bos else cache[h]
        out[h] = a.reshape(a.shape[0] * a.shape[1], -1).astype(dtype)
    return out


def keep_positions(tokens, norms: Sequence, exclude_token_ids: Sequence[int] = (),
                   exclude_norm_ratio: float | None = None, candidates=None):
    """Which positions to keep, and how many each rule leaves out (jit-friendly; the store and `evals` both
    use it, so training and evaluation leave out the same kind of positions).

    Args:
        tokens: int token ids, any shape S.
        norms: one array of shape S per hook: the activation norm at each position.
        exclude_token_ids: ids whose positions are left out.
        exclude_norm_ratio: leave out positions whose norm at any hook exceeds this multiple of that hook's
            median norm over the candidate positions not left out by token id (None: off).
        candidates: bool S, the positions considered at all (default all); the others are neither kept nor
            counted.

    Returns:
        (keep: bool S, {"special_tokens": count, "high_norm": count}).
    """
    tokens = jnp.asarray(tokens)
    cand = jnp.ones(tokens.shape, bool) if candidates is None else jnp.asarray(candidates, bool)
    special = cand & jnp.isin(tokens, jnp.asarray(exclude_token_ids, tokens.dtype)) if exclude_token_ids \
        else jnp.zeros(tokens.shape, bool)
    rest = cand & ~special
    high = jnp.zeros(tokens.shape, bool)
    if exclude_norm_ratio is not None:
        for n in norms:
            n = jnp.asarray(n, jnp.float32)
            median = jnp.nanmedian(jnp.where(rest, n, jnp.nan))
            high = high | (rest & (n > exclude_norm_ratio * median))
    counts = {"special_tokens": special.sum(), "high_norm": high.sum()}
    return rest & ~high, counts


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids SAELens 6 leaves out with `exclude_special_tokens=True`: the tokenizer's BOS, EOS, PAD, SEP and
    decoder-start ids (`SPECIAL_TOKEN_ATTRS`, those it has), sorted."""
    ids = {getattr(tokenizer, a, None) for a in SPECIAL_TOKEN_ATTRS}
    return tuple(sorted(int(i) for i in ids if i is not None))


def check_exclusions(exclude_token_ids, exclude_norm_ratio,
                     d_vocab: int) -> tuple[tuple[int, ...], float | None]:
    """(token ids as a sorted tuple, the ratio as a float) after checking them.

    Raises:
        InputError: ids that are not integers in [0, d_vocab), or a ratio that is not a number above 1.
    """
    if isinstance(exclude_token_ids, (str, bytes)) or not hasattr(exclude_token_ids, "__iter__"):
        raise InputError(f"exclude_token_ids must be a sequence of token ids; found {exclude_token_ids!r}. "
                         "Pass e.g. special_token_ids(tokenizer) or [0].")
    ids = tuple(exclude_token_ids)
    bad = [i for i in ids
           if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < d_vocab]
    if bad:
        raise InputError(f"exclude_token_ids must be integer token ids in [0, {d_vocab}); found {bad[0]!r}.")
    ratio = exclude_norm_ratio
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not ratio > 1 or not np.isfinite(ratio)):
        raise InputError(f"exclude_norm_ratio is a multiple of the median norm and must be a finite number "
                         f"above 1 (or None: off); found {ratio!r}. A ratio of 1 would drop half the tokens.")
    return tuple(sorted({int(i) for i in ids})), None if ratio is None else float(ratio)


def _stop_layer(cfg: Config, hooks: Sequence[str]) -> int | None:
    """The smallest stop_at_layer that computes every hook (None: the whole model)."""
    table = hook_names.decoder_table(cfg)
    stop = 0
    for h in hooks:
        layer, rel = table.parse(h)
        if layer == "all":
            raise InputError(f"Hook {h!r} names every layer; the store needs one layer per name "
                             f"(e.g. 'blocks.0.{rel}'). List the layers you want.")
        if layer is None:
            if any(rel == n for n, _ in table.after):
                return None
            continue
        stop = max(stop, layer + 1)
    return stop


def _widths(params: Params, cfg: Config, hooks: Sequence[str]) -> list[int]:
    """The flattened width of each hook's activation per token."""
    table = hook_names.decoder_table(cfg)
    for h in hooks:
        axes = table.axes(h).split()
        if axes[:2] != ["batch", "pos"]:
            raise InputError(f"Hook {h!r} has axes {' '.join(axes)!r}; the store needs activations per token "
                             "('batch pos ...'): pick a hook such as 'blocks.0.hook_resid_post'.")
    shapes = jax.eval_shape(lambda p: activations(p, cfg, jnp.zeros((1, 2), jnp.int32), tuple(hooks),
                                                  _stop_layer(cfg, hooks), False, jnp.float32), params)
    return [int(shapes[h].shape[-1]) for h in hooks]

