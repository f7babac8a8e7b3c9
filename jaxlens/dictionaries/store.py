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
        dtype: dtype of the returned activations.

    Raises:
        UnknownHookError: a hook the model lacks.
        InputError: a hook without a `pos` axis, bad sizes, a buffer smaller than one batch.
        CorpusError: a corpus with fewer rows than one buffer.
    """

    def __init__(self, params: Params, cfg: Config, corpus: TokenCorpus, hooks: Sequence[str], *,
                 context_size: int = 128, batch_size: int = 4096, buffer_sequences: int = 64,
                 forward_batch: int = 16, key: int = 0, exclude_bos: bool = True, dtype=jnp.float32):
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
        self.stop_at_layer = _stop_layer(cfg, self.hooks)
        self.widths = dict(zip(self.hooks, _widths(params, cfg, self.hooks), strict=True))
        self.tokens_per_row = context_size - int(exclude_bos)
        n_buf = buffer_sequences * self.tokens_per_row
        if n_buf < batch_size:
            raise InputError(f"A shuffle buffer holds {n_buf} activations ({buffer_sequences} rows of "
                             f"{self.tokens_per_row}), fewer than batch_size={batch_size}. Raise "
                             "buffer_sequences or lower batch_size.")
        self.batches_per_buffer = n_buf // batch_size
        self.n_rows = corpus.n_sequences(context_size)
        if self.n_rows < buffer_sequences:
            raise CorpusError(f"The corpus {corpus.name!r} has {self.n_rows} rows of {context_size} "
                              f"tokens, fewer than one shuffle buffer (buffer_sequences={buffer_sequences}). "
                              "Use more text, or lower buffer_sequences or context_size.")
        self._cached: tuple[int, dict] | None = None

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
        """The shuffled activations of one buffer: {hook: [buffer_sequences * tokens_per_row, d]}."""
        if self._cached is not None and self._cached[0] == buffer:
            return self._cached[1]
        tokens = self.corpus.sequences(self.context_size, self.buffer_rows(buffer))
        parts = [activations(self.params, self.cfg, jnp.asarray(tokens[i:i + self.forward_batch]), self.hooks,
                             self.stop_at_layer, self.exclude_bos, self.dtype)
                 for i in range(0, len(tokens), self.forward_batch)]
        acts = {h: jnp.concatenate([p[h] for p in parts]) for h in self.hooks}
        perm = jnp.asarray(np.random.default_rng([self.key, 1, buffer]).permutation(len(acts[self.hooks[0]])))
        acts = {h: a[perm] for h, a in acts.items()}
        self._cached = (buffer, acts)
        return acts

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

