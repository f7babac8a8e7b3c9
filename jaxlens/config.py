"""Config: the architecture of one model, frozen and hashable so jit can take it as a static argument.

Field names follow TransformerLens's `HookedTransformerConfig`. Every difference between model families is a
field here (rotary style, RMSNorm, gated MLP, grouped-query attention, parallel blocks, per-layer attention
windows, softcapping), never a branch on a model name.

A config cannot be wrong silently: `__post_init__` checks every field against its annotation (an enumerated
field against its allowed values, a bool against `bool`, a number against `float`) and raises `ConfigError`
naming the field, the value found and what is allowed. Fields whose default follows from others
(`n_key_value_heads`, `rotary_dim`, `attn_scale`) are resolved there, so each fact has one name and one value:
`Config(n_key_value_heads=None, ...) == Config(n_key_value_heads=n_heads, ...)`.
"""

import dataclasses
import difflib
import math
import numbers
import types
import typing
from typing import Any, Literal

from jaxlens.errors import ConfigError

ActFn = Literal["gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"]
NormType = Literal["LN", "LNPre", "RMS", "RMSPre"]
PositionalEmbeddingType = Literal["standard", "rotary"]
AttentionDir = Literal["causal", "bidirectional"]

_SIZES = ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx")
_ROTARY_ONLY = ("rotary_dim", "rotary_base", "rotary_adjacent_pairs", "rotary_scaling", "rotary_freqs",
                "rotary_attention_factor", "rotary_dynamic_ntk", "rotary_local_freqs")


def no_type_check(cls: type) -> type:
    """Leave `cls` to its own checks. The test suite's jaxtyping import hook skips classes decorated with a
    name `no_type_check` (it would pre-empt Config's messages with its own TypeCheckError); unlike
    `typing.no_type_check` this one leaves `typing.get_type_hints(cls)` working."""
    return cls


