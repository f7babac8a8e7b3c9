"""Which logits does a metric read? Compute only those.

A patching metric usually reads a handful of logits (`logits[:, -1, answer] - logits[:, -1, wrong]`), yet the
unembedding of every position and every vocabulary entry is about a third of a GPT-2-small forward, and XLA
does not push a gather through the matmul that produced its operand. This module reads the metric's jaxpr:
when every use of the logits is pure data movement with indices fixed in advance (static slices, squeezes,
reshapes, gathers and dynamic slices whose indices do not depend on the logits), it finds the (position,
vocabulary) entries the metric can see and rebuilds the metric as a function of a small rectangle of logits,
`[batch, len(positions), len(vocab)]`. Anything else (a `log_softmax` over the whole vocabulary, say) still
restricts the positions when it is reached through a slice, and falls back to full logits otherwise.

The rebuilt metric is checked against the original on real logits before a sweep uses it.

    reads = analyse(metric, (batch, pos, d_vocab), jnp.float32)
    if reads is not None:
        value = reads(sub_logits)   # sub_logits[b, i, j] = logits[b, reads.positions[i], reads.vocab[j]]
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Primitives that only move or select elements (their outputs are elements of their first operand).
_MOVES = frozenset({"slice", "squeeze", "reshape", "broadcast_in_dim", "transpose", "rev", "gather",
                    "dynamic_slice", "concatenate", "copy", "copy_p", "expand_dims"})
_SUBCALLS = ("jaxpr", "call_jaxpr")  # params holding the body of jit / custom_jvp / custom_vjp calls


class _GiveUp(Exception):
    """The metric reads the logits in a way this analysis does not follow."""


@dataclasses.dataclass(frozen=True)
class _Idx:
    """A value that is a rearrangement of logits entries: flat indices into the logits, and its dtype."""

    idx: np.ndarray
    dtype: object


@dataclasses.dataclass(frozen=True)
class _Known:
    """A value that does not depend on the logits (computed from constants at analysis time)."""

    value: object


@dataclasses.dataclass(frozen=True, eq=False)
class LogitReads:
    """The logits a metric reads, and the metric as a function of just those.

    Attributes:
        shape: the full logits shape (batch, pos, d_vocab).
        positions: sorted positions read.
        vocab: sorted vocabulary ids read, or None for the whole vocabulary.
    """

    metric: Callable
    shape: tuple[int, int, int]
    positions: np.ndarray
    vocab: np.ndarray | None
    closed: object  # the metric's ClosedJaxpr

    def _key(self):
        vocab = None if self.vocab is None else self.vocab.tobytes()
        return (self.metric, self.shape, self.positions.tobytes(), vocab)

    def __eq__(self, other):  # by value, so compiled sweeps are reused across calls with the same metric
        return isinstance(other, LogitReads) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __call__(self, sub_logits: jax.Array) -> jax.Array:
        """The metric's value from `sub_logits[b, i, j] = logits[b, positions[i], vocab[j]]`."""
        b, P, V = self.shape
        n_pos = len(self.positions)
        n_voc = V if self.vocab is None else len(self.vocab)
        pos_rank = np.zeros(P, np.int64)
        pos_rank[self.positions] = np.arange(n_pos)
        voc_rank = np.arange(V) if self.vocab is None else np.zeros(V, np.int64)
        if self.vocab is not None:
            voc_rank[self.vocab] = np.arange(n_voc)
        flat = sub_logits.reshape(-1)

        def materialise(x: _Idx):
            bi, rest = np.divmod(x.idx, P * V)
            pi, vi = np.divmod(rest, V)
            where = bi * (n_pos * n_voc) + pos_rank[pi] * n_voc + voc_rank[vi]
            return flat[jnp.asarray(where, jnp.int32)].astype(x.dtype)

        (out,) = _interpret(self.closed.jaxpr, self.closed.consts,
                            [_Idx(_iota(self.shape), sub_logits.dtype)], materialise)
        return _value(out)


