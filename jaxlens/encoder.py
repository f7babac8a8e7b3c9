"""BERT-style encoders as a pure function, and `HookedEncoder`, TransformerLens's encoder façade.

    out, cache = encoder_forward(params, cfg, tokens, attention_mask=mask,
                                 interventions={"blocks.2.attn.hook_z": zero_ablate(head_mask)},
                                 cache_names=("blocks.5.hook_normalized_resid_post",
                                              "blocks.attn.hook_pattern"))
    model = HookedEncoder.from_pretrained("all-minilm-l6-v2")
    hidden, cache = model.run_with_cache(["A sentence.", "Another, longer sentence."])

Hook names are TL's `HookedEncoder` names (`hook_full_embed`, `embed.hook_token_type_embed`,
`embed.ln.hook_scale`, `blocks.3.hook_normalized_resid_post`, `mlm_head.ln.hook_normalized`,
`pooler.hook_pooler_out`, ...); block hooks stack over layers exactly as in `jaxlens.forward`
(`blocks.attn.hook_z` addresses every layer), interventions and caching follow the same rules, and the blocks
run under one `jax.lax.scan`. The output is the MLM logits when the params carry an `mlm_head`
(BertForMaskedLM), else the last hidden state (BertModel, sentence encoders).
"""

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxlens import hook_names
from jaxlens.cache import ActivationCache
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.hook_names import HookTable
from jaxlens.interventions import Fn
from jaxlens.model import encoder_block as eb
from jaxlens.model import runner
from jaxlens.model.attention import Context
from jaxlens.model.forward import check_tokens
from jaxlens.model.hooks import Hooks
from jaxlens.params import cast_params
from jaxlens.shapes import AnyArray, Params


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
    table = hook_names.encoder_table(cfg)
    for name in list(cache_names) + list(interventions or {}):
        head = name.split(".", 1)[0]
        if table.parse(name)[0] is None and head in hook_names.ENCODER_HEADS and head not in heads:
            raise InputError(f"{name!r} belongs to the {head} head, which this model's params do not have "
                             f"(it has {list(heads) or 'no heads'}).")
    glob_iv, block_iv = runner.split_interventions(table, interventions)
    glob_cache, block_cache = table.split(cache_names)
    top = Hooks(here=glob_iv, names_to_cache=frozenset(glob_cache))

    resid = eb.embed(params, cfg, tokens, token_type_ids, top)
    key_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    ctx = Context(positions=jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), key_valid=key_valid,
                  offset=0)
    resid, recorded, _ = runner.run_blocks(params["blocks"], cfg, resid, ctx, block_iv, start=0,
                                           stop=cfg.n_layers, cache=block_cache, block=eb.encoder_block)
    out = eb.mlm_head(params, cfg, resid, top) if "mlm_head" in heads else resid
    if "pooler" in heads and top.wants("pooler.hook_pooler_out"):
        eb.pooler(params, resid, top)
    return out, runner.collect(table, cache_names, top.cache, recorded, 0, cfg.n_layers)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_names"))
def _forward_jit(params, cfg, tokens, token_type_ids, attention_mask, interventions, *, cache_names=()):
    return encoder_forward(params, cfg, tokens, token_type_ids=token_type_ids, attention_mask=attention_mask,
                           interventions=interventions, cache_names=cache_names)


@jax.tree_util.register_pytree_node_class
class EncoderActivationCache(ActivationCache):
    """ActivationCache over the encoder's hook table (indexing is TL's)."""

    def hook_table(self) -> HookTable:
        return hook_names.encoder_table(self.cfg)


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
        from jaxlens import hub
        from jaxlens import tokenizer as tok
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
        enc = self.tokenizer(input, padding=True, truncation=True, max_length=self.cfg.n_ctx,
                             return_tensors="np")
        tt = enc.get("token_type_ids")
        tt = jnp.zeros_like(enc["input_ids"]) if tt is None else tt
        return (jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(tt, jnp.int32),
                jnp.asarray(enc["attention_mask"], jnp.int32))

    def forward(self, input, token_type_ids=None, one_zero_attention_mask=None, *,
                interventions=None) -> Array:
        """MLM logits (BertForMaskedLM) or the last hidden state (BertModel) for text or token ids."""
        return self._run(input, token_type_ids, one_zero_attention_mask, interventions, ())[0]

    __call__ = forward

    def run_with_cache(self, input, names_filter=None, remove_batch_dim: bool = False, token_type_ids=None,
                       one_zero_attention_mask=None, *, interventions=None):
        """(output, EncoderActivationCache) with the activations `names_filter` selects (all by default)."""
        names = tuple(self.hook_table().select(names_filter))
        out, raw = self._run(input, token_type_ids, one_zero_attention_mask, interventions, names)
        cache = EncoderActivationCache(raw, self.cfg, self.params)
        return out, cache.remove_batch_dim() if remove_batch_dim else cache

    def run_with_hooks(self, input, fwd_hooks=(), token_type_ids=None, one_zero_attention_mask=None) -> Array:
        """Run with `fwd_hooks`: [(hook name or name filter, fn(activation, hook) -> new activation)], this
        call only."""
        ivs: dict[str, list] = {}
        for name, fn in fwd_hooks:
            for n in self.hook_table().select(name if not isinstance(name, str) else [name]):
                ivs.setdefault(n, []).append(Fn(fn))
        return self.forward(input, token_type_ids, one_zero_attention_mask, interventions=ivs)

    def encoder_output(self, tokens, token_type_ids=None,
                       one_zero_attention_mask=None) -> Float[Array, "batch pos d_model"]:
        """The last block's output (before any MLM head), as TL's `encoder_output`."""
        name = f"blocks.{self.cfg.n_layers - 1}.hook_normalized_resid_post"
        return self._run(tokens, token_type_ids, one_zero_attention_mask, None, (name,))[1][name]

    def hook_names(self) -> list[str]:
        """Every hook point's name (TL's `model.hook_dict.keys()`)."""
        return self.hook_table().all_names()

    def hook_table(self) -> HookTable:
        """The hook table of this encoder (its heads included)."""
        return hook_names.encoder_table(self.cfg, eb.heads_of(self.params))

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
