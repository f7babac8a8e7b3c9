"""HookedTransformer: TransformerLens-shaped convenience over the pure core. Holds (cfg, params, tokenizer).

    model = HookedTransformer.from_pretrained("path/to/hf_dir")
    logits, cache = model.run_with_cache("The Eiffel Tower is in")
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_z", lambda z, hook: z * 0)])

Every method is a thin call into `jaxlens.model.forward`. No hook is registered and no state is toggled: hooks
passed to `run_with_hooks` live for that call only.
"""

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens import hook_names, tokenizer as tok
from jaxlens._loading import numpy_to_jax, stream_transform
from jaxlens.cache import ActivationCache
from jaxlens.config import Config
from jaxlens.errors import InputError, JaxlensError
from jaxlens.interventions import Add, Fn
from jaxlens.model.forward import check_tokens, lm_cross_entropy_loss, run
from jaxlens.params import cast_params
from jaxlens.shapes import Params
from jaxlens.weight_processing import process_weights


@functools.partial(jax.jit, static_argnames=("cfg", "cache_names", "start_at_layer", "stop_at_layer"))
def _run_jit(params, cfg, tokens, interventions, attention_mask, *, cache_names=(), start_at_layer=None,
             stop_at_layer=None):
    out, cache, _ = run(params, cfg, tokens, interventions=interventions, cache_names=cache_names,
                        start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, attention_mask=attention_mask)
    return out, cache


