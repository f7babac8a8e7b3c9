"""Checkpoint converters: one module per model family, chosen by the HF `architectures[0]` through REGISTRY.

Each family module defines ARCHITECTURES, HANDLED / IGNORED config keys, `config_from_hf(hf) -> Config` and
`params_from_checkpoint(tensors, cfg, hf) -> params` (numpy). `load` reads a local Hugging Face directory
(safetensors via numpy, no torch) or an in-memory `transformers` model, and checks every tensor was used.

This folder installs as `jaxlens.converters`; import it under that name only.
"""

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens.config import Config
from jaxlens.converters._checkpoint import TensorSource, load_dir_tensors
from jaxlens import hub
from jaxlens.errors import CheckpointError
from jaxlens.params import check_params

FAMILIES = ("gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "phi3")
REGISTRY: dict[str, str] = {}  # HF architecture -> module name
for _family in FAMILIES:
    for _arch in importlib.import_module(f"jaxlens.converters.{_family}").ARCHITECTURES:
        REGISTRY[_arch] = _family


ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM")  # jaxlens.converters.bert; loaded by HookedEncoder


def family_for(hf: Mapping[str, Any]):
    """The converter module for a Hugging Face config dict."""
    archs = hf.get("architectures") or []
    if not archs:
        raise CheckpointError("The config has no `architectures` entry; jaxlens picks the converter by it.")
    if archs[0] in ENCODER_ARCHITECTURES:
        raise CheckpointError(f"{archs[0]} is a BERT-style encoder, not a decoder: load it with "
                              "jaxlens.encoder.HookedEncoder.from_pretrained (converter: jaxlens.converters.bert).")
    if archs[0] not in REGISTRY:
        raise CheckpointError(
            f"No jaxlens converter for architecture {archs[0]!r}. Supported: {sorted(REGISTRY)}."
        )
    return importlib.import_module(f"jaxlens.converters.{REGISTRY[archs[0]]}")


def convert(hf: Mapping[str, Any], tensors: TensorSource) -> tuple[Config, dict]:
    """(Config, numpy params) from a config dict and its tensors; every tensor must be used."""
    module = family_for(hf)
    cfg = module.config_from_hf(hf)
    params = module.params_from_checkpoint(tensors, cfg, hf)
    tensors.finish()
    params = _to_float32(params)
    check_params(params, cfg)
    return cfg, params


def load(source, *, allow_pickle: bool = False) -> tuple[Config, dict]:
    """(Config, numpy params) from a local HF directory or an in-memory `transformers` model.

    Raises:
        CheckpointError: missing config, unknown architecture or config keys, missing/leftover/misshapen tensors.
        UnsafeCheckpointError: pickled weights without allow_pickle=True.
    """
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        hf = source.config.to_diff_dict() if hasattr(source.config, "to_diff_dict") else source.config.to_dict()
        hf.setdefault("architectures", [type(source).__name__])
        sd = {k: _tensor_to_numpy(v) for k, v in source.state_dict().items()}
        return convert(hf, TensorSource(sd, origin=f"in-memory {type(source).__name__}"))
    path = hub.resolve(source)  # a directory, a .gguf file, a cached HF repo id or a packaged model name
    if path.is_file():
        return hub.load_gguf(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory holding config.json and weights.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json; jaxlens needs it to know the architecture.")
    hf = json.loads(config_file.read_text())
    family_for(hf)  # an unknown architecture is reported before any weight is read
    return convert(hf, load_dir_tensors(path, allow_pickle=allow_pickle))


def _tensor_to_numpy(t) -> np.ndarray:
    t = t.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def _to_float32(tree):
    if isinstance(tree, dict):
        return {k: _to_float32(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)
