"""Dictionaries spliced into the model: an SAE as an intervention at its hook, features as hook points.

    iv = spliced([sae])                                   # {sae.cfg.hook_name: Splice}: reconstruct only
    logits = model(tokens, interventions=spliced([sae], use_error_term=True))     # unchanged forward
    iv = {sae.cfg.hook_name: splice(sae, features=ablate_features(sae.cfg.d_sae, [7, 12]))}
    logits, cache = run_with_cache(model, tokens, [sae])  # + "<hook>.hook_sae_acts_post", ... (SAELens names)
    cells, values = feature_patching_sweep(model, corrupted, clean, sae, metric)

A `Splice` is a pytree (the dictionary's nnx state and the feature edit are leaves, its graph static), so it
is an intervention like `Patch` or `Add`: it jits, and a stack of them (or of feature edits) vmaps. At its
hook it encodes the activation, applies the feature edit (any intervention: `Patch`, `Add`, `Scale`, `Fn`,
seen at `<hook>.hook_sae_acts_post`) and returns the decoding; with `use_error_term` it adds
x - decode(encode(x)) (SAELens's error term), so with no edit the model computes exactly what it computes
without the splice. Stacked over layers, one Splice at a layer-free name (`blocks.hook_resid_post`) splices
an SAE per layer. Transcoders write another hook than they read and cannot be spliced at one hook (the
attribution-graph replacement model replaces MLPs by them).

`run_with_cache` adds SAELens's hook points under the hook the SAE attaches to: `hook_sae_input`,
`hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`, `hook_sae_error` (x minus the unedited
reconstruction). It reads each SAE's input with one extra forward, cut at that SAE's layer, with the splices
of earlier hooks in place, and leaves the core untouched.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlens import hook_names
from jaxlens.cache import ActivationCache
from jaxlens.dictionaries.base import Dictionary, DictionaryError
from jaxlens.errors import UnknownHookError
from jaxlens.interventions import Add, HookPoint, Patch, Scale, intervention_list
from jaxlens.model.forward import check_tokens, run

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error")


@jax.tree_util.register_pytree_node_class
class Splice:
    """A dictionary at its hook, as an intervention; see the module docstring.

    Args:
        dictionary: an SAE (or its (graphdef, state) pair from `nnx.split`).
        use_error_term: add x - decode(encode(x)) so only the feature edit changes the forward.
        features: an intervention (or list) applied to the feature activations [batch pos d_sae].
    """

    is_intervention = True  # taken as it is by jaxlens.interventions.as_intervention (not wrapped in Fn)

    def __init__(self, dictionary, *, use_error_term: bool = False, features=None):
        graphdef, state = nnx.split(dictionary) if isinstance(dictionary, Dictionary) else dictionary
        self.graphdef, self.state, self.use_error_term = graphdef, state, bool(use_error_term)
        self.features = features
        cfg = self.dictionary.cfg
        if cfg.is_transcoder:
            raise DictionaryError(
                f"A {cfg.architecture} reads {cfg.hook_name!r} and writes "
                f"{cfg.hook_name_out!r}: it cannot be spliced at one hook. Splice SAEs; "
                f"replace "
                "MLPs by transcoders with the attribution-graph replacement model."
            )

    @property
    def dictionary(self) -> Dictionary:
        return nnx.merge(self.graphdef, self.state)

    def tree_flatten(self):
        return (self.state, self.features), (self.graphdef, self.use_error_term)

    @classmethod
    def tree_unflatten(cls, aux, children):
        out = cls.__new__(cls)
        out.graphdef, out.use_error_term = aux
        out.state, out.features = children
        return out

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        return self.parts(x, hook)["output"]

    def parts(self, x: jax.Array, hook: HookPoint) -> dict[str, jax.Array]:
        """The splice's SAELens hook points (hook_sae_input ... hook_sae_error) and its output."""
        sae = self.dictionary
        cfg = sae.cfg
        flat = x.reshape(x.shape[:-2] + (-1,)) if cfg.reshape_activations == "hook_z" and x.ndim >= 2 else x
        if flat.shape[-1] != cfg.d_in:
            raise DictionaryError(
                f"The {cfg.architecture} SAE spliced at {hook.name!r} reads "
                f"d_in={cfg.d_in}, but "
                f"the activation there has shape {x.shape} (width {flat.shape[-1]}). "
                f"Splice it "
                f"at the hook it was trained on ({cfg.hook_name or 'unknown'!r})."
            )
        xin = flat.astype(cfg.jnp_dtype)
        acts = sae.encode(xin)
        edited = acts
        at = HookPoint(f"{hook.name}.hook_sae_acts_post", hook.layer_index)
        for iv in intervention_list(self.features):
            edited = iv(edited, at)
        recon = sae.decode(edited)
        clean = recon if self.features is None else sae.decode(acts)
        error = xin - clean
        out = recon + error if self.use_error_term else recon
        return {
            "hook_sae_input": xin,
            "hook_sae_acts_pre": sae.hidden_pre(xin),
            "hook_sae_acts_post": edited,
            "hook_sae_recons": recon,
            "hook_sae_error": error,
            "output": out.reshape(x.shape).astype(x.dtype),
        }


