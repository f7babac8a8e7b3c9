"""The last layer on the read positions only (`ChunkSpec.last_queries`): the same values as one patched
forward per cell, for metrics reading the last position, the last two, or a middle one; off where the
metric reads every position; and its FLOPs counted by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import Patch, forward, patching
from jaxlens.patching.cost import block_flops, cell_flops, kv_flops, unembed_flops

ALL = slice(None)


def last_two(logits):
    """Reads positions 5 and 6 of 7."""
    return (logits[:, -2, 3] - logits[:, -1, 7]).mean()


def middle(logits):
    """Reads position 3 of 7."""
    return (logits[:, 3, 3] - logits[:, 3, 7]).mean()


def every_position(logits):
    """Reads the whole vocabulary at every position: no logit reads to restrict."""
    return jax.nn.log_softmax(logits, axis=-1)[:, :, 3].mean()


@pytest.mark.parametrize("model, metric, n_q", [("gpt2", last_two, 2), ("llama", middle, 4)])
def test_z_sweep_equals_one_patched_forward_per_cell(request, ref, model, metric, n_q):
    """GPT-2-like and GQA + rotary models, head x position sweep (one-position patched block), 2 windows
    (test_sweep.py covers the metric reading the last position)."""
    s = request.getfixturevalue(model)
    m = metric
    kw = dict(hook="attn.hook_z", axes=("layer", "pos", "head"), max_windows=2, progress=False)
    plan = patching.plan_sweep(s.params, s.cfg, s.corrupted, s.cache, m, **kw)
    # the prompts differ from position 2: windows of 5 (positions 2..6) and fewer; the last layer computes
    # positions [7 - n_q, 7) wherever those are fewer than the window
    assert all(p.point for p in plan.programs)
    assert [p.last_queries for p in plan.programs] == [n_q if n_q < p.window else None for p in plan.programs]
    assert any(p.last_queries for p in plan.programs)
    got = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, m, **kw)
    cfg, P = s.cfg, s.corrupted.shape[1]
    want = ref(s, "attn.hook_z", [((l, p, h), l, (ALL, p, h)) for l in range(cfg.n_layers) for p in range(P)
                                  for h in range(cfg.n_heads)], metric=m)
    np.testing.assert_allclose(got.values, want, rtol=1e-5, atol=1e-5)


def test_hooks_before_the_blocks_and_full_logits(gpt2):
    """hook_embed (every layer runs on the window) with the last layer on one position equals the sweep
    that patches every cell in a full forward; a metric reading every position keeps the whole window."""
    s = gpt2
    kw = dict(hook="hook_embed", axes=("pos",), progress=False)
    plan = patching.plan_sweep(s.params, s.cfg, s.corrupted, s.clean, s.metric, **kw)
    assert [p.last_queries for p in plan.programs] == [1] * len(plan.programs)
    got = patching.sweep(s.params, s.cfg, s.corrupted, s.clean, s.metric, **kw).values
    # reference: the embedding of the clean prompt at one position in a plain forward
    clean_embed = s.params["embed"]["W_E"][s.clean]
    f = jax.jit(lambda v, m: s.metric(forward(s.params, s.cfg, s.corrupted,
                                              interventions={"hook_embed": Patch(value=v, mask=m)})[0]))
    P = s.corrupted.shape[1]
    want = [float(f(clean_embed, (jnp.arange(P) == p)[None, :, None])) for p in range(P)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plan = patching.plan_sweep(s.params, s.cfg, s.corrupted, s.cache, every_position,
                               hook="attn.hook_z", axes=("layer", "pos", "head"), progress=False)
    assert [p.last_queries for p in plan.programs] == [None] * len(plan.programs)


def test_flops_by_hand(gpt2):
    """d_model 40, 5 heads of 8 (5 kv heads), d_mlp 72, 3 layers; 7 positions, window 5, 2 logits."""
    cfg = gpt2.cfg
    # a block on S positions over 7 keys: 2 * S * (12160 + 560) = 25440 * S (see test_plan_sweep.py);
    # keys and values of S positions: 2 * S * 2 * 40 * 40 = 6400 * S; reading 2 logits: 2 * 2 * 40 = 160
    assert block_flops(cfg, 5, 7) == 25440 * 5 and kv_flops(cfg, 5) == 6400 * 5
    assert unembed_flops(cfg, 2) == 160
    one = dict(window=5, n_pos=7, reuse=True, point=True, n_logits=2)
    # patched at layer 0: block 0 on one position, block 1 on the window, block 2's keys and values on the
    # window and the block itself on the last position
    with_last = cell_flops(cfg, "block", layer=0, last_queries=1, **one)
    assert with_last == 25440 + 25440 * 5 + 6400 * 5 + 25440 + 160
    assert cell_flops(cfg, "block", layer=0, **one) == 25440 + 2 * 25440 * 5 + 160
    # patched at the last layer: nothing runs after the one-position block
    assert cell_flops(cfg, "block", layer=2, last_queries=1, **one) == 25440 + 160
    # before the blocks: layers 0 and 1 on the window, the last one on two positions
    pre = cell_flops(cfg, "pre", layer=0, last_queries=2, **one)
    assert pre == 2 * 25440 * 5 + 6400 * 5 + 25440 * 2 + 160
