"""THE hook tables: one `HookTable` per model kind owns its hook names, their axes, parsing and defaults.

    table = hook_names.decoder_table(cfg)          # or encoder_table(cfg, heads=("mlm_head",))
    table.all_names()                              # every hook point, in forward order, with layer indices
    table.parse("blocks.3.attn.hook_z")            # (3, "attn.hook_z"); "blocks.attn.hook_z" -> ("all", ...)
    table.axes("blocks.3.attn.hook_k")             # "batch pos kv_head_index d_head"

Block hooks are named relative to the block (`"attn.hook_z"`); the block runner stacks them over layers and
the cache exposes them as TL does (`"blocks.3.attn.hook_z"`). A name without the layer index
(`"blocks.attn.hook_z"`) addresses every layer at once, with a leading `layer` axis, for interventions and
caching.

Optional hook points (`attn.hook_result`, `hook_q_input`, `hook_mlp_in`, `unembed.hook_in`, ...) always exist;
they cost nothing unless cached or intervened on, and `run_with_cache` records them only when named (TL
records them only when a config flag such as `use_attn_result` is set).

The module-level functions (`parse`, `select`, `all_names`, ...) ask the decoder table of `cfg`.
"""

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence

from jaxlens.config import Config
from jaxlens.errors import UnknownHookError

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None

#: Block hooks that TL switches on with flags (split q/k/v inputs, per-head results, mlp_in).
OPTIONAL_BLOCK = frozenset({"hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result",
                            "hook_mlp_in"})
#: Hooks outside the blocks that only TransformerLens 4.x's bridge has (the unembedding's input and output).
OPTIONAL_GLOBAL = frozenset({"unembed.hook_in", "unembed.hook_out"})

_BLOCK = re.compile(r"^blocks\.(?:(-?\d+)\.)?(.+)$")


@dataclasses.dataclass(frozen=True)
class HookTable:
    """The hook points of one model kind.

    Attributes:
        kind: "decoder" or "encoder" (for messages).
        n_layers: number of blocks.
        before: hooks before the blocks, (name, axis string) in forward order.
        block: hooks of one block, (relative name, axis string) in forward order.
        after: hooks after the blocks, (name, axis string) in forward order.
        optional: names (relative for block hooks) recorded only when asked for by name.
    """

    kind: str
    n_layers: int
    before: tuple[tuple[str, str], ...]
    block: tuple[tuple[str, str], ...]
    after: tuple[tuple[str, str], ...]
    optional: frozenset[str]

    @functools.cached_property
    def block_axes(self) -> dict[str, str]:
        """Relative block hook name -> axis string."""
        return dict(self.block)

    @functools.cached_property
    def global_axes(self) -> dict[str, str]:
        """Hook outside the blocks -> axis string."""
        return dict(self.before + self.after)

    @functools.cached_property
    def _order(self) -> dict[str, int]:
        names = self.all_names()
        order = {n: i for i, n in enumerate(names)}
        # stacked names sort with the first layer of their hook
        if self.n_layers:
            order.update({f"blocks.{rel}": order[f"blocks.0.{rel}"] for rel in self.block_axes})
        return order

    def all_names(self) -> list[str]:
        """Every hook name of the model, in forward order, with layer indices (TL's `hook_dict` order)."""
        names = [n for n, _ in self.before]
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.{n}" for n, _ in self.block]
        return names + [n for n, _ in self.after]

    def default_names(self) -> list[str]:
        """What `run_with_cache` records by default: every hook but the optional ones."""
        return [n for n in self.all_names() if not self.is_optional(n)]

    def is_optional(self, name: str) -> bool:
        """Whether `name` is an optional hook point (recorded only when named)."""
        return self.parse(name)[1] in self.optional

    def parse(self, name: str) -> tuple[int | str | None, str]:
        """Split a hook name into (layer, relative name).

        layer is an int for `blocks.3.x` (negative indices count from the end), the string "all" for
        `blocks.x` (every layer, stacked), None for a hook outside the blocks.

        Raises:
            UnknownHookError: the name is not a hook point of this model (the message lists close matches).
        """
        m = _BLOCK.match(name)
        if m:
            layer_str, rel = m.groups()
            if rel in self.block_axes:
                if layer_str is None:
                    return "all", rel
                layer = int(layer_str)
                if -self.n_layers <= layer < self.n_layers:
                    return layer % self.n_layers, rel
        elif name in self.global_axes:
            return None, name
        raise UnknownHookError(name, self.all_names() + [f"blocks.{n}" for n in self.block_axes])

    def axes(self, name: str) -> str:
        """The axis string of one hook name (with or without a layer index)."""
        layer, rel = self.parse(name)
        return self.block_axes[rel] if layer is not None else self.global_axes[rel]

    def select(self, names_filter: NamesFilter, *, start_at_layer: int | None = None,
               stop_at_layer: int | None = None, enabled: Iterable[str] = ()) -> list[str]:
        """Hook names chosen by a TL-style `names_filter`: None (all), a name, a list of names, or a
        predicate.

        None and predicates choose among the default names (plus the optional ones named, relative to the
        block, in `enabled`, as TL's `set_use_attn_result` and friends switch them on) of what the run
        computes: with `start_at_layer` there is no embedding and blocks start there, with `stop_at_layer`
        blocks stop there and nothing after the blocks runs (TL caches what runs). Names given explicitly are
        checked and kept as they are.

        Raises:
            UnknownHookError: a name given explicitly is not a hook point.
        """
        if names_filter is None or callable(names_filter):
            hidden = self.optional - set(enabled)
            start = 0 if start_at_layer is None else start_at_layer
            stop = self.n_layers if stop_at_layer is None else stop_at_layer
            start, stop = (b + self.n_layers if b < 0 else b for b in (start, stop))
            pool = []
            for n in self.all_names():
                layer, rel = self.parse(n)
                runs = (start <= layer < stop if layer is not None
                        else start_at_layer is None if n in dict(self.before) else stop_at_layer is None)
                if runs and rel not in hidden:
                    pool.append(n)
            return pool if names_filter is None else [n for n in pool if names_filter(n)]
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        for n in names:
            self.parse(n)
        return names

    def split(self, names: Iterable[str]) -> tuple[list[str], dict[str, set]]:
        """Hook names -> (global names, {relative block name: set of layers, or {"all"}})."""
        glob, block = [], {}
        for n in names:
            layer, rel = self.parse(n)
            if layer is None:
                glob.append(rel)
            else:
                block.setdefault(rel, set()).add(layer)
        return glob, block

    def sort_key(self, name: str) -> tuple[int, str]:
        """Forward order of a cached name (`<name>_grad` right after its activation; unknown names last)."""
        base = name.removesuffix("_grad")
        return self._order.get(base, len(self._order)), name