def splice(dictionary: Dictionary, *, use_error_term: bool = False, features=None) -> Splice:
    """`Splice(dictionary, use_error_term=..., features=...)`."""
    return Splice(dictionary, use_error_term=use_error_term, features=features)


def spliced(dictionaries, *, use_error_term: bool = False, cfg=None) -> dict[str, Splice]:
    """{hook name: Splice} for SAEs (each at its `cfg.hook_name`), or a {hook: SAE or Splice} mapping; with
    the model's `cfg`, every hook is checked to exist.

    Raises:
        DictionaryError: two dictionaries at one hook, a dictionary without a hook name, or (with cfg) a hook
            the model lacks.
    """
    items = (
        dictionaries.items()
        if isinstance(dictionaries, Mapping)
        else [
            (d.cfg.hook_name if isinstance(d, Dictionary) else d.dictionary.cfg.hook_name, d)
            for d in dictionaries
        ]
    )
    out: dict[str, Splice] = {}
    for name, d in items:
        if not name:
            raise DictionaryError(
                "A dictionary without a hook_name cannot be spliced by name; pass {hook name: dictionary}."
            )
        if name in out:
            raise DictionaryError(f"Two dictionaries are spliced at {name!r}; give one per hook.")
        out[name] = d if isinstance(d, Splice) else Splice(d, use_error_term=use_error_term)
    if cfg is not None:
        check_hooks(cfg, out)
    return out


def check_hooks(cfg, splices: Mapping[str, Any]) -> None:
    """Raise DictionaryError if a splice's hook is not a hook point of the model `cfg`."""
    table = hook_names.decoder_table(cfg)
    for name in splices:
        try:
            table.parse(name)
        except UnknownHookError as e:
            raise DictionaryError(
                f"Cannot splice a dictionary at {name!r}: the model has no such hook. {e}"
            ) from None


# -- feature edits (interventions on the feature activations [batch pos d_sae]) ------------------------------
def feature_mask(d_sae: int, features, *, pos=None, n_pos: int | None = None) -> jax.Array:
    """Bool [1 pos|1 d_sae]: True at the given features (and positions, with pos and n_pos)."""
    f = jnp.zeros((d_sae,), bool).at[jnp.asarray(features)].set(True)
    if pos is None:
        return f[None, None, :]
    if n_pos is None:
        raise DictionaryError("feature_mask with pos needs n_pos (the sequence length).")
    p = jnp.zeros((n_pos,), bool).at[jnp.asarray(pos)].set(True)
    return (p[:, None] & f[None, :])[None]


def ablate_features(d_sae: int, features, *, pos=None, n_pos: int | None = None) -> Scale:
    """Zero the given features (at the given positions)."""
    return Scale(factor=jnp.zeros(()), mask=feature_mask(d_sae, features, pos=pos, n_pos=n_pos))