def analyse(metric: Callable, shape: tuple[int, int, int], dtype) -> LogitReads | None:
    """The logits `metric` reads, or None when it reads (or may read) all of them.

    Args:
        metric: a function of logits [batch pos d_vocab] returning an array.
        shape: the logits shape.
        dtype: the logits dtype.
    """
    if int(np.prod(shape)) >= 2**31:
        return None
    try:
        closed = jax.make_jaxpr(metric)(jax.ShapeDtypeStruct(shape, dtype))
    except Exception:  # noqa: BLE001 - a metric that does not trace here is reported by the sweep itself
        return None
    if len(closed.jaxpr.outvars) != 1:
        return None
    seen: list[np.ndarray] = []

    def record(x: _Idx):
        seen.append(x.idx.reshape(-1))
        return jnp.zeros(x.idx.shape, x.dtype)

    try:
        with jax.ensure_compile_time_eval():
            _interpret(closed.jaxpr, closed.consts, [_Idx(_iota(shape), dtype)], record)
    except _GiveUp:
        return None
    if not seen:
        return None
    flat = np.unique(np.concatenate(seen))
    rest = flat % (shape[1] * shape[2])
    positions, vocab = np.unique(rest // shape[2]), np.unique(rest % shape[2])
    if 2 * len(vocab) > shape[2]:
        vocab = None
    if vocab is None and len(positions) == shape[1]:
        return None
    return LogitReads(metric, tuple(shape), positions, vocab, closed)


def _iota(shape) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)


def _value(x):
    return x.value if isinstance(x, _Known) else x


def _interpret(jaxpr, consts, args, materialise):
    """Evaluate `jaxpr`, keeping logits-derived data movement symbolic (as _Idx) until something computes."""
    env = {}

    def read(v):
        return _Known(v.val) if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = _Known(c)
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if any(isinstance(x, _Idx) for x in ins):
            outs = _tracked(eqn, ins, materialise)
        else:
            outs = _bind(eqn, ins)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    outs = [read(v) for v in jaxpr.outvars]
    return [materialise(o) if isinstance(o, _Idx) else o for o in outs]


def _tracked(eqn, ins, materialise):
    """One equation with a logits-derived input: follow it symbolically if it only moves data."""
    name = eqn.primitive.name
    sub = next((eqn.params[k] for k in _SUBCALLS if k in eqn.params), None)
    if sub is not None and hasattr(sub, "jaxpr"):
        return _interpret(sub.jaxpr, sub.consts, ins, materialise)
    if name == "convert_element_type" and len(ins) == 1:
        return [_Idx(ins[0].idx, eqn.params["new_dtype"])]
    rest_known = all(isinstance(x, _Known) for x in ins[1:])
    if name in _MOVES and isinstance(ins[0], _Idx) and (rest_known or name == "concatenate"):
        if name == "concatenate" and not all(isinstance(x, _Idx) for x in ins):
            return _bind(eqn, [materialise(x) if isinstance(x, _Idx) else x for x in ins])
        params = dict(eqn.params)
        if name == "gather":
            params["fill_value"] = -1
        with jax.ensure_compile_time_eval():
            out = eqn.primitive.bind(*[jnp.asarray(x.idx) if isinstance(x, _Idx) else _value(x) for x in ins],
                                     **params)
        out = np.asarray(out)
        if name == "gather" and (out < 0).any():
            raise _GiveUp  # out-of-bounds reads fill in a value: follow the real computation instead
        return [_Idx(out, ins[0].dtype)]
    return _bind(eqn, [materialise(x) if isinstance(x, _Idx) else x for x in ins])


def _bind(eqn, ins):
    """Apply the primitive; constant-only inputs are evaluated now and stay known."""
    bp = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bp if isinstance(bp, tuple) else ((), bp)  # older jax returns (subfuns, params)
    known = all(isinstance(x, _Known) for x in ins)
    vals = [_value(x) for x in ins]
    if known:
        with jax.ensure_compile_time_eval():
            out = eqn.primitive.bind(*subfuns, *vals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *vals, **params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [_Known(o) for o in outs] if known else list(outs)
