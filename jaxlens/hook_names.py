"""THE table of TransformerLens hook names and their axes, plus name parsing and `get_act_name`.

Block hooks are named relative to the block (`"attn.hook_z"`); the forward stacks them over layers and the cache
exposes them as TL does (`"blocks.3.attn.hook_z"`). A name without the layer index (`"blocks.attn.hook_z"`)
addresses every layer at once, with a leading `layer` axis, for interventions and caching.

Optional hook points (`attn.hook_result`, `hook_q_input`, `hook_mlp_in`, ...) always exist; they cost nothing
unless cached or intervened on.
"""

import re
from collections.abc import Callable, Iterable, Sequence

from jaxlens.config import Config
from jaxlens.errors import UnknownHookError


def global_hook_axes(cfg: Config) -> dict[str, str]:
    """Hooks outside the blocks: name -> axis string."""
    out = {"hook_embed": "batch pos d_model"}
    if cfg.positional_embedding_type == "standard":
        out["hook_pos_embed"] = "batch pos d_model"
    if cfg.normalization_type is not None:
        out["ln_final.hook_scale"] = "batch pos 1"
        out["ln_final.hook_normalized"] = "batch pos d_model"
    return out


def block_hook_axes(cfg: Config) -> dict[str, str]:
    """Hooks of one block, relative names -> axis strings (kv_head_index is n_key_value_heads)."""
    out = {"hook_resid_pre": "batch pos d_model"}
    has_norm = cfg.normalization_type is not None
    if has_norm:
        out["ln1.hook_scale"] = "batch pos 1"
        out["ln1.hook_normalized"] = "batch pos d_model"
    out.update({
        "hook_q_input": "batch pos head_index d_model",
        "hook_k_input": "batch pos kv_head_index d_model",
        "hook_v_input": "batch pos kv_head_index d_model",
        "attn.hook_q": "batch pos head_index d_head",
        "attn.hook_k": "batch pos kv_head_index d_head",
        "attn.hook_v": "batch pos kv_head_index d_head",
    })
    if cfg.positional_embedding_type == "rotary":
        out["attn.hook_rot_q"] = "batch pos head_index d_head"
        out["attn.hook_rot_k"] = "batch pos kv_head_index d_head"
    out.update({
        "attn.hook_attn_scores": "batch head_index query_pos key_pos",
        "attn.hook_pattern": "batch head_index query_pos key_pos",
        "attn.hook_z": "batch pos head_index d_head",
        "attn.hook_result": "batch pos head_index d_model",
    })
    if cfg.use_normalization_before_and_after and cfg.normalization_type is not None:
        out["ln1_post.hook_scale"] = "batch pos 1"
        out["ln1_post.hook_normalized"] = "batch pos d_model"
    out["hook_attn_out"] = "batch pos d_model"
    if not cfg.parallel_attn_mlp:
        out["hook_resid_mid"] = "batch pos d_model"
    out["hook_mlp_in"] = "batch pos d_model"
    if has_norm:
        out["ln2.hook_scale"] = "batch pos 1"
        out["ln2.hook_normalized"] = "batch pos d_model"
    out["mlp.hook_pre"] = "batch pos d_mlp"
    if cfg.gated_mlp:
        out["mlp.hook_pre_linear"] = "batch pos d_mlp"
    out["mlp.hook_post"] = "batch pos d_mlp"
    if cfg.use_normalization_before_and_after and cfg.normalization_type is not None:
        out["ln2_post.hook_scale"] = "batch pos 1"
        out["ln2_post.hook_normalized"] = "batch pos d_model"
    out["hook_mlp_out"] = "batch pos d_model"
    out["hook_resid_post"] = "batch pos d_model"
    return out


def all_names(cfg: Config) -> list[str]:
    """Every hook name of the model, in forward order, with layer indices (as TL's `hook_dict` lists them)."""
    g = global_hook_axes(cfg)
    names = [n for n in g if not n.startswith("ln_final")]
    for layer in range(cfg.n_layers):
        names += [f"blocks.{layer}.{n}" for n in block_hook_axes(cfg)]
    return names + [n for n in g if n.startswith("ln_final")]


OPTIONAL = frozenset({"hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result", "hook_mlp_in"})


def default_names(cfg: Config) -> list[str]:
    """What `run_with_cache` records by default: every hook but the optional ones TL switches on with flags
    (`use_split_qkv_input`, `use_attn_result`, `use_hook_mlp_in`), which change shapes or cost extra."""
    return [n for n in all_names(cfg) if n.split(".", 2)[-1] not in OPTIONAL]


def hook_axes(cfg: Config, name: str) -> str:
    """The axis string of one hook name (with or without a layer index)."""
    layer, rel = parse(cfg, name)
    return block_hook_axes(cfg)[rel] if layer is not None else global_hook_axes(cfg)[rel]


_BLOCK = re.compile(r"^blocks\.(?:(-?\d+)\.)?(.+)$")


def parse(cfg: Config, name: str) -> tuple[int | str | None, str]:
    """Split a hook name into (layer, relative name).

    layer is an int for `blocks.3.x`, the string "all" for `blocks.x` (every layer, stacked), None for a hook
    outside the blocks.

    Raises:
        UnknownHookError: the name is not a hook point of this model (the message lists close matches).
    """
    m = _BLOCK.match(name)
    if m:
        layer_str, rel = m.groups()
        if rel in block_hook_axes(cfg):
            if layer_str is None:
                return "all", rel
            layer = int(layer_str)
            if -cfg.n_layers <= layer < cfg.n_layers:
                return layer % cfg.n_layers, rel
    elif name in global_hook_axes(cfg):
        return None, name
    raise UnknownHookError(name, all_names(cfg) + [f"blocks.{n}" for n in block_hook_axes(cfg)])


NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


def select(cfg: Config, names_filter: NamesFilter) -> list[str]:
    """Hook names chosen by a TL-style `names_filter`: None (all), a name, a list of names, or a predicate.

    None and predicates choose among `default_names`; the optional hooks (split q/k/v inputs, per-head results,
    mlp_in) are recorded only when named explicitly, as TL records them only when a config flag is set.

    Raises:
        UnknownHookError: a name given explicitly is not a hook point.
    """
    if names_filter is None:
        return default_names(cfg)
    if callable(names_filter):
        return [n for n in default_names(cfg) if names_filter(n)]
    names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    for n in names:
        parse(cfg, n)
    return names


_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
            "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_LAYER_TYPES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ATTN = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_MLP = {"pre", "post", "mid", "pre_linear"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's `utils.get_act_name`: ("z", 3) -> "blocks.3.attn.hook_z", ("scale", 2, "ln1") ->
    "blocks.2.ln1.hook_scale", "k6a" -> "blocks.6.attn.hook_k", ("embed") -> "hook_embed"."""
    if ("." in name or name.startswith("hook_")) and layer is None:
        return name
    m = re.match(r"([a-z_]+?)(\d+)([a-z]?.*)$", name)
    if m is not None and layer is None:
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or None
    name = _ALIASES.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPES:
        layer_type = _LAYER_TYPES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


def names_by_layer(names: Iterable[str], cfg: Config, parse_fn=None) -> tuple[list[str], dict[str, set]]:
    """Split hook names into global names and {relative block name: set of layers or {"all"}} (`parse_fn`:
    another model kind's name table, e.g. the encoder's; `parse` by default)."""
    glob, block = [], {}
    for n in names:
        layer, rel = (parse_fn or parse)(cfg, n)
        if layer is None:
            glob.append(rel)
        else:
            block.setdefault(rel, set()).add(layer)
    return glob, block
