"""SAELens directories: `cfg.json` + `sae_weights.safetensors` (sae-lens 6.x, and the configs written before
6.0), read and written without PyTorch; loading never executes pickled code.

    sae = load_saelens("out/my_sae")            # any architecture SAELens saves for inference
    save_saelens(sae, "out/copy")               # SAELens.load_from_disk reads it back

Mapping (SAELens `architecture` -> jaxlens): standard, topk, jumprelu as themselves; a BatchTopK dictionary is
saved as jumprelu with its running threshold for every feature (as SAELens saves it); transcoder,
skip_transcoder (relu) and jumprelu_transcoder, jumprelu_skip_transcoder (activation "jumprelu"). Pre-6.0
configs (`sae_lens_version` < 6, or none) are read as SAELens's `handle_pre_6_0_config` reads them:
`hook_point` -> hook_name, topk from `activation_fn_kwargs.k`, a bool `normalize_activations`.

Every cfg.json key is either used or known to be irrelevant at inference (training settings, device); an
unknown key is an error naming it (pass strict=False to ignore it), and so is any tensor left unread.
"""

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlens import _atomic
from jaxlens.converters._checkpoint import read_safetensors, write_safetensors
from jaxlens.dictionaries.base import Dictionary, DictionaryConfig, DictionaryError, init_dictionary

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # written into metadata, so SAELens reads the file as a 6.x config

