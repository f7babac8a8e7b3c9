"""Dictionaries: sparse autoencoders and transcoders as Flax NNX modules (`base.py` has the contract), their
file formats (SAELens, circuit-tracer) and splicing into the model as interventions."""

from jaxlens.dictionaries import dashboard, probes, tuned_lens  # noqa: F401 (submodules: probes, lenses, dashboards)
from jaxlens.dictionaries.base import ARCHITECTURES as ARCHITECTURES
from jaxlens.dictionaries.base import Dictionary as Dictionary
from jaxlens.dictionaries.base import DictionaryConfig as DictionaryConfig
from jaxlens.dictionaries.base import DictionaryError as DictionaryError
from jaxlens.dictionaries.base import apply_updates as apply_updates
from jaxlens.dictionaries.base import fold_scaling as fold_scaling
from jaxlens.dictionaries.base import init_dictionary as init_dictionary
from jaxlens.dictionaries.base import normalise_decoder as normalise_decoder
from jaxlens.dictionaries.formats_circuit_tracer import load_circuit_tracer as load_circuit_tracer
from jaxlens.dictionaries.formats_circuit_tracer import save_circuit_tracer as save_circuit_tracer
from jaxlens.dictionaries.formats_saelens import load_saelens as load_saelens
from jaxlens.dictionaries.formats_saelens import save_saelens as save_saelens
from jaxlens.dictionaries.sae import BatchTopKSAE as BatchTopKSAE
from jaxlens.dictionaries.sae import JumpReLUSAE as JumpReLUSAE
from jaxlens.dictionaries.sae import StandardSAE as StandardSAE
from jaxlens.dictionaries.sae import TopKSAE as TopKSAE
from jaxlens.dictionaries.splice import Splice as Splice
from jaxlens.dictionaries.splice import ablate_features as ablate_features
from jaxlens.dictionaries.splice import feature_mask as feature_mask
from jaxlens.dictionaries.splice import feature_patching_sweep as feature_patching_sweep
from jaxlens.dictionaries.splice import patch_features as patch_features
from jaxlens.dictionaries.splice import run_with_cache as run_with_cache
from jaxlens.dictionaries.splice import scale_features as scale_features
from jaxlens.dictionaries.splice import splice as splice
from jaxlens.dictionaries.splice import spliced as spliced
from jaxlens.dictionaries.splice import steer_feature as steer_feature
from jaxlens.dictionaries.train import train_dictionaries as train_dictionaries
from jaxlens.dictionaries.transcoder import CrossLayerTranscoder as CrossLayerTranscoder
from jaxlens.dictionaries.transcoder import Transcoder as Transcoder
