"""BERT-style encoders as a pure function, and `HookedEncoder`, TransformerLens's encoder façade.

    out, cache = encoder_forward(params, cfg, tokens, attention_mask=mask,
                                 interventions={"blocks.2.attn.hook_z": zero_ablate(head_mask)},
                                 cache_names=("blocks.5.hook_normalized_resid_post", "blocks.attn.hook_pattern"))
    model = HookedEncoder.from_pretrained("all-minilm-l6-v2")
    hidden, cache = model.run_with_cache(["A sentence.", "Another, longer sentence."])

Hook names are TL's `HookedEncoder` names (`hook_full_embed`, `embed.hook_token_type_embed`, `embed.ln.hook_scale`,
`blocks.3.hook_normalized_resid_post`, `mlm_head.ln.hook_normalized`, `pooler.hook_pooler_out`, ...); block hooks
stack over layers exactly as in `jaxlens.forward` (`blocks.attn.hook_z` addresses every layer), interventions
and caching follow the same rules, and the blocks run under one `jax.lax.scan`. The output is the MLM logits when
the params carry an `mlm_head` (BertForMaskedLM), else the last hidden state (BertModel, sentence encoders).
"""

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxlens import hook_names
from jaxlens.cache import ActivationCache
from jaxlens.config import Config
from jaxlens.errors import InputError, UnknownHookError
from jaxlens.interventions import Fn
from jaxlens.model import encoder_block as eb
from jaxlens.model.attention import Context
from jaxlens.model.forward import _split_interventions, check_tokens
from jaxlens.model.hooks import Hooks
from jaxlens.params import cast_params
from jaxlens.shapes import Params

AnyArray = Array | np.ndarray  # the pure function takes numpy inputs as well


def encoder_forward(
    params: Params,
    cfg: Config,
    tokens: Int[AnyArray, "batch pos"],
    *,
    token_type_ids: Int[AnyArray, "batch pos"] | None = None,
    attention_mask: Bool[AnyArray, "batch pos"] | Int[AnyArray, "batch pos"] | None = None,
    interventions: Mapping[str, Any] | None = None,
    cache_names: Iterable[str] = (),
) -> tuple[Array, dict[str, Array]]:
    """Run the encoder with interventions and return (output, cache).

    Args:
        params: encoder params (`encoder_block.encoder_param_shapes`).
        cfg: the architecture (bidirectional attention, post-LN; static under jit).
        tokens: token ids [batch pos], usually "[CLS] ... [SEP]" from the model's tokenizer.
        token_type_ids: segment ids [batch pos] (0 for sentence A, 1 for B); zeros if None.
        attention_mask: True (or 1) for real tokens, False (0) for padding: padded keys are never attended to.
        interventions: {hook name: intervention or list of them}, as for `jaxlens.forward`.
        cache_names: hook names to record; `blocks.x` without a layer records every layer, stacked.

    Returns:
        (MLM logits [batch pos d_vocab] if the params have an mlm_head, else the last hidden state
        [batch pos d_model]; {hook name: activation}).

    Raises:
        InputError: bad tokens or token types, or a head hook asked of params without that head.
        UnknownHookError: a name that is not an encoder hook point.
    """
    params = jax.tree_util.tree_map(jnp.asarray, params)  # numpy params (straight from a converter) work too
    tokens = check_tokens(tokens, cfg)
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(tokens)
    token_type_ids = jnp.asarray(token_type_ids)
    if token_type_ids.shape != tokens.shape:
        raise InputError(f"token_type_ids has shape {token_type_ids.shape}; the tokens have {tokens.shape}.")
    cache_names = tuple(cache_names)
    heads = eb.heads_of(params)
    for name in list(cache_names) + list(interventions or {}):
        head = name.split(".", 1)[0]
        if parse(cfg, name)[0] is None and head in eb.HEAD_HOOKS and head not in heads:
            raise InputError(f"{name!r} belongs to the {head} head, which this model's params do not have "
                             f"(it has {list(heads) or 'no heads'}).")
    glob_iv, stacked_iv, at_layer_iv = _split_interventions(cfg, interventions or {}, 0, cfg.n_layers, parse=parse)
    glob_cache, block_cache = hook_names.names_by_layer(cache_names, cfg, parse_fn=parse)
    top = Hooks(here=glob_iv, names_to_cache=frozenset(glob_cache))

    resid = eb.embed(params, cfg, tokens, token_type_ids, top)
    key_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    ctx = Context(positions=jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), key_valid=key_valid,
                  offset=0)

    def body(resid, xs):
        p, idx, here = xs
        hooks = Hooks(prefix="blocks.", layer=idx, here=here, at_layer=at_layer_iv,
                      names_to_cache=frozenset(block_cache))
        return eb.encoder_block(p, resid, cfg, hooks, ctx), hooks.cache

    resid, stacked_cache = jax.lax.scan(body, resid, (params["blocks"], jnp.arange(cfg.n_layers), stacked_iv))
    out = eb.mlm_head(params, cfg, resid, top) if "mlm_head" in heads else resid
    if "pooler" in heads and top.wants("pooler.hook_pooler_out"):
        eb.pooler(params, resid, top)
    cache = {}
    for name in cache_names:
        layer, rel = parse(cfg, name)
        if layer is None:
            cache[name] = top.cache[rel]
        else:
            cache[name] = stacked_cache[rel] if layer == "all" else stacked_cache[rel][layer]
    return out, cache


