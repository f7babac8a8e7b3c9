"""Where each intervention applies during generation: the prompt's prefill, every decode step, or one entry
per absolute position sliced to each call (`generate(..., intervention_positions=...)`).

    "prompt"    the prefill only: arrays' position axes have size 1 or the prompt's length; the patched keys
                and values stay in the cache, exactly as re-running the patched prompt at every step would.
    "all"       every call (prefill and each decode step): position axes of size 1 (or none): steering.
    "absolute"  every call, arrays with one entry per position of the output (prompt + max_new_tokens),
                sliced to the positions of each call (size-1 axes broadcast).
    "auto"      decided by each array's size (1: all, prompt length: prompt, prompt + max_new_tokens:
                absolute); an error where that is ambiguous (a size-1 axis under a one-token prompt).

A `key_pos` axis has size 1 or prompt + max_new_tokens in every mode (attention reads every cache slot).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.interventions import Fn, intervention_list

MODES = ("auto", "prompt", "all", "absolute")


def plan_interventions(cfg: Config, interventions: Mapping[str, Any], prompt_len: int, total_len: int,
                       use_cache: bool = True, positions: str | Mapping[str, str] = "auto"):
    """Split interventions for prefill and decode by where each applies (module docstring).

    Args:
        positions: one mode for every intervention, or {hook name: mode} (names left out use "auto").

    Returns:
        (prefill interventions, decode interventions, spec): spec is a static tuple of
        (name, index, leaf, axis) for the leaves the decode step slices at its position.

    Raises:
        InputError: an unknown mode or name in `positions`, an array whose position axis does not fit its
            mode, an ambiguous array under "auto", or "prompt" interventions without the KV cache.
    """
    modes = _modes(interventions, positions)
    prefill, decode, spec = {}, {}, []
    for name, ivs in interventions.items():
        for iv in intervention_list(ivs):
            kind, sliced = _iv_kind(cfg, name, iv, prompt_len, total_len, modes[name])
            if not use_cache:  # every call sees the whole output: arrays apply as they are
                if kind == "prompt":
                    raise InputError(
                        f"Intervention at {name!r} applies to the prompt only (position axis of the "
                        f"prompt's length {prompt_len}, or intervention_positions='prompt'); without the KV "
                        f"cache every step re-runs the whole output: give it one entry per position "
                        f"({total_len}) with intervention_positions='absolute', or keep the cache.")
                prefill.setdefault(name, []).append(iv)
                decode.setdefault(name, []).append(iv)
                continue
            leaves, treedef = jax.tree_util.tree_flatten(iv)
            for i, axis in sliced:
                leaves[i] = jax.lax.slice_in_dim(jnp.asarray(leaves[i]), 0, prompt_len, axis=axis)
            prefill.setdefault(name, []).append(jax.tree_util.tree_unflatten(treedef, leaves))
            if kind != "prompt":
                spec += [(name, len(decode.get(name, [])), i, axis) for i, axis in sliced]
                decode.setdefault(name, []).append(iv)
    return prefill, decode, tuple(spec)


def slice_leaves(decode_iv, spec, offset):
    """The decode interventions with each whole-output position axis cut to the one position `offset`."""
    if not spec:
        return decode_iv
    out = {name: list(ivs) for name, ivs in decode_iv.items()}
    for name, idx, leaf_i, axis in spec:
        leaves, treedef = jax.tree_util.tree_flatten(out[name][idx])
        leaves[leaf_i] = jax.lax.dynamic_slice_in_dim(leaves[leaf_i], offset, 1, axis=axis)
        out[name][idx] = jax.tree_util.tree_unflatten(treedef, leaves)
    return out


def _modes(interventions: Mapping[str, Any], positions) -> dict[str, str]:
    if isinstance(positions, str):
        chosen = dict.fromkeys(interventions, positions)
    elif isinstance(positions, Mapping):
        unknown = sorted(set(positions) - set(interventions))
        if unknown:
            raise InputError(f"intervention_positions names {unknown}, which are not among the interventions "
                             f"{sorted(interventions)}.")
        chosen = {name: positions.get(name, "auto") for name in interventions}
    else:
        raise InputError(f"intervention_positions must be one of {MODES} or a {{hook name: mode}} dict; "
                         f"found {positions!r}.")
    bad = {n: m for n, m in chosen.items() if m not in MODES}
    if bad:
        raise InputError(f"intervention_positions must be one of {MODES}; found {bad}.")
    return chosen


def _iv_kind(cfg: Config, name: str, iv, prompt_len: int, total_len: int, mode: str):
    """("prompt" | "other", [(leaf index, axis) of the whole-output-long leaves, sliced per call])."""
    layer, _ = hook_names.parse(cfg, name)
    axes = hook_names.hook_axes(cfg, name).split()
    kind, sliced, unclear = ("prompt" if mode == "prompt" else "other"), [], None
    if isinstance(iv, Fn):  # the arrays a hook function closes over are not per-position data
        return kind, sliced
    for i, leaf in enumerate(jax.tree_util.tree_leaves(iv)):
        k, axis = _leaf_kind(jnp.asarray(leaf), axes, layer == "all", prompt_len, total_len, name, mode)
        if k == "prompt":
            kind = "prompt"
        elif k == "total":
            sliced.append((i, axis))
        elif k == "unclear":
            unclear = jnp.shape(leaf)
    if unclear is not None and not sliced:  # no whole-output-long leaf says the size-1 axes broadcast
        raise InputError(
            f"Intervention at {name!r}: with a one-token prompt, an array with a size-1 position axis (shape "
            f"{unclear}) could mean the prompt only or every position. Say which with "
            f"intervention_positions={{{name!r}: 'prompt'}} (or 'all').")
    return kind, sliced


def _leaf_kind(leaf, axes: list[str], stacked: bool, prompt_len: int, total_len: int, name: str, mode: str):
    """("const" | "prompt" | "total" | "unclear", axis) from the mode and the size of the leaf's position axis
    ("unclear": "auto" and a size-1 axis under a one-token prompt).

    A leaf's axes are the trailing ones of the hook's (broadcasting), after the layer axis of a stacked name.
    """
    rank = leaf.ndim - (1 if stacked else 0)
    kind, where = "const", None
    for ax_name in ("pos", "query_pos", "key_pos"):
        if ax_name not in axes:
            continue
        j = axes.index(ax_name) - (len(axes) - rank)
        if j < 0:
            continue
        j += 1 if stacked else 0
        size = leaf.shape[j]
        if ax_name == "key_pos":  # attention reads every cache slot, in every mode
            if size not in (1, total_len):
                _misfit(name, mode, leaf, ax_name, size, f"1 or prompt + max_new_tokens = {total_len}")
            continue
        if mode == "prompt":
            if size not in (1, prompt_len):
                _misfit(name, mode, leaf, ax_name, size, f"1 or the prompt's length {prompt_len}")
        elif mode == "all":
            if size != 1:
                _misfit(name, mode, leaf, ax_name, size, "1 (one value for every position, generated too)")
        elif mode == "absolute":
            if size == total_len and total_len > 1:
                kind, where = "total", j
            elif size != 1:
                _misfit(name, mode, leaf, ax_name, size,
                        f"prompt + max_new_tokens = {total_len} (one entry per absolute position) or 1")
        elif size == 1:  # auto
            if prompt_len == 1 and total_len > 1 and kind == "const":
                kind = "unclear"
        elif size == total_len:
            kind, where = "total", j
        elif size == prompt_len:
            kind = "prompt"
        else:
            _misfit(name, mode, leaf, ax_name, size, f"1, {prompt_len} (prompt) or {total_len} (all)")
    return kind, where


def _misfit(name: str, mode: str, leaf, ax_name: str, size: int, allowed: str):
    raise InputError(
        f"Intervention at {name!r}: an array has size {size} on its {ax_name} axis (shape {leaf.shape}); "
        f"during generation with intervention_positions={mode!r} it must be {allowed}. See "
        "jaxlens.generate's docstring.")
