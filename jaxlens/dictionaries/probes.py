"""Linear probes: a logistic or linear read-out trained on cached activations, to ask whether (and where) a
model represents a property linearly (Alain & Bengio 2016, "Understanding intermediate layers using linear
classifier probes"), and the probe's direction as a steering vector.

    _, cache = forward(params, cfg, tokens, cache_names=("blocks.hook_resid_post",))
    x = probe_inputs(cache, "blocks.hook_resid_post", pos=-1)      # [layer batch d_model]: every layer
    fits = train_probes(x, labels, key=jax.random.key(0))          # one vmapped, jitted fit for all layers
    fits.test_score                                                # [layer]: held-out accuracy
    probe = fits.probes[12]
    logits, _ = forward(params, cfg, tokens, interventions=probe.steer(cfg, "blocks.12.hook_resid_post", 4.0))

A probe is an NNX module (`W [d_in n_out]`, `b [n_out]`); training works on its split state, a pytree, so the
same function fits one layer or, under `jax.vmap` over a leading layer axis, every layer at once. Training is
full-batch (probes are small and activations fit in memory), with optax (Adam by default) and an L2 penalty on
W, from W = 0 (the problem is convex, so no random start is needed); the held-out split is drawn once from
`key` and shared by every layer, so the layers' scores compare like with like.
"""

import dataclasses
import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.interventions import Add
from jaxlens.shapes import AnyArray

# einsum letters: n=example d=d_in o=n_out


class Probe(nnx.Module):
    """y = x @ W + b on activations of width `d_in`.

    kind "logistic": with n_out 1 a binary classifier (the logit of class 1), with n_out > 1 a softmax over
    n_out classes. kind "linear": a regression onto n_out targets.
    """

    def __init__(self, d_in: int, n_out: int = 1, *, kind: str = "logistic"):
        if kind not in ("logistic", "linear"):
            raise InputError(f"A probe's kind is 'logistic' or 'linear'; found {kind!r}.")
        if d_in < 1 or n_out < 1:
            raise InputError(f"A probe needs d_in >= 1 and n_out >= 1; found d_in={d_in}, n_out={n_out}.")
        self.kind = kind
        self.W = nnx.Param(jnp.zeros((d_in, n_out), jnp.float32))
        self.b = nnx.Param(jnp.zeros((n_out,), jnp.float32))

    @property
    def d_in(self) -> int:
        return self.W.shape[0]

    def __call__(self, x: Float[AnyArray, "... d_in"]) -> Float[Array, "... n_out"]:
        """Logits (kind "logistic") or predictions (kind "linear")."""
        _check_width(x, self.d_in)
        return jnp.einsum("...d,do->...o", x.astype(jnp.float32), self.W[...]) + self.b[...]

    def predict(self, x: Float[AnyArray, "... d_in"]) -> Array:
        """Class ids (logistic: [...]) or the regression output (linear: [... n_out])."""
        return _predict(self.kind, self(x))

    def direction(self, index: int = 0) -> Float[Array, " d_in"]:
        """The unit vector along which output `index` grows fastest (W[:, index] normalised)."""
        w = self.W[...][:, index]
        return w / jnp.linalg.norm(w)

    def steer(self, cfg: Config, hook: str, alpha: float, *, index: int = 0,
              mask: AnyArray | None = None) -> dict[str, Add]:
        """An intervention adding `alpha` times the probe's unit direction at `hook` (one layer's name).

        It raises output `index` by alpha * |W[:, index]| where it is read at that hook.

        Args:
            cfg: the model's config (to check the hook exists and has the probe's width).
            hook: a hook with a layer index (`blocks.12.hook_resid_post`) or a global one.
            alpha: the steering strength, in units of the activation.
            index: which output's direction.
            mask: where to add (broadcasts against the activation, e.g. [batch pos 1]); None: everywhere.

        Returns:
            {hook: Add}, for `forward(..., interventions=...)`.

        Raises:
            UnknownHookError: a hook the model lacks. InputError: a layer-free name, or a width mismatch.
        """
        layer, _ = hook_names.parse(cfg, hook)
        if layer == "all":
            raise InputError(f"steer adds one direction at one layer; {hook!r} addresses every layer. "
                             "Name the layer, e.g. 'blocks.3.hook_resid_post'.")
        width = hook_width(cfg, hook)
        if width != self.d_in:
            raise InputError(f"This probe reads activations of width {self.d_in}, but {hook!r} has width "
                             f"{width}. Steer at a hook of the width the probe was trained on.")
        mask = None if mask is None else jnp.asarray(mask)
        return {hook: Add(delta=alpha * self.direction(index), mask=mask)}


@dataclasses.dataclass(frozen=True)
class ProbeFit:
    """A trained probe (or one per layer) and how well it does.

    probes: one Probe, or a list with one per layer (`train_probes`). train_score / test_score: accuracy
    (logistic) or R^2 (linear) on the training and held-out examples ([] or [layer]). losses: the training
    loss at each step ([steps] or [layer steps]). metric: "accuracy" or "r2".
    """

    probes: Probe | list[Probe]
    train_score: Array
    test_score: Array
    losses: Array
    metric: str