def scale_features(d_sae: int, features, factor, *, pos=None, n_pos: int | None = None) -> Scale:
    """Multiply the given features by `factor`."""
    return Scale(
        factor=jnp.asarray(factor, jnp.float32), mask=feature_mask(d_sae, features, pos=pos, n_pos=n_pos)
    )


def steer_feature(d_sae: int, feature: int, amount, *, pos=None, n_pos: int | None = None) -> Add:
    """Add `amount` to one feature's activation (adds amount * its decoder direction to the output)."""
    delta = jnp.zeros((d_sae,), jnp.float32).at[feature].set(amount)
    return Add(delta=delta[None, None], mask=feature_mask(d_sae, feature, pos=pos, n_pos=n_pos))


def patch_features(value: jax.Array, mask: jax.Array | None = None) -> Patch:
    """Replace feature activations by `value` (e.g. the clean run's) where `mask` is True."""
    return Patch(value=value, mask=mask)


# -- run_with_cache with the SAEs' hook points ---------------------------------------------------------------
def run_with_cache(
    model,
    tokens,
    dictionaries,
    names_filter=None,
    *,
    use_error_term: bool = False,
    interventions: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, ActivationCache]:
    """`model.run_with_cache` with the dictionaries spliced, the cache also holding
    `<hook>.hook_sae_input`, `.hook_sae_acts_pre`, `.hook_sae_acts_post`, `.hook_sae_recons`,
    `.hook_sae_error` for each spliced hook (layer-indexed or global hook names).

    Args:
        model: a HookedTransformer.
        tokens: token ids [batch pos] (or text, as model.run_with_cache takes it).
        dictionaries: SAEs or Splices (a list, each at its hook, or {hook: SAE or Splice}).
        names_filter: the model hooks to cache (as model.run_with_cache).
        use_error_term: for SAEs given without a Splice.
        interventions: further interventions (applied before the splice at a shared hook).

    Raises:
        DictionaryError: a hook the model lacks, a width mismatch, a layer-free (stacked) hook name.
    """
    splices = spliced(dictionaries, use_error_term=use_error_term, cfg=model.cfg)
    table = hook_names.decoder_table(model.cfg)
    for name in splices:
        if table.parse(name)[0] == "all":
            raise DictionaryError(
                f"run_with_cache reads the SAE hooks of layer-indexed names; {name!r} "
                f"addresses "
                "every layer (splice it as an intervention, or name each layer)."
            )
    ivs = _merge(interventions, splices)
    logits, cache = model.run_with_cache(tokens, names_filter, interventions=ivs)
    ids = _tokens(model, tokens)
    order = sorted(splices, key=table.sort_key)
    extra = {}
    for j, name in enumerate(order):
        before = {n: splices[n] for n in order[:j]}
        layer = table.parse(name)[0]
        stop = None if layer is None else layer + 1
        if layer is None and name in dict(table.before):
            stop = 0
        x = _input_at(model.params, model.cfg, ids, _merge(interventions, before), name=name, stop=stop)
        parts = _parts_jit(splices[name], x, name=name, layer=layer)
        extra.update({f"{name}.{k}": v for k, v in parts.items() if k != "output"})
    return logits, ActivationCache({**cache.cache_dict, **extra}, model.cfg, model.params)


@functools.partial(jax.jit, static_argnames=("name", "layer"))
def _parts_jit(sp: Splice, x, *, name, layer):
    return sp.parts(x, HookPoint(name, layer))


@functools.partial(jax.jit, static_argnames=("cfg", "name", "stop"))
def _input_at(params, cfg, tokens, ivs, *, name, stop):
    _, cache, _ = run(params, cfg, tokens, interventions=ivs, cache_names=(name,), stop_at_layer=stop)
    return cache[name]


def _tokens(model, tokens) -> jax.Array:
    if isinstance(tokens, str) or (isinstance(tokens, list) and tokens and isinstance(tokens[0], str)):
        return model.to_tokens(tokens)
    arr = jnp.asarray(tokens)
    return check_tokens(arr[None] if arr.ndim == 1 else arr, model.cfg)


def _merge(interventions, splices) -> dict[str, list]:
    out = {n: intervention_list(iv) for n, iv in (interventions or {}).items()}
    for n, sp in splices.items():
        out[n] = [*out.get(n, []), sp]
    return out


