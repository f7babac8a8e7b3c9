"""HookedTransformer: TransformerLens-shaped convenience over the pure core. Holds (cfg, params, tokenizer).

    model = HookedTransformer.from_pretrained("path/to/hf_dir")
    logits, cache = model.run_with_cache("The Eiffel Tower is in")
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_z", lambda z, hook: z * 0)])

Every method is a thin call into `jaxlens.model.forward`. No hook is registered and no state is toggled: hooks
passed to `run_with_hooks` live for that call only.
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxlens import hook_names
from jaxlens._hook_context import HookContext, active_hooks
from jaxlens._loading import numpy_to_jax, stream_transform
from jaxlens._module_view import WeightMethods
from jaxlens._token_methods import TokenMethods
from jaxlens.caching import cached_forward, run_jit
from jaxlens.config import Config
from jaxlens.errors import InputAssertionError, InputError, JaxlensError
from jaxlens.hook_names import HookTable
from jaxlens.interventions import Fn
from jaxlens.model.forward import check_tokens, lm_cross_entropy_loss
from jaxlens.params import cast_params
from jaxlens.shapes import Params
from jaxlens.weight_processing import check_refactorable, process_weights, processed_config
from jaxlens.weight_processing import refactor_factored_attn_matrices as refactor_attn


class HookedTransformer(TokenMethods, WeightMethods, HookContext):
    """A model as TransformerLens users know it. Args: cfg, params, tokenizer (optional)."""

    def __init__(self, cfg: Config, params: Params, tokenizer=None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: Any, *, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True,
                        refactor_factored_attn_matrices: bool = False, dtype=jnp.float32, tokenizer=None,
                        allow_pickle: bool = False, default_prepend_bos: bool | None = None,
                        default_padding_side: str | None = None, mesh=None,
                        fsdp: bool = False) -> "HookedTransformer":
        """Load a local Hugging Face directory or an in-memory `transformers` model, processed as TL does.

        Args:
            source: a directory (config.json + safetensors), a .gguf file, a `jaxlens convert` checkpoint, a
                Hugging Face repo id in the local cache, a packaged model name ("smollm2-135m"; see
                `jaxlens.hub.resolve`), or a `transformers` model.
            fold_ln, center_writing_weights, center_unembed, fold_value_biases: TL's weight processing.
            refactor_factored_attn_matrices: TL's experimental refactoring, after the rest: the same QK / OV
                circuits with orthogonal factors (`weight_processing.refactor_factored_attn_matrices`; not for
                rotary or grouped-query models).
            dtype: dtype of params and compute (jnp.float32, jnp.bfloat16 or jnp.float16). Processing runs in
                float32 on the float32 weights, then casts; with every processing step off, the checkpoint
                is read (a GGUF file decoded) straight to `dtype` instead, so no float32 copy exists.
            tokenizer: a Hugging Face tokenizer; by default the one saved beside the weights.
            allow_pickle: accept pickled `*.bin` weights (they can execute code when loaded).
            default_prepend_bos: whether `to_tokens` prepends BOS by default (None: the family's default).
            default_padding_side: "right" or "left": sets the tokenizer's `padding_side`, as TL does.
            mesh: a ("data", "model") mesh (`jaxlens.scale.make_mesh`): params sharded on it, each process
                reading only its shards (`jaxlens.scale.load_sharded`); None: on the default device.
            fsdp: with `mesh`, also split d_model of every matrix over `data` (`jaxlens.scale.RULES`).
        """
        from jaxlens import converters, hub

        if default_padding_side not in ("right", "left", None):
            raise InputAssertionError(
                f"default_padding_side must be 'right', 'left' or None; found {default_padding_side!r}.")
        # a directory, a .gguf file, a cached HF repo id or a packaged model name
        if hub.is_path_like(source):
            source = hub.resolve(source)
        flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                     center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        if mesh is None:
            processing = refactor_factored_attn_matrices or any(flags.values())  # needs float32 weights
            cfg, params = converters.load(source, allow_pickle=allow_pickle,
                                          dtype=jnp.float32 if processing else dtype)
            params = numpy_to_jax(params)
        else:
            from jaxlens.scale import load_sharded

            cfg, params = load_sharded(source, mesh, fsdp=fsdp, allow_pickle=allow_pickle)
        if tokenizer is None and isinstance(source, Path):
            tokenizer = converters.load_tokenizer(source)
        new_cfg = processed_config(cfg, **flags)
        if refactor_factored_attn_matrices:
            check_refactorable(new_cfg)

        def processed(p):
            c, p = process_weights(cfg, p, **flags)
            return cast_params(refactor_attn(c, p)[1] if refactor_factored_attn_matrices else p, dtype)

        params = stream_transform(processed, params)  # tensor by tensor: never two full copies
        if mesh is not None:  # processed leaves have XLA's shardings: placed by the rule table
            from jaxlens.scale import shard_params

            params = shard_params(params, new_cfg, mesh, fsdp=fsdp)
        if default_prepend_bos is not None:
            new_cfg = new_cfg.replace(default_prepend_bos=default_prepend_bos)
        model = cls(new_cfg, params)
        if tokenizer is not None:
            model.set_tokenizer(tokenizer, default_padding_side)
        return model

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
        out, _ = self._run(input, prepend_bos, interventions, (), start_at_layer, stop_at_layer,
                           attention_mask)
        return self._output(out, input, return_type, loss_per_token, stop_at_layer, prepend_bos,
                            attention_mask)

    __call__ = forward

    def run_with_cache(self, input, names_filter: hook_names.NamesFilter = None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False,
                       return_type: str | None = "logits", prepend_bos: bool | None = None,
                       start_at_layer: int | None = None, stop_at_layer: int | None = None,
                       loss_per_token: bool = False, attention_mask=None, pos_slice=None, *,
                       interventions=None, grad_metric: Callable | None = None):
        """(output, ActivationCache) with the activations `names_filter` selects: by default every hook of
        what runs (from `start_at_layer`, to `stop_at_layer`), less the optional ones not switched on
        (`set_use_*`).

        With incl_bwd, the cache also holds `<name>_grad`: the gradient of the loss (or of
        `grad_metric(output)`, needed with layer bounds) with respect to each cached activation (TL's backward
        hooks), honouring the layer bounds and `attention_mask`. `pos_slice` (TL's Slice: int, list, tuple,
        slice) keeps those positions of every cached activation (the query positions of patterns).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from jaxlens import HookedTransformer, init_params, testing
            >>> cfg = testing.tiny_config()              # 3 layers, 5 heads of 8, d_model 40, vocab 97
            >>> model = HookedTransformer(cfg, init_params(cfg, jax.random.key(0)))
            >>> tokens = jnp.array([[1, 5, 9, 2, 7]])
            >>> logits, cache = model.run_with_cache(tokens)
            >>> cache["pattern", 0].shape                # [batch head_index query_pos key_pos]
            (1, 5, 5, 5)
            >>> _, z_only = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_z"))
            >>> list(z_only.keys())
            ['blocks.0.attn.hook_z', 'blocks.1.attn.hook_z', 'blocks.2.attn.hook_z']
        """
        names = tuple(self.hook_table().select(names_filter, start_at_layer=start_at_layer,
                                               stop_at_layer=stop_at_layer, enabled=self.enabled_hooks))
        x = self._input(input, prepend_bos, start_at_layer)
        interventions = active_hooks(self, interventions)  # an open `with model.hooks(...)` block's hooks
        out, cache = cached_forward(self.params, self.cfg, x, names, interventions=interventions,
                                    start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
                                    attention_mask=attention_mask, incl_bwd=incl_bwd, grad_metric=grad_metric)
        if pos_slice is not None:
            cache = cache.slice_positions(pos_slice)
        if remove_batch_dim:
            cache.remove_batch_dim()
        out = self._output(out, input, return_type, loss_per_token, stop_at_layer, prepend_bos,
                           attention_mask)
        return out, cache

    # -- optional hook points (TL's use_attn_result, use_split_qkv_input, use_hook_mlp_in flags) -------------
    def hook_table(self) -> HookTable:
        """The hook table of this model (names, axes, parsing)."""
        return hook_names.decoder_table(self.cfg)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """TL's flag: whether `run_with_cache` records `attn.hook_result` by default (it always exists)."""
        self._enable({"attn.hook_result"}, use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TL's flag: whether `run_with_cache` records `hook_q_input`/`hook_k_input`/`hook_v_input`
        by default."""
        self._enable({"hook_q_input", "hook_k_input", "hook_v_input"}, use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """TL's flag: whether `run_with_cache` records `hook_mlp_in` by default (it always exists)."""
        self._enable({"hook_mlp_in"}, use_hook_mlp_in)

    @property
    def enabled_hooks(self) -> frozenset[str]:
        """Optional hook points (relative names) that `run_with_cache` records by default."""
        return getattr(self, "_enabled_hooks", frozenset())

    def _enable(self, names: set[str], on: bool) -> None:
        self._enabled_hooks = (self.enabled_hooks | names) if on else (self.enabled_hooks - names)

    def run_with_hooks(self, input, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
                       bwd_hooks: Sequence = (), return_type: str | None = "logits",
                       prepend_bos: bool | None = None, start_at_layer: int | None = None,
                       stop_at_layer: int | None = None, loss_per_token: bool = False, attention_mask=None,
                       reset_hooks_end: bool = True):
        """Run with `fwd_hooks`: [(hook name or name filter, fn(activation, hook) -> new activation)].

        The hooks apply to this call only (nothing persists). For gradients use run_with_cache(incl_bwd=True)
        or `jax.grad` through an `Add` intervention.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from jaxlens import HookedTransformer, init_params, testing, zero_ablate
            >>> cfg = testing.tiny_config()
            >>> model = HookedTransformer(cfg, init_params(cfg, jax.random.key(0)))
            >>> tokens = jnp.array([[1, 5, 9, 2, 7]])
            >>> def ablate_head_2(z, hook):              # returns the new activation; edits nothing
            ...     return z.at[:, :, 2].set(0.0)
            >>> hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ablate_head_2)])
            >>> as_data = model(tokens, interventions={
            ...     "blocks.1.attn.hook_z": zero_ablate((jnp.arange(cfg.n_heads) == 2)[:, None])})
            >>> bool(jnp.allclose(hooked, as_data, atol=1e-5))
            True
        """
        if bwd_hooks:
            raise JaxlensError("bwd_hooks are not supported: take gradients with "
                               "run_with_cache(incl_bwd=True) or jax.grad with respect to a zero `Add` "
                               "intervention.")
        interventions: dict[str, list] = {}
        for name, fn in fwd_hooks:
            chosen = ([name] if isinstance(name, str)
                      else self.hook_table().select(name, enabled=self.enabled_hooks))
            for n in chosen:
                self.hook_table().parse(n)
                interventions.setdefault(n, []).append(Fn(fn))
        return self.forward(input, return_type, loss_per_token, prepend_bos, start_at_layer, stop_at_layer,
                            attention_mask, interventions=interventions)

    # -- names (token helpers: jaxlens._token_methods; weights and module views: jaxlens._module_view) -------
    def hook_names(self) -> list[str]:
        """Every hook point's name (TL's `model.hook_dict.keys()`)."""
        return self.hook_table().all_names()

    # -- private ---------------------------------------------------------------------------------------------
    def _tokens(self, input, prepend_bos) -> jax.Array:
        if isinstance(input, (str, list)) and (isinstance(input, str) or isinstance(input[0], str)):
            return self.to_tokens(input, prepend_bos, padding_side="right")  # harmless under causal attention
        arr = jnp.asarray(input)
        return arr[None] if arr.ndim == 1 else arr

    def _input(self, input, prepend_bos, start_at_layer):
        """Checked token ids, or (with start_at_layer) the residual stream as given."""
        if start_at_layer is None:
            return check_tokens(self._tokens(input, prepend_bos), self.cfg)
        return jnp.asarray(input)

    def _run(self, input, prepend_bos, interventions, names, start_at_layer, stop_at_layer, attention_mask):
        x = self._input(input, prepend_bos, start_at_layer)
        interventions = active_hooks(self, interventions)  # an open `with model.hooks(...)` block's hooks
        return run_jit(self.params, self.cfg, x, interventions or {}, attention_mask,
                       cache_names=tuple(names), start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)

    def _output(self, out, input, return_type, loss_per_token, stop_at_layer, prepend_bos,
                attention_mask=None):
        if stop_at_layer is not None or return_type == "logits":
            return out
        if return_type is None:
            return None
        if return_type not in ("loss", "both"):
            raise InputError(f"return_type must be 'logits', 'loss', 'both' or None; found {return_type!r}.")
        loss = lm_cross_entropy_loss(out, self._tokens(input, prepend_bos), attention_mask=attention_mask,
                                     per_token=loss_per_token)
        return loss if return_type == "loss" else (out, loss)

    # -- circuits and generation: thin calls into jaxlens.analysis and jaxlens.generate ----------------------
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
                 use_past_kv_cache: bool = True, prepend_bos: bool | None = None,
                 padding_side: str | None = None, return_type: str = "input", verbose: bool = True, *,
                 key: jax.Array | None = None, interventions=None, intervention_positions="auto"):
        """Continue text or tokens (TL's `generate`, its arguments in its order) with a KV cache.

        `key` seeds sampling (None: a fresh key each call, warned once); `interventions` apply where
        `intervention_positions` says ("auto", "prompt", "all", "absolute", or {name: mode}; see
        `jaxlens.generate`). `padding_side` and `verbose` are accepted and ignored, as in TL 4.3: batched
        prompts are always left-padded, and the loop is one compiled call.
        """
        from jaxlens.generate import generate_from_input

        del padding_side
        interventions = active_hooks(self, interventions)  # an open `with model.hooks(...)` block's hooks
        return generate_from_input(
            self, input, max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
            do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature, freq_penalty=freq_penalty,
            use_past_kv_cache=use_past_kv_cache, prepend_bos=prepend_bos, return_type=return_type, key=key,
            interventions=interventions, intervention_positions=intervention_positions, verbose=verbose)