# -- decoder -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def decoder_table(cfg: Config) -> HookTable:
    """The hook table of a decoder-only transformer with config `cfg` (TL's `HookedTransformer` names)."""
    has_norm = cfg.normalization_type is not None
    before = [("hook_embed", "batch pos d_model")]
    if cfg.positional_embedding_type == "standard":
        before.append(("hook_pos_embed", "batch pos d_model"))
    ln = lambda n: [(f"{n}.hook_scale", "batch pos 1"), (f"{n}.hook_normalized", "batch pos d_model")]
    post_norms = cfg.use_normalization_before_and_after and has_norm
    pre_norms = has_norm and cfg.use_pre_norms
    block = [("hook_resid_pre", "batch pos d_model")] + (ln("ln1") if pre_norms else [])
    block += [
        ("hook_q_input", "batch pos head_index d_model"),
        ("hook_k_input", "batch pos kv_head_index d_model"),
        ("hook_v_input", "batch pos kv_head_index d_model"),
        ("attn.hook_q", "batch pos head_index d_head"),
        ("attn.hook_k", "batch pos kv_head_index d_head"),
        ("attn.hook_v", "batch pos kv_head_index d_head"),
    ]
    if cfg.use_qk_norm:
        q, k = ("1", "1") if cfg.qk_norm_over_heads else ("head_index", "kv_head_index")  # OLMo 2: one scale
        block += [("attn.q_norm.hook_scale", f"batch pos {q} 1"),
                  ("attn.q_norm.hook_normalized", "batch pos head_index d_head"),
                  ("attn.k_norm.hook_scale", f"batch pos {k} 1"),
                  ("attn.k_norm.hook_normalized", "batch pos kv_head_index d_head")]
    if cfg.positional_embedding_type == "rotary":
        block += [("attn.hook_rot_q", "batch pos head_index d_head"),
                  ("attn.hook_rot_k", "batch pos kv_head_index d_head")]
    block += [
        ("attn.hook_attn_scores", "batch head_index query_pos key_pos"),
        ("attn.hook_pattern", "batch head_index query_pos key_pos"),
        ("attn.hook_z", "batch pos head_index d_head"),
        ("attn.hook_result", "batch pos head_index d_model"),
    ]
    block += (ln("ln1_post") if post_norms else []) + [("hook_attn_out", "batch pos d_model")]
    if not cfg.parallel_attn_mlp:
        block.append(("hook_resid_mid", "batch pos d_model"))
    block += [("hook_mlp_in", "batch pos d_model")] + (ln("ln2") if pre_norms else [])
    if cfg.num_experts:  # TL's MoE names: the routing, then each expert's gated MLP (over every token)
        block += [("mlp.hook_expert_indices", "batch pos expert_slot"),
                  ("mlp.hook_expert_weights", "batch pos expert")]
        for e in range(cfg.num_experts):
            block += [(f"mlp.experts.{e}.{n}", "batch pos d_mlp")
                      for n in ("hook_pre", "hook_pre_linear", "hook_post")]
        if cfg.shared_expert_d_mlp:
            block += [(f"mlp.shared_expert.{n}", "batch pos d_shared")
                      for n in ("hook_pre", "hook_pre_linear", "hook_post")]
            block.append(("mlp.hook_shared_expert_gate", "batch pos 1"))
    else:
        block.append(("mlp.hook_pre", "batch pos d_mlp"))
        if cfg.gated_mlp:
            block.append(("mlp.hook_pre_linear", "batch pos d_mlp"))
        block.append(("mlp.hook_post", "batch pos d_mlp"))
    block += (ln("ln2_post") if post_norms else []) + [("hook_mlp_out", "batch pos d_model"),
                                                        ("hook_resid_post", "batch pos d_model")]
    after = (ln("ln_final") if has_norm else []) + [("unembed.hook_in", "batch pos d_model"),
                                                    ("unembed.hook_out", "batch pos d_vocab")]
    return HookTable("decoder", cfg.n_layers, tuple(before), tuple(block), tuple(after),
                     OPTIONAL_BLOCK | OPTIONAL_GLOBAL)


