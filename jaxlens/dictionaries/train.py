"""Training dictionaries with optax: one step, vmapped over a stack of same-shaped dictionaries, sharded
over a `data` mesh axis, checkpointed atomically and resumed exactly.

    store = ActivationStore(params, cfg, corpus, ["blocks.3.hook_resid_post"], batch_size=4096)
    result = train_dictionaries([sae_cfg], store.batch, TrainConfig(steps=500), out_dir="run")
    sae = result.dictionaries[0]          # scaling folded in: reads raw activations

The recipe is SAELens 6.x's (shared/RESEARCH.md 2.3): Adam (0.9, 0.999) after global-norm gradient clipping
(1.0); a learning rate with linear warm-up and a linear decay to zero over the last `lr_decay_steps`; sparsity
coefficients warmed up linearly from 0; inputs (and a transcoder's targets) scaled so their mean norm is
sqrt(width) ("expected_average_only_in"), the factor estimated on the first batches and folded into the
weights at the end (`fold_scaling`); decoder rows left free, as SAELens 6's trainer leaves them (a TopK SAE
trained with `rescale_acts_by_decoder_norm` is invariant to their norms, which are folded in when it is
saved), or, with `normalise_decoder`, rescaled to unit norm after each step for the architectures whose loss
is not weighted by decoder norms (`DECODER_NORMALISED`); a feature is dead after `dead_feature_window` steps
without firing, and the dead mask feeds AuxK and the pre-activation loss.

Several dictionaries of one shape (an SAE per layer, a transcoder per layer) train together: their states are
stacked on a leading axis and one `jax.vmap`ped step updates all of them from one batch of activations (one
forward of the model feeds every hook). The batch axis is sharded over every local device
(`NamedSharding(Mesh(devices, ("data",)), P(None, "data"))`), the state replicated; XLA inserts the gradient
all-reduce, so the same code runs on CPU, GPU and TPU. Data order and state are pure functions of the seed and
the step (`ActivationStore.batch(step)`), so a run resumed from a checkpoint (state, optimiser state,
dead-feature counters, scaling factors, step) equals an uninterrupted one exactly.

A TopK SAE trains with a sparse step while none of its features is dead (AuxK is then 0): the k active
features of each vector are decoded from k gathered decoder rows and the backward pass scatters into the
rows that fired, instead of multiplying dense [batch d_sae] matrices (about 5x faster on CPU at d_sae 4608,
k 32); once a feature dies the step switches to the dense loss with AuxK (`jax.lax.cond`).

A NaN or inf in the activations stops training with `NonFiniteActivationsError`, naming the step and the hook;
the update of that step is discarded and checkpoints already written are kept.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlens._atomic import atomic_dir
from jaxlens.dictionaries import base
from jaxlens.dictionaries.base import Dictionary, DictionaryConfig, DictionaryError
from jaxlens.errors import InputError, JaxlensError

CHECKPOINT = "checkpoint"
_FORMAT = "jaxlens-dictionary-training-v1"


class NonFiniteActivationsError(JaxlensError, FloatingPointError):
    """NaN or inf in the activations (or the loss) during training."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings (SAELens's names and defaults where it has them).

    Attributes:
        steps: training steps (batches).
        lr, adam_beta1, adam_beta2: Adam.
        lr_warm_up_steps: linear warm-up from lr / lr_warm_up_steps to lr.
        lr_decay_steps: linear decay to 0 over the last lr_decay_steps steps.
        clip_grad_norm: global-norm gradient clipping (per dictionary); None: off.
        coefficients: loss-term weights ((name, value) pairs: "l1", "sparsity", "auxk", "pre_act").
        coefficient_warm_up_steps: the coefficients rise linearly from 0 over these steps.
        dead_feature_window: steps without firing after which a feature counts as dead.
        normalise_activations: scale inputs (and targets) to mean norm sqrt(width), folded in at the end.
        normalise_decoder: unit-norm decoder rows after every step (topk, batchtopk); off by default, as in
            SAELens 6.
        n_batches_for_norm_estimate: batches the scaling factors are estimated on.
        checkpoint_every: write a checkpoint every this many steps (0: only at the end of an out_dir run).
        seed: initialises the dictionaries (the data order is the batch source's).
    """

    steps: int
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    clip_grad_norm: float | None = 1.0
    coefficients: tuple[tuple[str, float], ...] = ()
    coefficient_warm_up_steps: int = 0
    dead_feature_window: int = 1000
    normalise_activations: bool = True
    normalise_decoder: bool = False
    n_batches_for_norm_estimate: int = 10
    checkpoint_every: int = 0
    seed: int = 0


@dataclasses.dataclass
class TrainResult:
    """What training returns: the dictionaries (scaling folded in), per-step metrics, the scaling factors."""

    dictionaries: list[Dictionary]
    history: list[dict[str, Any]]
    scale_in: np.ndarray
    scale_out: np.ndarray
    steps: int


Batches = Callable[[int], Mapping[str, jax.Array]]


def train_dictionaries(cfgs: Sequence[DictionaryConfig] | DictionaryConfig, batches: Batches,
                       train_cfg: TrainConfig, *, out_dir: str | Path | None = None, resume: bool = True,
                       n_devices: int | None = None, progress: bool = False,
                       on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train one dictionary per config, all together (see the module docstring).

    Args:
        cfgs: dictionary configs that differ only in their hook names (stacked and vmapped).
        batches: step -> {hook name: [batch d]} (`ActivationStore.batch`); each config reads `hook_name` and
            a transcoder's target is `hook_name_out`.
        train_cfg: the optimisation settings.
        out_dir: where checkpoints go (`out_dir/checkpoint`); with resume, an existing checkpoint continues.
        n_devices: shard the batch over the first n local devices (default: all).
        progress: show a tqdm bar with loss, L0, explained variance and dead features.
        on_step: called as on_step(step, metrics) after each step (metrics: host floats per dictionary).

    Returns:
        TrainResult.

    Raises:
        DictionaryError: configs of different shapes, or a hook missing from the batches.
        InputError: a batch that does not split over the devices.
        NonFiniteActivationsError: NaN or inf in a batch or the loss (the step and hook are named).
    """
    cfgs = (cfgs,) if isinstance(cfgs, DictionaryConfig) else tuple(cfgs)
    _check_stackable(cfgs)
    cfg0 = cfgs[0]
    if cfg0.architecture == "clt":
        raise DictionaryError("train_dictionaries does not train cross-layer transcoders yet (their input is "
                              "every layer at once); train per-layer transcoders instead.")
    ins = [c.hook_name for c in cfgs]
    outs = [c.hook_name_out if c.is_transcoder else c.hook_name for c in cfgs]
    devices = jax.local_devices()[:n_devices] if n_devices else jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(None, "data"))

    def get(step):
        b = batches(step)
        missing = [h for h in ins + outs if h not in b]
        if missing:
            raise DictionaryError(f"The batches have no activations at {missing[0]!r}; they hold "
                                  f"{sorted(b)}. Give the store every hook the dictionaries read and write.")
        x, y = jnp.stack([b[h] for h in ins]), jnp.stack([b[h] for h in outs])
        if x.shape[1] % len(devices):
            raise InputError(f"A batch of {x.shape[1]} activations does not split over {len(devices)} "
                             "devices; make batch_size a multiple of the device count.")
        return jax.device_put(x, sharded), jax.device_put(y, sharded)

    graphdef, state, start = _initial_state(cfgs, train_cfg, get, out_dir if resume else None)
    state = jax.device_put(state, replicated)
    step_fn = _compiled_step(graphdef, cfg0, train_cfg, replicated)
    history = []
    from tqdm.auto import tqdm

    bar = tqdm(total=train_cfg.steps, initial=start, desc="train dictionaries", unit="step",
               disable=not progress)
    try:
        for step in range(start, train_cfg.steps):
            x, y = get(step)
            new_state, m = step_fn(state, x, y, jnp.asarray(step, jnp.int32))
            m = {k: np.asarray(v) for k, v in jax.device_get(m).items()}
            _check_finite(m, step, ins, outs)
            state = new_state
            m["dead_fraction"] = m.pop("n_dead") / cfg0.d_sae
            history.append({"step": step, **{k: v.tolist() for k, v in m.items()}})
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss'].mean():.4g}", l0=f"{m['l0'].mean():.1f}",
                            ev=f"{m['explained_variance'].mean():.3f}",
                            dead=f"{m['dead_fraction'].mean():.2f}")
            done = step + 1
            if out_dir is not None and train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0:
                save_checkpoint(out_dir, state, done, cfgs, train_cfg)
            if on_step is not None:
                on_step(step, m)
    finally:
        bar.close()
    if out_dir is not None:
        save_checkpoint(out_dir, state, train_cfg.steps, cfgs, train_cfg)
    return _result(graphdef, state, cfgs, history, train_cfg.steps)