#: SAELens architecture -> (jaxlens architecture, transcoder activation)
_FROM_SAELENS = {
    "standard": ("standard", "relu"),
    "topk": ("topk", "relu"),
    "jumprelu": ("jumprelu", "relu"),
    "transcoder": ("transcoder", "relu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}
#: keys read into DictionaryConfig
HANDLED = frozenset(
    {
        "architecture",
        "d_in",
        "d_sae",
        "d_out",
        "k",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "rescale_acts_by_decoder_norm",
        "metadata",
        "hook_name",
        "hook_point",
        "hook_name_out",
        "activation_fn",
        "activation_fn_str",
        "activation_fn_kwargs",
        "finetuning_scaling_factor",
        "sae_lens_version",
    }
)
#: keys with no effect on inference (device, training-run settings, provenance); kept in metadata when
#: SAELens keeps them there (LLM_METADATA_KEYS)
METADATA_KEYS = frozenset(
    {
        "model_name",
        "hook_head_index",
        "hook_point_head_index",
        "model_class_name",
        "model_from_pretrained_kwargs",
        "prepend_bos",
        "exclude_special_tokens",
        "neuronpedia_id",
        "context_size",
        "seqpos_slice",
        "dataset_path",
        "sae_lens_training_version",
        "hook_head_index_out",
        "hf_hook_name",
        "hf_hook_name_out",
    }
)
IGNORED = METADATA_KEYS | frozenset(
    {
        "device",
        "hook_layer",
        "dataset_trust_remote_code",
        "use_sparse_activations",
        "training_architecture",
        # pre-6.0 training configs carried their run settings into cfg.json
        "l1_coefficient",
        "lp_norm",
        "lr",
        "lr_scheduler_name",
        "lr_warm_up_steps",
        "lr_end",
        "lr_decay_steps",
        "l1_warm_up_steps",
        "train_batch_size_tokens",
        "training_tokens",
        "context_size",
        "store_batch_size_prompts",
        "n_batches_in_buffer",
        "use_ghost_grads",
        "feature_sampling_window",
        "dead_feature_window",
        "dead_feature_threshold",
        "b_dec_init_method",
        "init_encoder_as_decoder_transpose",
        "decoder_orthogonal_init",
        "decoder_heuristic_init",
        "normalize_sae_decoder",
        "noise_scale",
        "mse_loss_normalization",
        "seed",
        "log_to_wandb",
        "wandb_project",
        "run_name",
        "checkpoint_path",
        "n_checkpoints",
        "expansion_factor",
        "is_dataset_tokenized",
        "streaming",
        "autocast",
        "autocast_lm",
        "compile_llm",
        "compile_sae",
        "llm_compilation_mode",
        "sae_compilation_mode",
        "adam_beta1",
        "adam_beta2",
        "scale_sparsity_penalty_by_decoder_norm",
        "cached_activations_path",
        "use_cached_activations",
        "jumprelu_init_threshold",
        "jumprelu_bandwidth",
        "wandb_log_frequency",
        "eval_every_n_wandb_logs",
        "model_kwargs",
        "act_store_device",
        "eval_batch_size_prompts",
        "n_eval_batches",
        "verbose",
        "tokens_per_buffer",
        "resume",
        "wandb_id",
        "wandb_entity",
        "sae_lens_training",
        "dataset_name",
    }
)


def load_saelens(path: str | Path, *, strict: bool = True) -> Dictionary:
    """The dictionary in a SAELens directory.

    Args:
        path: the folder holding cfg.json and sae_weights.safetensors.
        strict: an unknown cfg.json key is an error (False: ignored).

    Raises:
        DictionaryError: a missing file, an unknown architecture or cfg.json key, a setting jaxlens does not
            implement (activation normalisation left unfolded), or tensors that do not match the config.
        jaxlens.errors.CheckpointError: a corrupt safetensors file.
    """
    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise DictionaryError(
                f"{path} is not a SAELens directory: {p.name} is missing (a SAELens SAE "
                f"is a "
                f"folder with {CFG_FILE} and {WEIGHTS_FILE})."
            )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DictionaryError(f"{cfg_path} is not valid JSON ({e}).") from None
    cfg = config_from_saelens(raw, strict=strict, where=str(cfg_path))
    tensors = {k: read() for k, read in read_safetensors(w_path).items()}
    return dictionary_from_tensors(cfg, tensors, where=str(w_path))


def save_saelens(dictionary: Dictionary, path: str | Path) -> Path:
    """Write `dictionary` as a SAELens 6.x directory (each file replaced atomically); returns the folder.

    Raises:
        DictionaryError: a cross-layer transcoder (SAELens has no CLT format; use `save_circuit_tracer`), or
            a transcoder with a top-k activation (no SAELens architecture).
    """
    cfg, path = dictionary.cfg, Path(path)
    tensors = {k: np.asarray(v, np.float32) for k, v in _tensors(dictionary).items()}
    if cfg.architecture == "batchtopk":
        tensors["threshold"] = np.full((cfg.d_sae,), float(tensors.pop("topk_threshold")), np.float32)
    path.mkdir(parents=True, exist_ok=True)
    with _atomic.atomic_path(path / WEIGHTS_FILE) as tmp:
        write_safetensors(tensors, tmp)
    _atomic.write_json(path / CFG_FILE, config_to_saelens(cfg))
    return path


def config_from_saelens(raw: dict, *, strict: bool = True, where: str = CFG_FILE) -> DictionaryConfig:
    """A cfg.json dictionary (6.x or pre-6.0) as a DictionaryConfig; see `load_saelens`."""
    if not isinstance(raw, dict):
        raise DictionaryError(f"{where}: expected a JSON object, found {type(raw).__name__}.")
    unknown = sorted(set(raw) - HANDLED - IGNORED)
    if unknown and strict:
        raise DictionaryError(
            f"{where}: unknown SAELens config key(s) {', '.join(map(repr, unknown))}; "
            f"jaxlens "
            "does not know whether they change what the SAE computes. Pass strict=False to "
            "load it anyway."
        )
    meta = dict(raw.get("metadata") or {})
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    pre6 = not version or _major(version) < 6
    raw = dict(raw)
    if pre6:
        raw.setdefault("hook_name", raw.get("hook_point"))
        act = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
        raw.setdefault("architecture", "standard")
        raw.setdefault("apply_b_dec_to_input", True)
        if act == "topk" and (raw.get("activation_fn_kwargs") or {}).get("k") is not None:
            raw["architecture"], raw["k"] = "topk", raw["activation_fn_kwargs"]["k"]
        elif act not in ("relu", None) and raw["architecture"] == "standard":
            raise DictionaryError(
                f"{where}: activation_fn {act!r} is not one jaxlens implements for a "
                "pre-6.0 standard SAE (relu, or topk with activation_fn_kwargs.k)."
            )
        if isinstance(raw.get("normalize_activations"), bool):
            raw["normalize_activations"] = (
                "expected_average_only_in" if raw["normalize_activations"] else "none"
            )
        meta.update(
            {k: v for k, v in raw.items() if k in METADATA_KEYS or k in ("hook_name", "hook_name_out")}
        )
    arch = raw.get("architecture")
    if arch not in _FROM_SAELENS:
        raise DictionaryError(
            f"{where}: unknown SAELens architecture {arch!r}; jaxlens reads {', '.join(_FROM_SAELENS)}."
        )
    norm = raw.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise DictionaryError(
            f"{where}: normalize_activations={norm!r} is not folded into the weights; "
            f"jaxlens "
            "reads SAEs whose normalisation is 'none' (fold it with SAELens first)."
        )
    if raw.get("finetuning_scaling_factor"):
        raise DictionaryError(f"{where}: finetuning_scaling_factor is set; jaxlens does not implement it.")
    name, activation = _FROM_SAELENS[arch]
    hook = raw.get("hook_name") or meta.get("hook_name") or ""
    hook_out = raw.get("hook_name_out") or meta.get("hook_name_out")
    keep = {k: v for k, v in meta.items() if k not in ("hook_name", "hook_name_out") and v is not None}
    try:
        return DictionaryConfig(
            architecture=name,
            activation=activation,
            d_in=int(raw["d_in"]),
            d_sae=int(raw["d_sae"]),
            d_out=raw.get("d_out"),
            k=raw.get("k") if name == "topk" else None,
            hook_name=hook,
            hook_name_out=hook_out,
            dtype=_dtype(raw.get("dtype", "float32")),
            apply_b_dec_to_input=bool(
                raw.get("apply_b_dec_to_input", name in ("standard", "topk", "jumprelu"))
            ),
            rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
            reshape_activations=raw.get("reshape_activations") or ("hook_z" if "hook_z" in hook else "none"),
            metadata=tuple(sorted((k, _freeze(v)) for k, v in keep.items())),
        )
    except KeyError as e:
        raise DictionaryError(f"{where}: required key {e.args[0]!r} is missing.") from None


def config_to_saelens(cfg: DictionaryConfig) -> dict[str, Any]:
    """cfg.json of a 6.x SAELens directory for `cfg`."""
    if cfg.architecture == "clt" or (cfg.is_transcoder and cfg.activation in ("topk", "batchtopk")):
        raise DictionaryError(
            f"SAELens has no format for a {cfg.architecture} with activation "
            f"{cfg.activation!r}; "
            "save a cross-layer transcoder with save_circuit_tracer."
        )
    arch = {"batchtopk": "jumprelu"}.get(cfg.architecture, cfg.architecture)
    if cfg.is_transcoder and cfg.activation == "jumprelu":
        arch = f"jumprelu_{arch}"
    meta = {k: _thaw(v) for k, v in cfg.metadata}
    meta.update(hook_name=cfg.hook_name, sae_lens_version=SAELENS_VERSION)
    out = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": cfg.reshape_activations,
        "metadata": meta,
    }
    if cfg.is_transcoder:
        out["d_out"] = cfg.out_width
        meta["hook_name_out"] = cfg.hook_name_out
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    return out


def dictionary_from_tensors(
    cfg: DictionaryConfig, tensors: dict[str, np.ndarray], *, where: str
) -> Dictionary:
    """A dictionary of `cfg` holding `tensors` (SAELens names and shapes), each checked and all consumed."""
    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU checkpoints
        tensors["threshold"] = np.exp(tensors.pop("log_threshold"))
    if "scaling_factor" in tensors:
        sf = tensors.pop("scaling_factor")
        if not np.allclose(sf, 1.0):
            raise DictionaryError(
                f"{where}: holds a finetuning scaling_factor other than 1; jaxlens does not implement it."
            )
    module = init_dictionary(cfg, jax.random.key(0))
    want = _tensors(module)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise DictionaryError(
            f"{where}: a {cfg.architecture} dictionary (activation {cfg.activation}) has "
            f"tensors "
            f"{sorted(want)}; missing {missing}, unexpected {extra}."
        )
    for k, arr in tensors.items():
        if tuple(arr.shape) != tuple(want[k].shape):
            raise DictionaryError(
                f"{where}: tensor {k!r} has shape {tuple(arr.shape)}; the config (d_in="
                f"{cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.out_width}) needs "
                f"{tuple(want[k].shape)}."
            )
        var = getattr(module, k)
        var[...] = np.asarray(arr, dtype=var[...].dtype)
    return module


def _tensors(module: Dictionary) -> dict[str, jax.Array]:
    from flax import nnx

    return {k: v for k, v in nnx.state(module).to_pure_dict().items()}


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise DictionaryError(f"Cannot read sae_lens_version {version!r}.") from None


def _dtype(name: str) -> str:
    name = str(name).removeprefix("torch.")
    if name in ("float32", "float16", "bfloat16", "float64"):
        return name
    raise DictionaryError(f"Unknown dtype {name!r} in cfg.json (float32, float16, bfloat16 or float64).")


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("__list__",) + tuple(_freeze(x) for x in v)
    return v


def _thaw(v):
    if isinstance(v, tuple) and v[:1] == ("__list__",):
        return [_thaw(x) for x in v[1:]]
    if isinstance(v, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in v):
        return {k: _thaw(x) for k, x in v}
    return v