# -- encoder -------------------------------------------------------------------------------------------------
#: Output heads an encoder's params may carry, and the hook points each adds.
ENCODER_HEADS = {
    "mlm_head": (("mlm_head.ln.hook_scale", "batch pos 1"),
                 ("mlm_head.ln.hook_normalized", "batch pos d_model")),
    "pooler": (("pooler.hook_pooler_out", "batch d_model"),),
}


@functools.lru_cache(maxsize=256)
def encoder_table(cfg: Config, heads: tuple[str, ...] = tuple(ENCODER_HEADS)) -> HookTable:
    """The hook table of a BERT-style encoder with output `heads` (TL's `HookedEncoder` names)."""
    before = (
        ("embed.hook_embed", "batch pos d_model"),
        ("embed.hook_pos_embed", "batch pos d_model"),
        ("embed.hook_token_type_embed", "batch pos d_model"),
        ("embed.ln.hook_scale", "batch pos 1"),
        ("embed.ln.hook_normalized", "batch pos d_model"),
        ("hook_full_embed", "batch pos d_model"),
    )
    block = (
        ("hook_resid_pre", "batch pos d_model"),
        ("hook_q_input", "batch pos head_index d_model"),
        ("hook_k_input", "batch pos head_index d_model"),
        ("hook_v_input", "batch pos head_index d_model"),
        ("attn.hook_q", "batch pos head_index d_head"),
        ("attn.hook_k", "batch pos head_index d_head"),
        ("attn.hook_v", "batch pos head_index d_head"),
        ("attn.hook_attn_scores", "batch head_index query_pos key_pos"),
        ("attn.hook_pattern", "batch head_index query_pos key_pos"),
        ("attn.hook_z", "batch pos head_index d_head"),
        ("attn.hook_result", "batch pos head_index d_model"),
        ("hook_attn_out", "batch pos d_model"),
        ("hook_resid_mid", "batch pos d_model"),
        ("hook_mlp_in", "batch pos d_model"),
        ("ln1.hook_scale", "batch pos 1"),
        ("ln1.hook_normalized", "batch pos d_model"),
        ("mlp.hook_pre", "batch pos d_mlp"),
        ("mlp.hook_post", "batch pos d_mlp"),
        ("hook_mlp_out", "batch pos d_model"),
        ("hook_resid_post", "batch pos d_model"),
        ("ln2.hook_scale", "batch pos 1"),
        ("ln2.hook_normalized", "batch pos d_model"),
        ("hook_normalized_resid_post", "batch pos d_model"),
    )
    after = tuple(h for head in heads for h in ENCODER_HEADS[head])
    return HookTable("encoder", cfg.n_layers, before, block, after, OPTIONAL_BLOCK)


# -- the decoder table as functions of cfg (the names people import) -----------------------------------------
def all_names(cfg: Config) -> list[str]:
    """Every hook name of the decoder, in forward order (`decoder_table(cfg).all_names()`)."""
    return decoder_table(cfg).all_names()


def default_names(cfg: Config) -> list[str]:
    """What `run_with_cache` records by default (`decoder_table(cfg).default_names()`)."""
    return decoder_table(cfg).default_names()


def parse(cfg: Config, name: str) -> tuple[int | str | None, str]:
    """`decoder_table(cfg).parse(name)`: (layer int | "all" | None, relative name)."""
    return decoder_table(cfg).parse(name)


def hook_axes(cfg: Config, name: str) -> str:
    """`decoder_table(cfg).axes(name)`."""
    return decoder_table(cfg).axes(name)


def select(cfg: Config, names_filter: NamesFilter) -> list[str]:
    """`decoder_table(cfg).select(names_filter)`."""
    return decoder_table(cfg).select(names_filter)


def block_hook_axes(cfg: Config) -> dict[str, str]:
    """`decoder_table(cfg).block_axes`: relative block hook name -> axis string."""
    return decoder_table(cfg).block_axes


def global_hook_axes(cfg: Config) -> dict[str, str]:
    """`decoder_table(cfg).global_axes`: hooks outside the blocks -> axis string."""
    return decoder_table(cfg).global_axes


# -- TransformerLens's get_act_name --------------------------------------------------------------------------
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