def load_checkpoint(out_dir: str | Path, cfgs: Sequence[DictionaryConfig], train_cfg: TrainConfig,
                    template: dict) -> tuple[dict, int] | None:
    """(state, step) from `out_dir/checkpoint` (None when there is none).

    Raises:
        DictionaryError: a checkpoint of other dictionaries or settings, or one that is unreadable.
    """
    path = Path(out_dir) / CHECKPOINT
    if not (path / "trainer.json").is_file():
        return None
    from safetensors.numpy import load_file

    meta = json.loads((path / "trainer.json").read_text())
    want = _fingerprint(cfgs, train_cfg)
    if meta.get("format") != _FORMAT or meta.get("fingerprint") != want:
        raise DictionaryError(f"The checkpoint in {path} belongs to another run (other dictionaries or "
                              "training settings, apart from the step count); use another --out, or delete "
                              "it.")
    try:
        arrays = load_file(str(path / "state.safetensors"))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise DictionaryError(f"The checkpoint {path / 'state.safetensors'} cannot be read ({e}); delete it "
                              "to start again.") from e
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [jax.tree_util.keystr(p) for p, _ in leaves if jax.tree_util.keystr(p) not in arrays]
    if missing:
        raise DictionaryError(f"The checkpoint {path} lacks {missing[0]!r}; it was written by another "
                              "version.")
    state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[jax.tree_util.keystr(p)], t.dtype)
                                                   for p, t in leaves])
    return state, int(meta["step"])