@no_type_check  # Config checks its annotations itself in __post_init__, with the same rules in production
@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Architecture of one decoder-only transformer (see `shapes.py` for the axis names).

    Attributes:
        d_model, n_layers, n_heads, d_head, d_mlp, d_vocab, n_ctx: sizes, as TransformerLens names them.
        n_key_value_heads: key/value heads under grouped-query attention. None at construction means n_heads
            (plain multi-head attention); after construction it is always an int.
        act_fn: MLP activation.
        normalization_type: "LN" / "RMS" with weights; "LNPre" / "RMSPre" after `fold_ln` moved the weights
            into the following linear maps; None for no normalisation.
        eps: normalisation epsilon.
        positional_embedding_type: "standard" (learned `W_pos`) or "rotary".
        rotary_dim: dimensions of each head that rotate. None at construction means all of d_head for a
            rotary model; after construction an int for rotary models and None for others.
        rotary_base: rotary theta.
        rotary_adjacent_pairs: True rotates adjacent pairs (GPT-J); False rotates halves (GPT-NeoX, Llama).
        rotary_scaling: Llama-3 style frequency scaling as (factor, low_freq_factor, high_freq_factor,
            original_max_position_embeddings), or None.
        rotary_freqs: the rotation frequencies themselves (rotary_dim / 2 of them), for rope scaling types
            whose frequencies the converter computes as transformers does (linear, YaRN); None to derive them
            from rotary_base (and rotary_scaling).
        rotary_attention_factor: what the rotated cos/sin are multiplied by (YaRN's attention factor; 1.0 for
            none).
        rotary_dynamic_ntk: dynamic NTK scaling as (factor, max_position_embeddings): the base grows with the
            sequence length (one past the largest position of the call) beyond max_position_embeddings.
        rotary_local_freqs: the rotation frequencies (rotary_dim / 2) of the layers with an attention window
            (a `window_sizes` entry not None), where they differ from the global layers' (Gemma 3's local
            base); None: every layer rotates alike.
        num_experts, experts_per_token: a mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router (`W_gate`
            [layer, d_model, expert]) picks experts_per_token of num_experts gated MLPs per token; None for a
            dense MLP.
        shared_expert_d_mlp: the width of a gated MLP every token also goes through, scaled by
            sigmoid(x W_shared_gate) (Qwen2-MoE's shared expert); None for none.
        normalize_expert_weights: divide the chosen experts' router probabilities by their sum (Mixtral;
            Qwen3-MoE's `norm_topk_prob`).
        use_qk_norm: RMSNorm each query and key head over d_head before the rotary embedding (Qwen3, OLMo 2,
            Gemma 3: `attn.q_norm`, `attn.k_norm`, weights [layer, d_head]).
        qk_norm_over_heads: with use_qk_norm, one RMSNorm over all heads of the query (and of the key)
            together, [head_index d_head] at once, instead of one per head (OLMo 2 normalises the whole q / k
            projection): weights [layer, head_index, d_head], hook_scale [batch pos 1 1].
        gated_mlp: SwiGLU-style MLP with `W_gate` (hook_pre is the gate, hook_pre_linear the linear branch).
        parallel_attn_mlp: attention and MLP both read resid_pre and add into resid_post (GPT-J, NeoX, Phi).
        attn_scale: what attention scores are divided by. None at construction means sqrt(d_head); 1.0 turns
            scaling off (GPT-Neo; TransformerLens's `use_attn_scale=False`). A float after construction.
        window_sizes: per-layer attention window (a key is visible if query_pos - key_pos < window), None in
            an entry for global attention; None for all-global.
        attn_scores_soft_cap, output_logits_soft_cap: tanh softcapping (Gemma 2); None for none.
        use_normalization_before_and_after: extra norms on the attention and MLP outputs (Gemma 2:
            `ln1_post`, `ln2_post`).
        use_pre_norms: whether attention and MLP read a normalised residual (ln1, ln2). False for OLMo 2,
            whose blocks normalise only the sublayer outputs (set use_normalization_before_and_after too);
            ln_final stays.
        attention_dir: "causal" for decoders, "bidirectional" for encoders.
        default_prepend_bos: whether `to_tokens` prepends BOS by default.

    Raises:
        ConfigError: a field of the wrong type or outside its allowed values, or fields that disagree.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_key_value_heads: int | None = None
    act_fn: ActFn = "gelu_new"
    normalization_type: NormType | None = "LN"
    eps: float = 1e-5
    positional_embedding_type: PositionalEmbeddingType = "standard"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    rotary_scaling: tuple[float, float, float, int] | None = None
    rotary_freqs: tuple[float, ...] | None = None
    rotary_attention_factor: float = 1.0
    rotary_dynamic_ntk: tuple[float, int] | None = None
    rotary_local_freqs: tuple[float, ...] | None = None
    use_qk_norm: bool = False
    qk_norm_over_heads: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    normalize_expert_weights: bool = True
    shared_expert_d_mlp: int | None = None
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    attn_scale: float | None = None
    window_sizes: tuple[int | None, ...] | None = None
    attn_scores_soft_cap: float | None = None
    output_logits_soft_cap: float | None = None
    use_normalization_before_and_after: bool = False
    use_pre_norms: bool = True
    attention_dir: AttentionDir = "causal"
    default_prepend_bos: bool = True

    def __post_init__(self):
        for name, hint in _hints().items():
            object.__setattr__(self, name, _checked(name, getattr(self, name), hint))
        for name in _SIZES:
            if getattr(self, name) <= 0:
                raise ConfigError(f"Config.{name} must be a positive int, found {getattr(self, name)!r}.")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"Config.eps must be a finite non-negative number, found {self.eps!r}.")
        for name in ("rotary_base", "rotary_attention_factor", "attn_scale", "attn_scores_soft_cap",
                     "output_logits_soft_cap"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"Config.{name} must be a finite positive number, found {value!r}.")
        kv = self.n_heads if self.n_key_value_heads is None else self.n_key_value_heads
        if kv <= 0 or self.n_heads % kv:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a positive multiple of n_key_value_heads={kv}; "
                "set n_key_value_heads to a divisor of n_heads, or None for plain multi-head attention."
            )
        object.__setattr__(self, "n_key_value_heads", kv)
        if self.attn_scale is None:
            object.__setattr__(self, "attn_scale", math.sqrt(self.d_head))
        self._resolve_rotary()
        if self.qk_norm_over_heads and not self.use_qk_norm:
            raise ConfigError("Config.qk_norm_over_heads=True says how the query/key norm is taken, but "
                              "use_qk_norm is False: set use_qk_norm=True or leave qk_norm_over_heads False.")
        if (self.num_experts is None) != (self.experts_per_token is None) or (
                self.num_experts is not None and not 0 < self.experts_per_token <= self.num_experts):
            raise ConfigError(
                f"num_experts={self.num_experts} and experts_per_token={self.experts_per_token}: set both (a "
                "mixture of experts, 0 < experts_per_token <= num_experts) or neither (a dense MLP).")
        if self.shared_expert_d_mlp is not None and not (self.num_experts and self.shared_expert_d_mlp > 0):
            raise ConfigError(f"shared_expert_d_mlp={self.shared_expert_d_mlp} needs a mixture of experts "
                              "(num_experts set) and a positive width.")
        if self.window_sizes is not None and len(self.window_sizes) != self.n_layers:
            raise ConfigError(
                f"window_sizes must be a tuple with one entry per layer ({self.n_layers}), "
                f"found {self.window_sizes!r}; use None in an entry for global attention."
            )
        for w in self.window_sizes or ():
            if w is not None and w <= 0:
                raise ConfigError(f"window_sizes entries must be positive ints or None, found {w!r}.")

    def _resolve_rotary(self) -> None:
        if self.positional_embedding_type != "rotary":
            changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                       if f.name in _ROTARY_ONLY and getattr(self, f.name) != f.default]
            if changed:
                raise ConfigError(
                    f"Config.{', '.join(changed)}: rotary settings on a model with positional_embedding_type="
                    f"{self.positional_embedding_type!r}; leave them at their defaults or set "
                    "positional_embedding_type='rotary'."
                )
            return
        dim = self.d_head if self.rotary_dim is None else self.rotary_dim
        if dim <= 0 or dim > self.d_head or dim % 2:
            raise ConfigError(f"rotary_dim={dim} must be even, positive and at most d_head={self.d_head}.")
        object.__setattr__(self, "rotary_dim", dim)
        for name in ("rotary_freqs", "rotary_local_freqs"):
            freqs = getattr(self, name)
            if freqs is not None and len(freqs) != dim // 2:
                raise ConfigError(f"{name} has {len(freqs)} frequencies; rotary_dim={dim} needs {dim // 2}.")
        set_ = [n for n in ("rotary_scaling", "rotary_freqs", "rotary_dynamic_ntk") if getattr(self, n)]
        if len(set_) > 1:
            raise ConfigError(f"Config.{' and Config.'.join(set_)} are both set; a model has one rope "
                              "scaling: keep one.")

    @property
    def has_norm_weights(self) -> bool:
        return self.normalization_type in ("LN", "RMS")

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again).

        Fields at the value their None default resolves to (n_key_value_heads = n_heads, rotary_dim = d_head,
        attn_scale = sqrt(d_head)) follow the new sizes, as they would in a config built anew: a config equal
        to one built with None there must be replaced the same way.
        """
        derived = {"n_key_value_heads": self.n_heads, "attn_scale": math.sqrt(self.d_head),
                   "rotary_dim": self.d_head if self.positional_embedding_type == "rotary" else None}
        for name, value in derived.items():
            if name not in changes and getattr(self, name) == value:
                changes[name] = None
        return dataclasses.replace(self, **changes)

    # -- TransformerLens config attributes jaxlens derives (read-only; not fields) --------------------------
    @property
    def device(self) -> str:
        """JAX's default backend ("cpu", "gpu", "tpu"): where arrays go (TL's cfg.device; not part of the
        architecture, so not a field)."""
        import jax

        return jax.default_backend()

    @property
    def d_vocab_out(self) -> int:
        """Size of the output vocabulary: d_vocab (jaxlens unembeds to the input vocabulary)."""
        return self.d_vocab

    @property
    def attn_only(self) -> bool:
        """False: every jaxlens decoder block has an MLP (TL's attention-only toy models are unsupported)."""
        return False

    @property
    def use_hook_tokens(self) -> bool:
        """False: there is no `hook_tokens` hook point; to change the tokens, run other tokens (TL's default).
        Every other hook point always exists."""
        return False


def allowed_values(name: str) -> tuple:
    """The values an enumerated Config field accepts, from its annotation: `allowed_values("act_fn")`."""
    return tuple(_literals(_hints()[name]))


def _hints() -> dict[str, Any]:
    """Field name -> annotation object (no `from __future__ import annotations` here)."""
    return {f.name: f.type for f in dataclasses.fields(Config)}


def _literals(hint) -> list:
    """Every allowed value of a hint made of Literals and None; empty if the hint has other parts."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return list(args)
    if hint is type(None):
        return [None]
    if origin in (typing.Union, types.UnionType):
        parts = [_literals(a) for a in args]
        return [v for p in parts for v in p] if all(parts) else []
    return []


def _checked(name: str, value, hint):
    """`value` as the annotation `hint` wants it (numpy scalars -> Python numbers), or ConfigError."""
    allowed = _literals(hint)
    if allowed:
        if any(value is v or (isinstance(value, str) and value == v) for v in allowed):
            return value
        strings = [v for v in allowed if isinstance(v, str)]
        close = difflib.get_close_matches(value, strings, n=1) if isinstance(value, str) else ()
        hint_text = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Config.{name}={value!r} is not allowed; allowed values: "
                          f"{', '.join(map(repr, allowed))}.{hint_text}")
    ok, out = _coerce(value, hint)
    if not ok:
        found = f"{value!r} ({type(value).__name__})"
        raise ConfigError(f"Config.{name} must be {_describe(hint)}, found {found}.")
    return out


def _coerce(value, hint) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None, None
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, out = _coerce(value, a)
            if ok:
                return True, out
        return False, None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False, None
        parts = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(parts) != len(value):
            return False, None
        done = [_coerce(v, a) for v, a in zip(value, parts, strict=True)]
        return all(ok for ok, _ in done), tuple(out for _, out in done)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else None
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    return isinstance(value, hint), value


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of ({_describe(args[0])})"
        return f"a tuple ({', '.join(_describe(a) for a in args)})"
    return {bool: "a bool (True or False)", int: "an int", float: "a number"}.get(hint, f"a {hint.__name__}")
