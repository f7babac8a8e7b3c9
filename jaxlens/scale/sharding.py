"""Sharded weights: params placed on the ("data", "model") mesh by a small declarative rule table over the
named axes of `jaxlens.params.param_shapes`, the one param-shape table (Megatron-style tensor parallelism,
Shoeybi et al. 2019, with optional fully-sharded data parallelism, Rajbhandari et al. 2020).

    mesh = make_mesh(model=4)                                  # data = n_devices / 4
    params = shard_params(params, cfg, mesh)                   # heads and MLP width split over `model`
    params = shard_params(params, cfg, mesh, fsdp=True)        # and d_model of every matrix over `data`
    logits, _ = jax.jit(forward, static_argnames="cfg")(params, cfg, tokens)   # XLA inserts the collectives

Nothing else changes: forward, `run_with_cache`, generate, gradients and sweeps take sharded params as they
take replicated ones, and give the same values to fp32 rounding (the sums over heads and MLP width become
all-reduces). Loading that reads only each process's slices: `jaxlens.scale.sharded_loading.load_sharded`.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.params import check_params, param_shapes
from jaxlens.shapes import Params

#: Named axis of the param table -> mesh axis it is split over (tensor parallelism). The `layer` axis is
#: never split: each device holds every layer's slice, so the scanned block runner stays one loop.
RULES: Mapping[str, str] = {
    "head_index": "model",       # W_Q, W_O, b_Q: each device computes its heads
    "kv_head_index": "model",    # W_K, W_V, b_K, b_V under grouped-query attention: the heads' groups
    "d_mlp": "model",            # W_in, W_gate, W_out, b_in (and every expert's width)
    "d_shared": "model",         # the shared expert's width
}
#: Added with fsdp=True, for matrices with a d_model axis only (biases and norms stay whole); a matrix with no
#: other axis split over `model` (W_E, W_U, W_pos) splits d_model over ("data", "model"): every device.
FSDP_RULES: Mapping[str, str] = {"d_model": "data"}

# the Config field whose value each split axis has (for error messages)
_FIELDS = {"head_index": "n_heads", "kv_head_index": "n_key_value_heads", "d_mlp": "d_mlp",
           "d_shared": "shared_expert_d_mlp", "d_model": "d_model", "d_vocab": "d_vocab", "d_head": "d_head",
           "expert": "num_experts", "n_ctx": "n_ctx"}


def param_specs(cfg: Config, *, fsdp: bool = False, rules: Mapping[str, str] | None = None) -> dict:
    """The PartitionSpec of every weight, nested as the params pytree is (no mesh needed).

    Args:
        cfg: the architecture.
        fsdp: also split d_model of every matrix over `data` (FSDP_RULES).
        rules: named axis -> mesh axis; default RULES. An axis named by no rule is replicated.
    """
    rules = dict(RULES if rules is None else rules)

    def spec(entry) -> PartitionSpec:
        axes = entry[0].split()
        parts = _spec(axes, rules)
        if fsdp and len([a for a in axes if a != "layer"]) >= 2 and "d_model" in axes:
            i = axes.index("d_model")
            axis = FSDP_RULES["d_model"]
            if parts[i] is None and axis not in parts:  # and over `model` too where nothing else is
                parts[i] = axis if "model" in parts else (axis, "model")
        while parts and parts[-1] is None:
            parts.pop()
        return PartitionSpec(*parts)

    return jax.tree_util.tree_map(spec, param_shapes(cfg), is_leaf=_is_entry)


def param_shardings(cfg: Config, mesh: Mesh, *, fsdp: bool = False,
                    rules: Mapping[str, str] | None = None) -> dict:
    """A NamedSharding on `mesh` for every weight, nested as the params pytree is.

    Args:
        cfg: the architecture.
        mesh: a ("data", "model") mesh (`jaxlens.scale.make_mesh`).
        fsdp: also split d_model of every matrix over `data`.
        rules: named axis -> mesh axis; default RULES.

    Raises:
        InputError: a mesh axis whose size does not divide a dimension it splits (both numbers named).
    """
    check_divisible(cfg, mesh, fsdp=fsdp, rules=rules)
    specs = param_specs(cfg, fsdp=fsdp, rules=rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params: Params, cfg: Config, mesh: Mesh, *, fsdp: bool = False,
                 rules: Mapping[str, str] | None = None) -> Params:
    """`params` placed on `mesh` by the rule table, one leaf at a time (a leaf already placed so is kept).

    Args:
        params: numpy or jax arrays with the names and shapes `param_shapes(cfg)` gives.
        cfg, mesh, fsdp, rules: as `param_shardings`.

    Returns:
        The same params as jax arrays with the NamedShardings of `param_shardings`.

    Raises:
        InputError: an axis size that does not divide the dimension it splits.
        CheckpointError: params whose names or shapes do not match `cfg`.
    """
    check_params(params, cfg)
    shardings = param_shardings(cfg, mesh, fsdp=fsdp, rules=rules)
    return jax.tree_util.tree_map(jax.device_put, params, shardings)


def check_divisible(cfg: Config, mesh: Mesh, *, fsdp: bool = False,
                    rules: Mapping[str, str] | None = None) -> None:
    """Raise InputError unless every mesh axis divides each dimension the rules split over it.

    Raises:
        InputError: e.g. "n_heads=6 is not divisible by the `model` axis of size 4", with the sizes that work.
    """
    specs = param_specs(cfg, fsdp=fsdp, rules=rules)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    table = jax.tree_util.tree_leaves(param_shapes(cfg), is_leaf=_is_entry)
    split: dict[tuple[str, tuple[str, ...]], int] = {}  # (named axis, mesh axes) -> dimension
    for (axes, shape), spec in zip(table, jax.tree_util.tree_leaves(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec)), strict=True):
        padded = tuple(spec) + (None,) * (len(shape) - len(spec))
        for name, dim, entry in zip(axes.split(), shape, padded, strict=True):
            if entry is not None:
                over = entry if isinstance(entry, tuple) else (entry,)
                if any(a not in sizes for a in over):
                    raise InputError(f"The sharding rules split {name!r} over mesh axes {over}; the mesh has "
                                     f"axes {mesh.axis_names}. Use `jaxlens.scale.make_mesh`.")
                split[(name, over)] = dim
    order = list(_FIELDS)
    split = dict(sorted(split.items(), key=lambda kv: order.index(kv[0][0]) if kv[0][0] in order else 99))
    if cfg.n_key_value_heads == cfg.n_heads:  # plain multi-head attention: one head count to report
        split.pop(("kv_head_index", ("model",)), None)
    size = lambda over: math.prod(sizes[a] for a in over)
    bad = [(n, over, d) for (n, over), d in split.items() if d % size(over)]
    if not bad:
        return
    name, over, dim = bad[0]
    also = "".join(f"; so is {_FIELDS.get(n, n)}={d} by the {_label(o)} of size {size(o)}"
                   for n, o, d in bad[1:])
    if len(over) == 1:
        dims = [d for (_, o), d in split.items() if over[0] in o]
        n_devices = mesh.devices.size
        ok = [k for k in range(1, n_devices + 1) if n_devices % k == 0 and all(d % k == 0 for d in dims)]
        fix = (f"Choose a `{over[0]}` size that divides every dimension split over it "
               f"({', '.join(f'{_FIELDS.get(n, n)}={d}' for (n, o), d in split.items() if over[0] in o)}): "
               f"one of {ok} on these {n_devices} devices (make_mesh({over[0]}=k)).")
    else:
        fix = f"Choose mesh sizes whose product divides {_FIELDS.get(name, name)}={dim}, or pass fsdp=False."
    raise InputError(f"{_FIELDS.get(name, name)}={dim} is not divisible by the {_label(over)} of size "
                     f"{size(over)}{also}: the weights split over it cannot be divided evenly. {fix}")


def sharded_bytes_per_device(params: Any) -> dict:
    """{device: bytes of the shards it holds}, summed over every leaf of `params` (any pytree of jax
    arrays)."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(params):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + math.prod(s.data.shape) * s.data.dtype.itemsize
    return out


def _spec(axes: list[str], rules: Mapping[str, str]) -> list:
    """The mesh axis of each named axis (None: whole); a mesh axis splits one dimension of a tensor at
    most."""
    used: set[str] = set()
    out: list = []
    for a in axes:
        m = rules.get(a)
        if m is not None and m in used:
            m = None
        if m is not None:
            used.add(m)
        out.append(m)
    return out


def _label(over: tuple[str, ...]) -> str:
    return f"`{over[0]}` axis" if len(over) == 1 else " x ".join(f"`{a}`" for a in over) + " axes"


def _is_entry(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