def save_checkpoint(out_dir: str | Path, state: dict, step: int, cfgs: Sequence[DictionaryConfig],
                    train_cfg: TrainConfig) -> Path:
    """Write the training state at `step` to `out_dir/checkpoint` atomically (the folder replaced whole)."""
    from safetensors.numpy import save_file

    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    arrays = {jax.tree_util.keystr(p): np.ascontiguousarray(np.asarray(v)) for p, v in leaves}
    with atomic_dir(Path(out_dir) / CHECKPOINT) as tmp:
        save_file(arrays, str(tmp / "state.safetensors"))
        meta = {"format": _FORMAT, "step": step, "fingerprint": _fingerprint(cfgs, train_cfg)}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    return Path(out_dir) / CHECKPOINT


# -- the step ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _compiled_step(graphdef, cfg: DictionaryConfig, tc: TrainConfig, replicated):
    """The jitted, vmapped training step (cached: a rerun with the same settings compiles nothing)."""
    coeffs, tx = dict(tc.coefficients), _optimizer(tc)

    def one(params, rest, opt, since, x, y, step, sparse=False):
        warm = 1.0 if not tc.coefficient_warm_up_steps else jnp.minimum(
            (step + 1).astype(jnp.float32) / tc.coefficient_warm_up_steps, 1.0)
        c = {k: base.coefficient(coeffs, k) * warm for k in base.DEFAULT_COEFFICIENTS}
        dead = since > tc.dead_feature_window
        target = y if cfg.is_transcoder else None

        def loss_fn(p):
            if sparse:
                return _sparse_topk_loss(p, x, cfg)
            return nnx.merge(graphdef, p, rest).training_loss(x, target, coefficients=c, dead_mask=dead)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32 (decay ** count)
            updates, new_opt = tx.update(grads, opt, params)
        new_params = optax.apply_updates(params, updates)
        if tc.normalise_decoder and cfg.architecture in base.DECODER_NORMALISED:
            new_params = base.normalise_decoder(new_params, cfg)
        new_rest = rest
        if "topk_threshold" in aux:
            module = nnx.merge(graphdef, new_params, rest)
            base.apply_updates(module, aux)
            new_rest = nnx.split(module, nnx.Param, ...)[2]
        fired = aux["fired"] if sparse else (aux["acts"] != 0).reshape(-1, cfg.d_sae).any(0)
        new_since = jnp.where(fired, 0, since + 1)
        var = jnp.square(y - y.mean(0)).sum(-1).mean()
        metrics = {"loss": loss, "mse": aux["mse"], "l0": aux["l0"],
                   "explained_variance": 1 - aux["mse"] / var,
                   "n_dead": (new_since > tc.dead_feature_window).sum(),
                   "x_finite": jnp.isfinite(x).all(), "y_finite": jnp.isfinite(y).all(),
                   "loss_finite": jnp.isfinite(loss)}
        metrics |= {k: aux[k] for k in ("l1", "auxk", "sparsity", "pre_act") if k in aux}
        return new_params, new_rest, new_opt, new_since, metrics

    def step_fn(state, x, y, step):
        x, y = x * state["scale_in"][:, None, None], y * state["scale_out"][:, None, None]
        args = (state["params"], state["rest"], state["opt"], state["since_fired"], x, y, step)
        axes = (0, 0, 0, 0, 0, 0, None)
        dense = lambda: jax.vmap(one, in_axes=axes)(*args)  # noqa: E731
        if cfg.architecture == "topk":  # the sparse step while no dictionary has dead features (AuxK is 0),
            # mapped rather than vmapped: batched gathers and scatters are twice as slow on CPU
            sparse = lambda: jax.lax.map(lambda a: one(*a, step, sparse=True), args[:-1])  # noqa: E731
            any_dead = (state["since_fired"] > tc.dead_feature_window).any()
            p, r, o, s, m = jax.lax.cond(any_dead, dense, sparse)
        else:
            p, r, o, s, m = dense()
        new = {**state, "params": p, "rest": r, "opt": o, "since_fired": s}
        return new, m

    return jax.jit(step_fn, out_shardings=replicated, donate_argnums=0)  # the state's buffers are reused