def global_hook_axes(cfg: Config, heads: Iterable[str] = tuple(eb.HEAD_HOOKS)) -> dict[str, str]:
    """Hooks outside the blocks: the embedding's, then those of `heads` (both heads if not told)."""
    out = eb.embed_hook_axes()
    for h in heads:
        out.update(eb.HEAD_HOOKS[h])
    return out


def all_names(cfg: Config, heads: Iterable[str] = tuple(eb.HEAD_HOOKS)) -> list[str]:
    """Every hook name of an encoder with `heads`, in forward order, with layer indices."""
    g = global_hook_axes(cfg, heads)
    embeds = [n for n in g if n in eb.embed_hook_axes()]
    blocks = [f"blocks.{l}.{n}" for l in range(cfg.n_layers) for n in eb.block_hook_axes(cfg)]
    return embeds + blocks + [n for n in g if n not in embeds]


def default_names(cfg: Config, heads: Iterable[str] = tuple(eb.HEAD_HOOKS)) -> list[str]:
    """What `run_with_cache` records by default: every hook but the optional ones (`encoder_block.OPTIONAL`)."""
    return [n for n in all_names(cfg, heads) if n.split(".", 2)[-1] not in eb.OPTIONAL]


def parse(cfg: Config, name: str) -> tuple[int | str | None, str]:
    """Split an encoder hook name into (layer int | "all" | None, relative name), as `hook_names.parse`.

    Raises:
        UnknownHookError: not an encoder hook point (the message suggests close names).
    """
    parts = name.split(".", 2)
    if parts[0] == "blocks" and len(parts) > 1:
        block = eb.block_hook_axes(cfg)
        if parts[1].lstrip("-").isdigit() and len(parts) == 3 and parts[2] in block:
            layer = int(parts[1])
            if -cfg.n_layers <= layer < cfg.n_layers:
                return layer % cfg.n_layers, parts[2]
        elif name.removeprefix("blocks.") in block:
            return "all", name.removeprefix("blocks.")
    elif name in global_hook_axes(cfg):
        return None, name
    raise UnknownHookError(name, all_names(cfg) + [f"blocks.{n}" for n in eb.block_hook_axes(cfg)])


def hook_axes(cfg: Config, name: str) -> str:
    """The axis string of one encoder hook name."""
    layer, rel = parse(cfg, name)
    return eb.block_hook_axes(cfg)[rel] if layer is not None else global_hook_axes(cfg)[rel]


def select(cfg: Config, names_filter, heads: Iterable[str] = tuple(eb.HEAD_HOOKS)) -> list[str]:
    """Names chosen by a TL-style filter: None (defaults), a name, a list of names, or a predicate."""
    if names_filter is None:
        return default_names(cfg, heads)
    if callable(names_filter):
        return [n for n in default_names(cfg, heads) if names_filter(n)]
    names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    for n in names:
        parse(cfg, n)
    return names


@functools.partial(jax.jit, static_argnames=("cfg", "cache_names"))
def _forward_jit(params, cfg, tokens, token_type_ids, attention_mask, interventions, *, cache_names=()):
    return encoder_forward(params, cfg, tokens, token_type_ids=token_type_ids, attention_mask=attention_mask,
                           interventions=interventions, cache_names=cache_names)


@jax.tree_util.register_pytree_node_class
class EncoderActivationCache(ActivationCache):
    """ActivationCache whose unknown-name errors use the encoder's hook table (indexing is TL's)."""

    def __getitem__(self, key) -> Array:
        try:
            return super().__getitem__(key)
        except UnknownHookError:
            name = key if isinstance(key, str) else hook_names.get_act_name(*key)
            parse(self.cfg, name)  # raises UnknownHookError with encoder suggestions if it is not a hook
            raise KeyError(f"{name!r} is an encoder hook point but was not cached; cached names include "
                           f"{list(self.cache_dict)[:5]}...") from None


