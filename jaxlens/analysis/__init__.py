"""Analysis on top of the core: logit lens, direct logit attribution, head detectors and induction scores,
factored matrices and composition scores, SVD of weights against the vocabulary, `test_prompt`, IOI prompts
and the logit-difference metric."""

from jaxlens.analysis.composition import OV as OV
from jaxlens.analysis.composition import QK as QK
from jaxlens.analysis.composition import all_composition_scores as all_composition_scores
from jaxlens.analysis.composition import composition_scores as composition_scores
from jaxlens.analysis.dla import head_dla as head_dla
from jaxlens.analysis.dla import layer_dla as layer_dla
from jaxlens.analysis.dla import logit_direction as logit_direction
from jaxlens.analysis.dla import neuron_dla as neuron_dla
from jaxlens.analysis.factored_matrix import FactoredMatrix as FactoredMatrix
from jaxlens.analysis.heads import HEAD_NAMES as HEAD_NAMES
from jaxlens.analysis.heads import detect_head as detect_head
from jaxlens.analysis.heads import duplicate_token_pattern as duplicate_token_pattern
from jaxlens.analysis.heads import (
    get_duplicate_token_head_detection_pattern as get_duplicate_token_head_detection_pattern,
)
from jaxlens.analysis.heads import (
    get_induction_head_detection_pattern as get_induction_head_detection_pattern,
)
from jaxlens.analysis.heads import (
    get_previous_token_head_detection_pattern as get_previous_token_head_detection_pattern,
)
from jaxlens.analysis.heads import head_scores as head_scores
from jaxlens.analysis.heads import induction_pattern as induction_pattern
from jaxlens.analysis.heads import previous_token_pattern as previous_token_pattern
from jaxlens.analysis.heads import repeated_random_tokens as repeated_random_tokens
from jaxlens.analysis.heads import top_heads as top_heads
from jaxlens.analysis.induction import Induction as Induction
from jaxlens.analysis.induction import find_induction_heads as find_induction_heads
from jaxlens.analysis.induction import induction_scores as induction_scores
from jaxlens.analysis.induction import induction_tokens as induction_tokens
from jaxlens.analysis.ioi import IOIPrompts as IOIPrompts
from jaxlens.analysis.ioi import ioi_prompts as ioi_prompts
from jaxlens.analysis.ioi import position_labels as position_labels
from jaxlens.analysis.logit_lens import LogitLens as LogitLens
from jaxlens.analysis.logit_lens import logit_lens as logit_lens
from jaxlens.analysis.metrics import logit_diff_metric as logit_diff_metric
from jaxlens.analysis.metrics import normalise_patching as normalise_patching
from jaxlens.analysis.prompt import PromptTest as PromptTest
from jaxlens.analysis.prompt import test_prompt as test_prompt
from jaxlens.analysis.svd import get_singular_vectors as get_singular_vectors
from jaxlens.analysis.svd import singular_directions as singular_directions
from jaxlens.analysis.svd import top_tokens as top_tokens