def _sparse_topk_loss(p, x, cfg: DictionaryConfig):
    """`TopKSAE.training_loss` without dead features (AuxK is then 0), computed sparsely: the k active
    features of each vector are decoded by gathering k decoder rows, and the backward pass scatters into only
    the rows and columns that fired, instead of multiplying dense [batch d_sae] matrices. The values and
    gradients are the dense loss's (fp32 rounding apart; tests/dictionaries/test_sparse_topk_step.py).
    aux: 'mse', 'l0', 'auxk' (0) and 'fired' [d_sae] in place of the dense 'acts'."""
    x = x.astype(cfg.jnp_dtype)
    recon, idx, a = _topk_recon(p["W_enc"][...], p["b_enc"][...], p["W_dec"][...], p["b_dec"][...], x,
                                cfg.k, cfg.b_dec_to_input, cfg.rescale_acts_by_decoder_norm)
    loss = base.mse(recon, x)
    fired = jnp.zeros(cfg.d_sae, jnp.int32).at[idx.reshape(-1)].add((a > 0).reshape(-1).astype(jnp.int32)) > 0
    l0 = (a > 0).sum(-1).astype(jnp.float32).mean()
    return loss, {"mse": loss, "l0": l0, "auxk": jnp.zeros((), loss.dtype), "fired": fired}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _topk_recon(W_enc, b_enc, W_dec, b_dec, x, k, b_dec_in, rescale):
    """(recon [batch d_in], idx [batch k], acts [batch k]) of a TopK SAE; only recon carries gradients. With
    rescale the choice uses pre-activations times the decoder norms and the decode divides by them again, so
    the reconstruction is relu(pre) W_dec either way (its gradient through the norms is exactly 0)."""
    return _topk_recon_fwd(W_enc, b_enc, W_dec, b_dec, x, k, b_dec_in, rescale)[0]


