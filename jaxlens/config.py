"""Config: the architecture of one model, frozen and hashable so jit can take it as a static argument.

Field names follow TransformerLens's `HookedTransformerConfig`. Every difference between model families is a
field here (rotary style, RMSNorm, gated MLP, grouped-query attention, parallel blocks, per-layer attention
windows, softcapping), never a branch on a model name.
"""

import dataclasses
import math
from typing import Literal

from jaxlens.errors import ConfigError

ActFn = Literal["gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"]
NormType = Literal["LN", "LNPre", "RMS", "RMSPre"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Architecture of one decoder-only transformer (see `shapes.py` for the axis names).

    Attributes:
        d_model, n_layers, n_heads, d_head, d_mlp, d_vocab, n_ctx: sizes, as TransformerLens names them.
        n_key_value_heads: key/value heads under grouped-query attention; None means n_heads (plain MHA).
        act_fn: MLP activation.
        normalization_type: "LN" / "RMS" with weights; "LNPre" / "RMSPre" after `fold_ln` moved the weights
            into the following linear maps; None for no normalisation.
        eps: normalisation epsilon.
        positional_embedding_type: "standard" (learned `W_pos`) or "rotary".
        rotary_dim: dimensions of each head that rotate (None: all of d_head).
        rotary_base: rotary theta.
        rotary_adjacent_pairs: True rotates adjacent pairs (GPT-J); False rotates halves (GPT-NeoX, Llama).
        rotary_scaling: Llama-3 style frequency scaling as (factor, low_freq_factor, high_freq_factor,
            original_max_position_embeddings), or None.
        gated_mlp: SwiGLU-style MLP with `W_gate` (hook_pre is the gate, hook_pre_linear the linear branch).
        parallel_attn_mlp: attention and MLP both read resid_pre and add into resid_post (GPT-J, NeoX, Phi).
        use_attn_scale: divide attention scores by `attn_scale` (GPT-Neo does not).
        attn_scale: the divisor; None means sqrt(d_head).
        window_sizes: per-layer attention window (a key is visible if query_pos - key_pos < window), None in
            an entry for global attention; None for all-global.
        attn_scores_soft_cap, output_logits_soft_cap: tanh softcapping (Gemma 2); None for none.
        use_normalization_before_and_after: extra norms on the attention and MLP outputs (Gemma 2:
            `ln1_post`, `ln2_post`).
        attention_dir: "causal" for decoders, "bidirectional" for encoders.
        default_prepend_bos: whether `to_tokens` prepends BOS by default.
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
    positional_embedding_type: Literal["standard", "rotary"] = "standard"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    rotary_scaling: tuple[float, float, float, int] | None = None
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    use_attn_scale: bool = True
    attn_scale: float | None = None
    window_sizes: tuple[int | None, ...] | None = None
    attn_scores_soft_cap: float | None = None
    output_logits_soft_cap: float | None = None
    use_normalization_before_and_after: bool = False
    attention_dir: Literal["causal", "bidirectional"] = "causal"
    default_prepend_bos: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Config.{name} must be a positive int, found {value!r}.")
        kv = self.n_key_value_heads
        if kv is not None and (kv <= 0 or self.n_heads % kv):
            raise ConfigError(
                f"n_heads={self.n_heads} must be a positive multiple of n_key_value_heads={kv}; "
                "set n_key_value_heads to a divisor of n_heads, or None for plain multi-head attention."
            )
        if self.positional_embedding_type == "rotary":
            if self.rotary_dim is not None and (self.rotary_dim > self.d_head or self.rotary_dim % 2):
                raise ConfigError(
                    f"rotary_dim={self.rotary_dim} must be even and at most d_head={self.d_head}."
                )
        if self.window_sizes is not None:
            if not isinstance(self.window_sizes, tuple) or len(self.window_sizes) != self.n_layers:
                raise ConfigError(
                    f"window_sizes must be a tuple with one entry per layer ({self.n_layers}), "
                    f"found {self.window_sizes!r}; use None in an entry for global attention."
                )
            for w in self.window_sizes:
                if w is not None and (not isinstance(w, int) or w <= 0):
                    raise ConfigError(f"window_sizes entries must be positive ints or None, found {w!r}.")
        if self.rotary_scaling is not None and not isinstance(self.rotary_scaling, tuple):
            raise ConfigError(f"rotary_scaling must be a tuple (hashable), found {type(self.rotary_scaling)}.")

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads (n_heads unless grouped-query attention)."""
        return self.n_key_value_heads or self.n_heads

    @property
    def rotary_dims(self) -> int:
        """Rotating dimensions per head."""
        return self.rotary_dim if self.rotary_dim is not None else self.d_head

    @property
    def scale(self) -> float:
        """What attention scores are divided by."""
        if not self.use_attn_scale:
            return 1.0
        return self.attn_scale if self.attn_scale is not None else math.sqrt(self.d_head)

    @property
    def has_norm_weights(self) -> bool:
        return self.normalization_type in ("LN", "RMS")

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
