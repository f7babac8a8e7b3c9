"""`interventions.ablate_heads`: zero-ablating heads' outputs (`attn.hook_z`) is the same model as one whose
W_O rows for those heads are zero (attn_out = sum over heads of z_h W_O[h] + b_O), and bad heads are
errors."""

import jax
import numpy as np
import pytest

from jaxlens import HookedTransformer, init_params, testing
from jaxlens.errors import InterventionError
from jaxlens.interventions import ablate_heads

HEADS = [(0, 1), (2, 3), (2, 0)]
TOKENS = np.array([[3, 14, 15, 92, 65, 35], [8, 9, 7, 9, 3, 2]])


def test_ablation_equals_zeroed_output_weights():
    cfg = testing.tiny_config()
    params = init_params(cfg, jax.random.key(0), scale=0.2)
    iv = ablate_heads(cfg, HEADS)
    assert sorted(iv) == ["blocks.0.attn.hook_z", "blocks.2.attn.hook_z"]
    W_O = np.array(params["blocks"]["attn"]["W_O"])  # [layer head_index d_head d_model]
    for l, h in HEADS:
        W_O[l, h] = 0.0
    zeroed = {**params, "blocks": {**params["blocks"], "attn": {**params["blocks"]["attn"], "W_O": W_O}}}
    got = np.asarray(HookedTransformer(cfg, params)(TOKENS, interventions=iv))
    want = np.asarray(HookedTransformer(cfg, zeroed)(TOKENS))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, np.asarray(HookedTransformer(cfg, params)(TOKENS)), atol=1e-3)


@pytest.mark.parametrize("head", [(3, 0), (0, 5), (-1, 0)])
def test_out_of_range_heads_are_errors(head):
    with pytest.raises(InterventionError, match="out of range"):
        ablate_heads(testing.tiny_config(), [head])
