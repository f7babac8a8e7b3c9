"""The family converters, chosen by a Hugging Face config's `architectures[0]` through REGISTRY; `convert`.

Each family module defines ARCHITECTURES, HANDLED / IGNORED config keys, `config_from_hf(hf) -> Config` and
`params_from_checkpoint(tensors, cfg, hf) -> params` (numpy). No name sniffing: an architecture is in REGISTRY
or it is an error that lists the supported ones.

    cfg, params = convert(hf_config_dict, TensorSource(tensors))
"""

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from jaxlens.config import Config
from jaxlens.converters import (
    cohere,
    gemma,
    gemma2,
    gemma3,
    gpt2,
    gpt_bigcode,
    gpt_neo,
    gpt_neox,
    gptj,
    llama,
    mistral,
    mixtral,
    olmo2,
    opt,
    phi,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    stablelm,
)
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._gguf_quant import float_dtype
from jaxlens.errors import CheckpointError
from jaxlens.params import check_params

FAMILIES: tuple[ModuleType, ...] = (
    gpt2, gpt_neo, gptj, gpt_neox, opt, llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, gemma,
    gemma2, gemma3, phi, phi3, stablelm, olmo2, gpt_bigcode, cohere)
#: Hugging Face architecture name -> its converter module.
REGISTRY: dict[str, ModuleType] = {arch: module for module in FAMILIES for arch in module.ARCHITECTURES}

ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM")  # jaxlens.converters.bert; loaded by HookedEncoder


def family_for(hf: Mapping[str, Any]) -> ModuleType:
    """The converter module for a Hugging Face config dict.

    Raises:
        CheckpointError: no `architectures`, an encoder architecture, or one no converter handles.
    """
    archs = hf.get("architectures") or []
    if not archs:
        raise CheckpointError("The config has no `architectures` entry; jaxlens picks the converter by it.")
    if archs[0] in ENCODER_ARCHITECTURES:
        raise CheckpointError(f"{archs[0]} is a BERT-style encoder, not a decoder: load it with "
                              "jaxlens.encoder.HookedEncoder.from_pretrained (converter: "
                              "jaxlens.converters.bert).")
    if archs[0] not in REGISTRY:
        raise CheckpointError(
            f"No jaxlens converter for architecture {archs[0]!r}. Supported: {sorted(REGISTRY)}."
        )
    return REGISTRY[archs[0]]


def convert(hf: Mapping[str, Any], tensors: TensorSource, *, dtype=np.float32) -> tuple[Config, dict]:
    """(Config, numpy params of `dtype`) from a config dict and its tensors; every tensor must be used.

    `dtype` (float32, or float16 / bfloat16 for a half-precision model) is what each tensor is cast to as the
    converter takes it (`TensorSource.dtype`), so a narrower model never has a float32 copy.

    Raises:
        CheckpointError: as `family_for` and the family's config check; missing / leftover / misshapen
            tensors.
        InputError: a dtype other than float32, float16, bfloat16.
    """
    module = family_for(hf)
    cfg = module.config_from_hf(hf)
    tensors.dtype = float_dtype(dtype)
    params = module.params_from_checkpoint(tensors, cfg, hf)
    tensors.finish()
    params = _to_dtype(params, tensors.dtype)
    check_params(params, cfg)
    return cfg, params


def _to_dtype(tree, dtype: np.dtype):
    if isinstance(tree, dict):
        return {k: _to_dtype(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype)