def _topk_recon_fwd(W_enc, b_enc, W_dec, b_dec, x, k, b_dec_in, rescale):
    xt = x - b_dec if b_dec_in else x
    n = jnp.linalg.norm(W_dec, axis=-1) if rescale else None
    h = xt @ (W_enc * n) + b_enc * n if rescale else xt @ W_enc + b_enc  # norms folded in: one [batch d_sae]
    vals, idx = jax.lax.top_k(h, k)
    # materialised: without the barrier XLA fuses the gathers into every decode term (10x slower)
    idx, pre = jax.lax.optimization_barrier((idx, vals / n[idx] if rescale else vals))
    a = jax.nn.relu(pre)
    recon = b_dec + sum(a[:, j, None] * W_dec[idx[:, j]] for j in range(k))  # unrolled: XLA fuses it
    return (recon, idx, a), (W_enc, W_dec, xt, idx, pre)


def _topk_recon_bwd(k, b_dec_in, rescale, res, cts):
    W_enc, W_dec, xt, idx, pre = res
    g = cts[0]
    idx_t, pre_t = idx.T, pre.T

    def body(j, carry):  # one active slot of every vector at a time: small temporaries, reused
        dW_enc_t, db_enc, dW_dec = carry
        i, pj = idx_t[j], pre_t[j]
        dpre = jnp.where(pj > 0, (g * W_dec[i]).sum(-1), 0.0)
        return (dW_enc_t.at[i].add(dpre[:, None] * xt), db_enc.at[i].add(dpre),
                dW_dec.at[i].add(jax.nn.relu(pj)[:, None] * g))

    zeros = (jnp.zeros(W_enc.shape[::-1], W_enc.dtype), jnp.zeros(W_enc.shape[1], W_enc.dtype),
             jnp.zeros_like(W_dec))
    dW_enc_t, db_enc, dW_dec = jax.lax.fori_loop(0, k, body, zeros)
    db_dec = g.sum(0) - (W_enc @ db_enc if b_dec_in else 0.0)
    return dW_enc_t.T, db_enc, dW_dec, db_dec, jnp.zeros_like(xt)


_topk_recon.defvjp(_topk_recon_fwd, _topk_recon_bwd)


def _optimizer(tc: TrainConfig):
    def schedule(count):
        t = count.astype(jnp.float32)
        warm = 1.0 if not tc.lr_warm_up_steps else jnp.minimum((t + 1) / tc.lr_warm_up_steps, 1.0)
        decay = 1.0 if not tc.lr_decay_steps else jnp.clip((tc.steps - t) / tc.lr_decay_steps, 0.0, 1.0)
        return tc.lr * warm * decay

    adam = optax.adam(schedule, b1=tc.adam_beta1, b2=tc.adam_beta2)
    if tc.clip_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(tc.clip_grad_norm), adam)


# -- state ------------------------------------------------------------------------------------------------
def checkpoint_template(cfgs: Sequence[DictionaryConfig], train_cfg: TrainConfig) -> tuple[Any, dict]:
    """(graphdef, the freshly initialised training state): params and the rest stacked over the dictionaries
    (dictionary i from `fold_in(key(seed), i)`), Adam's state, dead-feature counters, unit scaling factors."""
    key = jax.random.key(train_cfg.seed)
    split = [nnx.split(base.init_dictionary(c, jax.random.fold_in(key, i)), nnx.Param, ...)
             for i, c in enumerate(cfgs)]
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    params = jax.tree_util.tree_map(stack, *[s[1] for s in split])
    n = len(cfgs)
    return split[0][0], {"params": params, "rest": jax.tree_util.tree_map(stack, *[s[2] for s in split]),
                         "since_fired": jnp.zeros((n, cfgs[0].d_sae), jnp.int32),
                         "opt": jax.vmap(_optimizer(train_cfg).init)(params),
                         "scale_in": jnp.ones(n, jnp.float32), "scale_out": jnp.ones(n, jnp.float32)}


def _initial_state(cfgs, tc: TrainConfig, get, out_dir):
    graphdef, state = checkpoint_template(cfgs, tc)
    if out_dir is not None:
        found = load_checkpoint(out_dir, cfgs, tc, state)
        if found is not None:
            return graphdef, found[0], found[1]
    state["scale_in"], state["scale_out"] = _scales(cfgs, tc, get)
    return graphdef, state, 0


