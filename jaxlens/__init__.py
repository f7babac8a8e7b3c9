"""jaxlens: mechanistic interpretability for transformer language models, in JAX.

The model is a pure function, `forward(params, cfg, tokens, interventions=..., cache_names=...)`, returning
logits and a cache of activations under TransformerLens's hook names. Interventions are data, so a whole
patching sweep is one compiled computation.
"""

from jaxlens import hook_names as hook_names
from jaxlens import interventions as interventions
from jaxlens.cache import ActivationCache as ActivationCache
from jaxlens.config import Config as Config
from jaxlens.errors import JaxlensError as JaxlensError
from jaxlens.hook_names import get_act_name as get_act_name
from jaxlens.hooked_transformer import HookedTransformer as HookedTransformer
from jaxlens.interventions import Add as Add
from jaxlens.interventions import Fn as Fn
from jaxlens.interventions import Patch as Patch
from jaxlens.interventions import Scale as Scale
from jaxlens.interventions import mean_ablate as mean_ablate
from jaxlens.interventions import zero_ablate as zero_ablate
from jaxlens.model.forward import forward as forward
from jaxlens.model.forward import lm_cross_entropy_loss as lm_cross_entropy_loss
from jaxlens.params import init_params as init_params
from jaxlens.params import param_shapes as param_shapes
from jaxlens.weight_processing import process_weights as process_weights