def _weight(*path: str, repeat_kv: bool = False, doc: str = ""):
    def get(self):
        x = self.params
        for p in path:
            x = x[p]
        if repeat_kv:
            x = jnp.repeat(x, self.cfg.n_heads // self.cfg.n_kv_heads, axis=1)
        return x
    return property(get, doc=doc or f"params[{']['.join(map(repr, path))}]")


class HookedTransformer:
    """A model as TransformerLens users know it. Args: cfg, params, tokenizer (optional)."""

    def __init__(self, cfg: Config, params: Params, tokenizer=None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: Any, *, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True, dtype=jnp.float32,
                        tokenizer=None, allow_pickle: bool = False) -> "HookedTransformer":
        """Load a local Hugging Face directory or an in-memory `transformers` model, processed as TL does.

        Args:
            source: a directory (config.json + safetensors), a .gguf file, a Hugging Face repo id in the local
                cache, a packaged model name ("smollm2-135m"; see `jaxlens.hub.resolve`), or a `transformers` model.
            fold_ln, center_writing_weights, center_unembed, fold_value_biases: TL's weight processing.
            dtype: dtype of params and compute (jnp.float32 or jnp.bfloat16); processing runs in float32.
            tokenizer: a Hugging Face tokenizer; by default the one saved beside the weights.
            allow_pickle: accept pickled `*.bin` weights (they can execute code when loaded).
        """
        from jaxlens import converters, hub

        if hub.is_path_like(source):  # a directory, a .gguf file, a cached HF repo id or a packaged model name
            source = hub.resolve(source)
        cfg, params = converters.load(source, allow_pickle=allow_pickle)
        if tokenizer is None and isinstance(source, Path):
            tokenizer = hub.load_tokenizer(source)
        flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                     fold_value_biases=fold_value_biases)
        new_cfg = []

        def processed(p):
            c, p = process_weights(cfg, p, **flags)
            new_cfg.append(c)  # static: decided while tracing
            return cast_params(p, dtype)

        params = stream_transform(processed, numpy_to_jax(params))  # tensor by tensor: never two full copies
        return cls(new_cfg[0], params, tokenizer)

    @classmethod
    def from_pretrained_no_processing(cls, source: Any, **kwargs) -> "HookedTransformer":
        """`from_pretrained` with every weight-processing step off: params as in the checkpoint."""
        off = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
        return cls.from_pretrained(source, **{**off, **kwargs})

    # -- running ---------------------------------------------------------------------------------------------
    def forward(self, input, return_type: str | None = "logits", loss_per_token: bool = False,
                prepend_bos: bool | None = None, start_at_layer: int | None = None,
                stop_at_layer: int | None = None, attention_mask=None, *, interventions=None):
        """Logits, loss, both (logits, loss) or None; with stop_at_layer, the residual stream there."""
        out, _ = self._run(input, prepend_bos, interventions, (), start_at_layer, stop_at_layer, attention_mask)
        return self._output(out, input, return_type, loss_per_token, stop_at_layer, prepend_bos)

    __call__ = forward

    def run_with_cache(self, input, names_filter: hook_names.NamesFilter = None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, return_type: str | None = "logits", prepend_bos: bool | None = None,
                       start_at_layer: int | None = None, stop_at_layer: int | None = None,
                       loss_per_token: bool = False, attention_mask=None, *, interventions=None,
                       grad_metric: Callable | None = None):
        """(output, ActivationCache) with the activations `names_filter` selects (all by default).

        With incl_bwd, the cache also holds `<name>_grad`: the gradient of the loss (or of
        `grad_metric(logits)`) with respect to each cached activation (TL's backward hooks).
        """
        names = tuple(hook_names.select(self.cfg, names_filter))
        if incl_bwd:
            raw = self._grads(input, prepend_bos, interventions, names, grad_metric)
            out, raw = raw
        else:
            out, raw = self._run(input, prepend_bos, interventions, names, start_at_layer, stop_at_layer,
                                 attention_mask)
        cache = ActivationCache(raw, self.cfg, self.params)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return self._output(out, input, return_type, loss_per_token, stop_at_layer, prepend_bos), cache

    def run_with_hooks(self, input, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
                       bwd_hooks: Sequence = (), return_type: str | None = "logits", prepend_bos: bool | None = None,
                       start_at_layer: int | None = None, stop_at_layer: int | None = None,
                       loss_per_token: bool = False, attention_mask=None, reset_hooks_end: bool = True):
        """Run with `fwd_hooks`: [(hook name or name filter, fn(activation, hook) -> new activation)].

        The hooks apply to this call only (nothing persists). For gradients use run_with_cache(incl_bwd=True)
        or `jax.grad` through an `Add` intervention.
        """
        if bwd_hooks:
            raise JaxlensError("bwd_hooks are not supported: take gradients with run_with_cache(incl_bwd=True) "
                               "or jax.grad with respect to a zero `Add` intervention.")
        interventions: dict[str, list] = {}
        for name, fn in fwd_hooks:
            chosen = [name] if isinstance(name, str) else hook_names.select(self.cfg, name)
            for n in chosen:
                hook_names.parse(self.cfg, n)
                interventions.setdefault(n, []).append(Fn(fn))
        return self.forward(input, return_type, loss_per_token, prepend_bos, start_at_layer, stop_at_layer,
                            attention_mask, interventions=interventions)

    # -- tokens ----------------------------------------------------------------------------------------------
    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None) -> jax.Array:
        """Token ids [batch pos] (BOS prepended per cfg.default_prepend_bos unless told)."""
        bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        return jnp.asarray(tok.encode(self.tokenizer, input, bos))

    def to_string(self, tokens) -> str | list[str]:
        """Decode ids: one string for [pos], a list for [batch pos]."""
        arr = np.asarray(tokens)
        if arr.ndim == 0:
            arr = arr[None]
        if arr.ndim == 1:
            return self.tokenizer.decode(arr.tolist())
        return [self.tokenizer.decode(r.tolist()) for r in arr]

    def to_str_tokens(self, input, prepend_bos: bool | None = None) -> list[str]:
        """Each token as a string (text is tokenized first)."""
        ids = self.to_tokens(input, prepend_bos)[0] if isinstance(input, str) else np.asarray(input).reshape(-1)
        return [self.tokenizer.decode([int(i)]) for i in np.asarray(ids)]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token.

        Raises:
            InputError: the string is several tokens (or none).
        """
        ids = tok.encode(self.tokenizer, string, prepend_bos=False)[0] if string else []
        if len(ids) != 1:
            raise InputError(f"{string!r} is {len(ids)} tokens ({[self.tokenizer.decode([int(i)]) for i in ids]}), "
                             "not one. Pick a string that is a single token (often with a leading space).")
        return int(ids[0])

    def get_token_position(self, single_token: str | int, input, mode: str = "first",
                           prepend_bos: bool | None = None) -> int:
        """Position of `single_token` in `input` (text or ids), its first or last occurrence."""
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        ids = np.asarray(self.to_tokens(input, prepend_bos) if isinstance(input, str) else input).reshape(-1)
        where = np.nonzero(ids == token)[0]
        if where.size == 0:
            raise InputError(f"Token {token} ({self.tokenizer.decode([token])!r}) does not occur in the input.")
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last'; found {mode!r}.")
        return int(where[0] if mode == "first" else where[-1])

    def tokens_to_residual_directions(self, tokens) -> jax.Array:
        """W_U columns of the tokens: [d_model] for one token, [... d_model] for an array."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return self.W_U[:, tokens].T if jnp.ndim(tokens) else self.W_U[:, tokens]

    def hook_names(self) -> list[str]:
        """Every hook point's name (TL's `model.hook_dict.keys()`)."""
        return hook_names.all_names(self.cfg)

    # -- weights, stacked over layers as TL's properties ----------------------------------------------------
    W_E = _weight("embed", "W_E")
    W_pos = _weight("pos_embed", "W_pos")
    W_U = _weight("unembed", "W_U")
    b_U = _weight("unembed", "b_U")
    W_Q = _weight("blocks", "attn", "W_Q")
    W_K = _weight("blocks", "attn", "W_K", repeat_kv=True)
    W_V = _weight("blocks", "attn", "W_V", repeat_kv=True)
    W_O = _weight("blocks", "attn", "W_O")
    b_Q = _weight("blocks", "attn", "b_Q")
    b_K = _weight("blocks", "attn", "b_K", repeat_kv=True)
    b_V = _weight("blocks", "attn", "b_V", repeat_kv=True)
    b_O = _weight("blocks", "attn", "b_O")
    W_in = _weight("blocks", "mlp", "W_in")
    W_gate = _weight("blocks", "mlp", "W_gate")
    W_out = _weight("blocks", "mlp", "W_out")
    b_in = _weight("blocks", "mlp", "b_in")
    b_out = _weight("blocks", "mlp", "b_out")

    # -- private ---------------------------------------------------------------------------------------------
    def _tokens(self, input, prepend_bos) -> jax.Array:
        if isinstance(input, (str, list)) and (isinstance(input, str) or isinstance(input[0], str)):
            return self.to_tokens(input, prepend_bos)
        arr = jnp.asarray(input)
        return arr[None] if arr.ndim == 1 else arr

    def _run(self, input, prepend_bos, interventions, names, start_at_layer, stop_at_layer, attention_mask):
        if start_at_layer is None:
            x = check_tokens(self._tokens(input, prepend_bos), self.cfg)
        else:
            x = jnp.asarray(input)
        return _run_jit(self.params, self.cfg, x, interventions or {}, attention_mask, cache_names=tuple(names),
                        start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)

    def _grads(self, input, prepend_bos, interventions, names, grad_metric):
        tokens = check_tokens(self._tokens(input, prepend_bos), self.cfg)
        metric = grad_metric or (lambda logits: lm_cross_entropy_loss(logits, tokens))
        interventions = dict(interventions or {})
        shapes = jax.eval_shape(lambda: run(self.params, self.cfg, tokens, interventions=interventions,
                                            cache_names=names)[1])
        zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}

        def f(deltas, params, tokens, interventions):  # weights as arguments: never baked in as constants
            ivs = {n: list(_as_list(interventions.get(n))) + [Add(d)] for n, d in deltas.items()}
            ivs.update({n: v for n, v in interventions.items() if n not in ivs})
            out, cache, _ = run(params, self.cfg, tokens, interventions=ivs, cache_names=names)
            return metric(out), (out, cache)

        grads, (out, cache) = jax.jit(jax.grad(f, has_aux=True))(zeros, self.params, tokens, interventions)
        return out, {**cache, **{f"{n}_grad": g for n, g in grads.items()}}

    def _output(self, out, input, return_type, loss_per_token, stop_at_layer, prepend_bos):
        if stop_at_layer is not None or return_type == "logits":
            return out
        if return_type is None:
            return None
        if return_type not in ("loss", "both"):
            raise InputError(f"return_type must be 'logits', 'loss', 'both' or None; found {return_type!r}.")
        loss = lm_cross_entropy_loss(out, self._tokens(input, prepend_bos), per_token=loss_per_token)
        return loss if return_type == "loss" else (out, loss)

    # -- circuits and generation: thin calls into jaxlens.analysis and jaxlens.generate ------------------------
    @property
    def OV(self):
        """Every head's OV circuit W_V @ W_O: FactoredMatrix [layer head_index d_model d_model] (as TL)."""
        from jaxlens.analysis.composition import OV

        return OV(self.params, self.cfg)

    @property
    def QK(self):
        """Every head's QK circuit W_Q @ W_K^T: FactoredMatrix [layer head_index d_model d_model] (as TL)."""
        from jaxlens.analysis.composition import QK

        return QK(self.params, self.cfg)

    def all_composition_scores(self, mode: str) -> jax.Array:
        """Q-, K- or V-composition scores of every head pair, [layer head_index layer head_index] (as TL)."""
        from jaxlens.analysis.composition import all_composition_scores

        return all_composition_scores(self.params, self.cfg, mode)

    def all_head_labels(self) -> list[str]:
        """"L{layer}H{head}" for every head, layer-major (as TL)."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def generate(self, input: Any = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | None = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 use_past_kv_cache: bool = True, prepend_bos: bool | None = None, return_type: str = "input",
                 *, key: jax.Array | None = None, interventions=None):
        """Continue text or tokens (TL's `generate`) with a KV cache; `key` seeds sampling (default key 0),
        `interventions` apply at every step (see `jaxlens.generate`)."""
        from jaxlens.generate import generate_from_input

        return generate_from_input(
            self, input, max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id, do_sample=do_sample,
            top_k=top_k, top_p=top_p, temperature=temperature, freq_penalty=freq_penalty,
            use_past_kv_cache=use_past_kv_cache, prepend_bos=prepend_bos, return_type=return_type, key=key,
            interventions=interventions)


def _as_list(x) -> list:
    if x is None:
        return []
    return x if isinstance(x, list) else [x]