def _scales(cfgs, tc: TrainConfig, get):
    """sqrt(width) / mean norm of the inputs and of the targets over the first batches (1 when off)."""
    n = len(cfgs)
    if not tc.normalise_activations:
        return jnp.ones(n, jnp.float32), jnp.ones(n, jnp.float32)
    nx, ny = np.zeros(n), np.zeros(n)
    nb = max(1, tc.n_batches_for_norm_estimate)
    for i in range(nb):
        x, y = get(i)
        nx += np.asarray(jnp.linalg.norm(x, axis=-1).mean(-1), np.float64) / nb
        ny += np.asarray(jnp.linalg.norm(y, axis=-1).mean(-1), np.float64) / nb
    if not (np.isfinite(nx).all() and np.isfinite(ny).all()):
        i = int(np.flatnonzero(~(np.isfinite(nx) & np.isfinite(ny)))[0])
        raise NonFiniteActivationsError(
            f"NaN or inf in the activations at {cfgs[i].hook_name!r} (or its target) in the first {nb} "
            "batches, while estimating the normalisation; nothing was trained. Check the model and the "
            "corpus.")
    c = cfgs[0]
    s_in = math.sqrt(c.d_in) / np.maximum(nx, 1e-12)
    s_out = math.sqrt(c.out_width) / np.maximum(ny, 1e-12) if c.is_transcoder else s_in
    return jnp.asarray(s_in, jnp.float32), jnp.asarray(s_out, jnp.float32)


def _result(graphdef, state, cfgs, history, steps) -> TrainResult:
    state = jax.device_get(state)
    s_in, s_out = np.asarray(state["scale_in"]), np.asarray(state["scale_out"])
    out = []
    for i, c in enumerate(cfgs):
        take = functools.partial(_index, i=i)
        module = nnx.merge(graphdef, jax.tree_util.tree_map(take, state["params"]),
                           jax.tree_util.tree_map(take, state["rest"]))
        module.cfg = c  # the graphdef holds the first config; each keeps its own hook names
        base.fold_scaling(module, float(s_in[i]), float(s_out[i]) if c.is_transcoder else None)
        out.append(module)
    return TrainResult(out, history, s_in, s_out, steps)


def _index(a, i):
    return jnp.asarray(a[i])


def _check_finite(m, step, ins, outs):
    for flag, hooks, what in (("x_finite", ins, "input"), ("y_finite", outs, "target")):
        bad = np.flatnonzero(~m[flag])
        if bad.size:
            raise NonFiniteActivationsError(
                f"NaN or inf in the activations at {hooks[bad[0]]!r} (the {what} of dictionary {bad[0]}) at "
                f"training step {step}; training stopped before updating, checkpoints written so far are "
                "kept. Check the model and the corpus (a float16 overflow?), or skip those tokens.")
    bad = np.flatnonzero(~m["loss_finite"])
    if bad.size:
        raise NonFiniteActivationsError(
            f"The training loss of dictionary {bad[0]} (at {ins[bad[0]]!r}) became NaN or inf at step {step} "
            "with finite activations; lower the learning rate or the coefficients.")


def _check_stackable(cfgs):
    if not cfgs:
        raise DictionaryError("train_dictionaries needs at least one dictionary config; found none.")
    strip = lambda c: dataclasses.replace(c, hook_name="", hook_name_out=None, metadata=())  # noqa: E731
    for c in cfgs[1:]:
        if strip(c) != strip(cfgs[0]):
            raise DictionaryError("Dictionaries trained together must have the same architecture and sizes "
                                  f"(only the hooks may differ); found {strip(cfgs[0])} and {strip(c)}.")
    if not all(c.hook_name for c in cfgs) or any(c.is_transcoder and not c.hook_name_out for c in cfgs):
        raise DictionaryError("Every dictionary config needs hook_name (and a transcoder hook_name_out) to "
                              "know which activations it trains on.")


def _fingerprint(cfgs, tc: TrainConfig) -> str:
    return repr(([dataclasses.asdict(c) for c in cfgs], dataclasses.replace(tc, steps=0, checkpoint_every=0)))
