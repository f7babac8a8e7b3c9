"""The attribution graph of one prompt: nodes, the adjacency A[target, source], pruning, scores, files.

Node order (circuit-tracer 0.5's, ../shared/RESEARCH.md 1.3): the selected active features (layer-major, then
position, then feature index), the error nodes (index layer * n_pos + pos), the token nodes (one per
position), the logit nodes (the top logits, most probable first). Rows are targets, columns sources.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class AttributionGraph:
    """An attribution graph (built by `jaxlens.graphs.attribute`).

    Attributes:
        prompt: the prompt as given.
        tokens: [n_pos] token ids (with the special prefix).
        token_strings: [n_pos] each token decoded.
        active_features: [n_active, 3] (layer, pos, feature) of every active feature (prefix zeroed).
        activation_values: [n_active] their activations.
        selected_features: [n_selected] indices into active_features of the feature nodes, ascending.
        adjacency: [n_nodes, n_nodes] float32, A[target, source], nodes in the module docstring's order.
        logit_tokens: [n_logits] vocabulary ids of the logit nodes.
        logit_probabilities: [n_logits] their probabilities at the last position.
        logit_strings: [n_logits] each decoded.
        n_layers: layers of the model.
        vocab_size: the model's vocabulary.
        model_name: the model's name (for files).
        transcoder_name: the transcoder set's name (circuit-tracer's `scan`).
        feature_input_hook, feature_output_hook: the hooks the transcoders read and write (relative names).
        zero_positions: the number of prefix positions whose features and errors are zeroed.
    """

    prompt: str
    tokens: np.ndarray
    token_strings: list[str]
    active_features: np.ndarray
    activation_values: np.ndarray
    selected_features: np.ndarray
    adjacency: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    logit_strings: list[str]
    n_layers: int
    vocab_size: int
    model_name: str = ""
    transcoder_name: str = ""
    feature_input_hook: str = ""
    feature_output_hook: str = ""
    zero_positions: int = 1

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def error_offset(self) -> int:
        return self.n_features

    @property
    def token_offset(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_offset(self) -> int:
        return self.token_offset + self.n_pos