class HookedEncoder:
    """A BERT-style encoder as TransformerLens users know it. Args: cfg, params, tokenizer (optional)."""

    def __init__(self, cfg: Config, params: Params, tokenizer=None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer

    @classmethod
    def from_pretrained(cls, source: Any, *, dtype=jnp.float32, tokenizer=None) -> "HookedEncoder":
        """Load BertModel / BertForMaskedLM weights from a directory, a cached or packaged model name, or an
        in-memory `transformers` model. No weight processing (post-LN norms cannot be folded; TL does none).

        Args:
            source: see `jaxlens.hub.resolve` (e.g. "all-minilm-l6-v2"), or a `transformers` BertModel.
            dtype: dtype of params and compute (jnp.float32 or jnp.bfloat16).
            tokenizer: a Hugging Face tokenizer; by default the one saved beside the weights.
        """
        from jaxlens import hub, tokenizer as tok
        from jaxlens.converters import bert

        path = hub.resolve(source) if hub.is_path_like(source) else None
        cfg, params = bert.load(path if path is not None else source)
        if tokenizer is None and path is not None:
            tokenizer = tok.load_tokenizer(path)
        return cls(cfg, cast_params(params, dtype), tokenizer)

    def to_tokens(self, input: str | list[str]) -> tuple[Array, Array, Array]:
        """(tokens, token_type_ids, attention_mask), each [batch pos], as TL's `HookedEncoder.to_tokens`:
        the tokenizer adds [CLS]/[SEP] and pads a batch on the right."""
        if self.tokenizer is None:
            raise InputError("This encoder has no tokenizer; pass token ids, or give one to HookedEncoder.")
        enc = self.tokenizer(input, padding=True, truncation=True, max_length=self.cfg.n_ctx, return_tensors="np")
        tt = enc.get("token_type_ids")
        tt = jnp.zeros_like(enc["input_ids"]) if tt is None else tt
        return (jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(tt, jnp.int32),
                jnp.asarray(enc["attention_mask"], jnp.int32))

    def forward(self, input, token_type_ids=None, one_zero_attention_mask=None, *, interventions=None) -> Array:
        """MLM logits (BertForMaskedLM) or the last hidden state (BertModel) for text or token ids."""
        return self._run(input, token_type_ids, one_zero_attention_mask, interventions, ())[0]

    __call__ = forward

    def run_with_cache(self, input, names_filter=None, remove_batch_dim: bool = False, token_type_ids=None,
                       one_zero_attention_mask=None, *, interventions=None):
        """(output, EncoderActivationCache) with the activations `names_filter` selects (all by default)."""
        names = tuple(select(self.cfg, names_filter, eb.heads_of(self.params)))
        out, raw = self._run(input, token_type_ids, one_zero_attention_mask, interventions, names)
        cache = EncoderActivationCache(raw, self.cfg, self.params)
        return out, cache.remove_batch_dim() if remove_batch_dim else cache

    def run_with_hooks(self, input, fwd_hooks=(), token_type_ids=None, one_zero_attention_mask=None) -> Array:
        """Run with `fwd_hooks`: [(hook name or name filter, fn(activation, hook) -> new activation)], this call only."""
        ivs: dict[str, list] = {}
        for name, fn in fwd_hooks:
            for n in select(self.cfg, name if not isinstance(name, str) else [name], eb.heads_of(self.params)):
                ivs.setdefault(n, []).append(Fn(fn))
        return self.forward(input, token_type_ids, one_zero_attention_mask, interventions=ivs)

    def encoder_output(self, tokens, token_type_ids=None, one_zero_attention_mask=None) -> Float[Array, "batch pos d_model"]:
        """The last block's output (before any MLM head), as TL's `encoder_output`."""
        name = f"blocks.{self.cfg.n_layers - 1}.hook_normalized_resid_post"
        return self._run(tokens, token_type_ids, one_zero_attention_mask, None, (name,))[1][name]

    def hook_names(self) -> list[str]:
        """Every hook point's name (TL's `model.hook_dict.keys()`)."""
        return all_names(self.cfg, eb.heads_of(self.params))

    def _run(self, input, token_type_ids, mask, interventions, names):
        if isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str)):
            tokens, tt, am = self.to_tokens(input)
            token_type_ids = tt if token_type_ids is None else token_type_ids
            mask = am if mask is None else mask
        else:
            tokens = jnp.asarray(input)
            tokens = tokens[None] if tokens.ndim == 1 else tokens
        tokens = check_tokens(tokens, self.cfg)
        return _forward_jit(self.params, self.cfg, tokens, token_type_ids, mask, interventions or {},
                            cache_names=tuple(names))