def train_probe(x: AnyArray, labels: AnyArray, *, kind: str = "logistic",
                n_out: int | None = None, key: Array | None = None, test_fraction: float = 0.2,
                steps: int = 500, learning_rate: float = 1e-2, weight_decay: float = 1e-4,
                optimizer: optax.GradientTransformation | None = None) -> ProbeFit:
    """Fit one probe on activations `x` (examples on the first axis).

    Args:
        x: activations [n d_in] (`probe_inputs` gathers them from a cache).
        labels: logistic: class ids [n] (ints or bools); linear: targets [n] or [n n_out].
        kind: "logistic" or "linear".
        n_out: outputs (default: 1 for two classes or one target; the class count or target width otherwise).
        key: draws the held-out split (default key 0).
        test_fraction: share of examples held out (0 < test_fraction < 1).
        steps, learning_rate, weight_decay: full-batch optax steps (Adam unless `optimizer`), the L2 penalty
            weight_decay * |W|^2 / 2 on the weights (not the bias).
        optimizer: any optax transformation instead of Adam.

    Returns:
        ProbeFit with one Probe.

    Raises:
        InputError: x not [n d_in], labels of the wrong shape or type, too few examples to hold out.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise InputError(f"train_probe takes activations [n d_in]; found shape {x.shape}. For [layer n d_in] "
                         "use train_probes; flatten batch and position axes first (probe_inputs does).")
    fit = train_probes(x[None], labels, kind=kind, n_out=n_out, key=key, test_fraction=test_fraction,
                       steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
                       optimizer=optimizer)
    return ProbeFit(fit.probes[0], fit.train_score[0], fit.test_score[0], fit.losses[0], fit.metric)


def train_probes(x: AnyArray, labels: AnyArray, *, kind: str = "logistic",
                 n_out: int | None = None, key: Array | None = None, test_fraction: float = 0.2,
                 steps: int = 500, learning_rate: float = 1e-2, weight_decay: float = 1e-4,
                 optimizer: optax.GradientTransformation | None = None) -> ProbeFit:
    """Fit one probe per layer at once: the fit of `train_probe` vmapped over the leading layer axis, in one
    compiled program. The labels and the held-out split are shared by every layer.

    Args:
        x: activations [layer n d_in] (e.g. `probe_inputs(cache, "blocks.hook_resid_post", pos=-1)`).
        labels, kind, n_out, key, test_fraction, steps, learning_rate, weight_decay, optimizer: as
            `train_probe`.

    Returns:
        ProbeFit with a list of Probes (one per layer) and scores and losses with a leading layer axis.

    Raises:
        InputError: as `train_probe`.
    """
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise InputError(f"train_probes takes activations [layer n d_in]; found shape {x.shape}.")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be between 0 and 1 (exclusive); found {test_fraction}.")
    y, n_out = _labels(labels, kind, n_out, x.shape[1])
    n = x.shape[1]
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise InputError(f"{n} examples with test_fraction={test_fraction} leave {n - n_test} to train on "
                         f"and {n_test} to test on; both need at least one. Give more examples.")
    key = jax.random.key(0) if key is None else key
    order = jax.random.permutation(key, n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    opt = optimizer if optimizer is not None else _adam(float(learning_rate))
    graphdef, state = nnx.split(Probe(x.shape[-1], n_out, kind=kind))
    states, losses, train_s, test_s = _fit_all(graphdef, state, x.astype(jnp.float32), y, train_idx, test_idx,
                                               opt, steps, jnp.float32(weight_decay))
    probes = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], states)) for i in range(x.shape[0])]
    return ProbeFit(probes, train_s, test_s, losses, "accuracy" if kind == "logistic" else "r2")


def probe_inputs(cache: Mapping[str, AnyArray], hook: str, pos: int | slice | None = None) -> Array:
    """Activations at `hook` as probe inputs: batch and position flattened into examples.

    Args:
        cache: an ActivationCache or a {name: array} from `forward(..., cache_names=...)`.
        hook: a hook with axes "batch pos width" (`blocks.3.hook_resid_post`), or its layer-free name
            (`blocks.hook_resid_post`, stacked [layer batch pos width]) for every layer at once.
        pos: keep only this position (an int: one example per sequence) or slice; None: every position.

    Returns:
        [n width], or [layer n width] for a stacked name.

    Raises:
        InputError: the activation is not [(layer) batch pos width].
    """
    a = jnp.asarray(cache[hook])
    lead = 1 if hook.startswith("blocks.") and not re.match(r"blocks\.-?\d+\.", hook) else 0
    if a.ndim != 3 + lead:
        want = "[layer batch pos width]" if lead else "[batch pos width]"
        raise InputError(f"probe_inputs needs {want} at {hook!r}; found shape {a.shape}. Reshape hooks with "
                         "a head axis (attn.hook_z: [batch pos head d_head]) to the examples you want first.")
    if pos is not None:
        a = a[..., pos, :] if isinstance(pos, slice) else a[..., pos, :][..., None, :]
    return a.reshape(a.shape[:lead] + (-1, a.shape[-1]))


def hook_width(cfg: Config, hook: str) -> int:
    """The size of the last axis of a hook's activation (d_model, d_mlp, d_head, d_vocab)."""
    last = hook_names.hook_axes(cfg, hook).split()[-1]
    sizes = {"d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "d_head": cfg.d_head, "d_vocab": cfg.d_vocab}
    if last not in sizes:
        raise InputError(f"{hook!r} ends in the axis {last!r}, not a feature width; probe a hook whose last "
                         "axis is d_model, d_mlp, d_head or d_vocab.")
    return sizes[last]


# -- private -------------------------------------------------------------------------------------------------


def _check_width(x: Array, d_in: int) -> None:
    if x.shape[-1] != d_in:
        raise InputError(f"The probe reads activations of width {d_in}; found shape {x.shape} (last axis "
                         f"{x.shape[-1]}). Give activations from the hook the probe was trained on.")


def _labels(labels, kind: str, n_out: int | None, n: int) -> tuple[Array, int]:
    """Labels as the loss reads them: int class ids [n] (logistic) or float targets [n n_out] (linear)."""
    y = np.asarray(labels)
    if y.shape[:1] != (n,):
        raise InputError(f"labels must have one entry per example ({n}); found shape {y.shape}.")
    if kind == "logistic":
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
            raise InputError(f"Logistic probe labels are class ids [n] (ints or bools); found shape "
                             f"{y.shape} and dtype {y.dtype}. For real-valued targets use kind='linear'.")
        y = y.astype(np.int32)
        if y.min() < 0:
            raise InputError(f"Class ids must be >= 0; found {int(y.min())}.")
        n_classes = int(y.max()) + 1 if n_out is None else (2 if n_out == 1 else n_out)
        n_classes = max(n_classes, 2)
        if y.max() >= n_classes:
            raise InputError(f"labels hold class {int(y.max())}, but the probe has {n_classes} classes "
                             f"(n_out={n_out}). Leave n_out unset or raise it.")
        return jnp.asarray(y), 1 if n_classes == 2 else n_classes
    if y.ndim not in (1, 2) or not np.issubdtype(y.dtype, np.number):
        raise InputError(f"Linear probe targets are numbers [n] or [n n_out]; found shape {y.shape}, dtype "
                         f"{y.dtype}.")
    y = y.reshape(n, -1).astype(np.float32)
    if n_out is not None and n_out != y.shape[1]:
        raise InputError(f"n_out={n_out}, but the targets have width {y.shape[1]}.")
    return jnp.asarray(y), y.shape[1]


@functools.lru_cache(maxsize=32)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    """One Adam per learning rate: the same object, so repeated fits reuse the compiled program."""
    return optax.adam(learning_rate)


def _predict(kind: str, out: Array) -> Array:
    if kind == "linear":
        return out
    return (out[..., 0] > 0).astype(jnp.int32) if out.shape[-1] == 1 else out.argmax(-1).astype(jnp.int32)


def _loss(kind: str, out: Array, y: Array) -> Array:
    if kind == "linear":
        return jnp.mean((out - y) ** 2)
    if out.shape[-1] == 1:
        return optax.sigmoid_binary_cross_entropy(out[..., 0], y.astype(jnp.float32)).mean()
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def _score(kind: str, out: Array, y: Array) -> Array:
    if kind == "logistic":
        return jnp.mean((_predict(kind, out) == y).astype(jnp.float32))
    resid = jnp.sum((out - y) ** 2)
    total = jnp.sum((y - y.mean(0)) ** 2)
    return 1.0 - resid / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _fit_all(graphdef, state, x, y, train_idx, test_idx, opt, steps, weight_decay):
    kind = nnx.merge(graphdef, state).kind

    def fit_one(x_layer):
        xtr, ytr = x_layer[train_idx], y[train_idx]

        def loss_fn(s):
            out = nnx.merge(graphdef, s)(xtr)
            return _loss(kind, out, ytr) + 0.5 * weight_decay * jnp.sum(s["W"][...] ** 2)

        def step(carry, _):
            s, o = carry
            loss, g = jax.value_and_grad(loss_fn)(s)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
                upd, o = opt.update(g, o, s)
            return (optax.apply_updates(s, upd), o), loss

        (s, _), losses = jax.lax.scan(step, (state, opt.init(state)), None, length=steps)
        probe = nnx.merge(graphdef, s)
        return (s, losses, _score(kind, probe(xtr), ytr),
                _score(kind, probe(x_layer[test_idx]), y[test_idx]))

    return jax.vmap(fit_one)(x)