# -- the feature-patching sweep ------------------------------------------------------------------------------
def feature_patching_sweep(
    model,
    corrupted_tokens,
    clean_tokens,
    dictionary: Dictionary,
    metric: Callable[[jax.Array], jax.Array],
    *,
    cells=None,
    use_error_term: bool = True,
    chunk_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch each (position, feature) of the SAE's activations from the clean run into the corrupted run, one
    cell at a time, and measure `metric(logits)`: one compiled computation (`jax.lax.map` over the cells,
    `chunk_size` vmapped at a time), starting each cell from the corrupted residual at the SAE's layer.

    Args:
        model: a HookedTransformer.
        corrupted_tokens, clean_tokens: [batch pos] of the same shape.
        dictionary: an SAE with a layer-indexed `cfg.hook_name`.
        metric: logits [batch pos d_vocab] -> scalar.
        cells: int [n 2] (position, feature) pairs; default every feature active (non-zero) at a position in
            either run (any batch row).
        use_error_term: keep the SAE's error term (the unpatched cell then gives the corrupted run's metric).
        chunk_size: cells vmapped together.

    Returns:
        (cells [n 2], metric values [n]) as numpy arrays.
    """
    cfg, name = model.cfg, dictionary.cfg.hook_name
    check_hooks(cfg, {name: None})
    layer = hook_names.decoder_table(cfg).parse(name)[0]
    if not isinstance(layer, int):
        raise DictionaryError(f"feature_patching_sweep needs a layer-indexed hook; the SAE's is {name!r}.")
    corrupted, clean = _tokens(model, corrupted_tokens), _tokens(model, clean_tokens)
    if corrupted.shape != clean.shape:
        raise DictionaryError(
            f"Clean tokens {clean.shape} and corrupted tokens {corrupted.shape} must have one shape."
        )
    sp = Splice(dictionary, use_error_term=use_error_term)
    pre = f"blocks.{layer}.hook_resid_pre"
    acts_clean, acts_corr, resid = _sweep_inputs(model.params, cfg, clean, corrupted, sp, name=name, pre=pre)
    if cells is None:
        active = (np.asarray(acts_clean) != 0).any(0) | (np.asarray(acts_corr) != 0).any(0)
        cells = np.argwhere(active)
    cells = np.asarray(cells, np.int32).reshape(-1, 2)
    if len(cells) == 0:
        return cells, np.zeros((0,), np.float32)
    values = _sweep_jit(
        model.params,
        cfg,
        resid,
        sp,
        acts_clean,
        jnp.asarray(cells),
        metric,
        name=name,
        layer=layer,
        chunk=min(chunk_size, len(cells)),
    )
    return cells, np.asarray(values)


@functools.partial(jax.jit, static_argnames=("cfg", "name", "pre"))
def _sweep_inputs(params, cfg, clean, corrupted, sp: Splice, *, name, pre):
    acts = []
    for toks in (clean, corrupted):
        _, cache, _ = run(params, cfg, toks, cache_names=(name, pre))
        acts.append(sp.parts(cache[name], HookPoint(name))["hook_sae_acts_post"])
    return acts[0], acts[1], cache[pre]


@functools.partial(jax.jit, static_argnames=("cfg", "metric", "name", "layer", "chunk"))
def _sweep_jit(params, cfg, resid, sp: Splice, acts_clean, cells, metric, *, name, layer, chunk):
    n_pos, d_sae = acts_clean.shape[-2:]

    def one(cell):
        mask = (jnp.arange(n_pos) == cell[0])[:, None] & (jnp.arange(d_sae) == cell[1])[None, :]
        edit = Splice(
            (sp.graphdef, sp.state),
            use_error_term=sp.use_error_term,
            features=Patch(value=acts_clean, mask=mask[None]),
        )
        logits, _, _ = run(params, cfg, resid, interventions={name: edit}, start_at_layer=layer)
        return metric(logits)

    return jax.lax.map(one, cells, batch_size=chunk)
