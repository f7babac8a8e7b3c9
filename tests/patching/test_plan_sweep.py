"""`plan_sweep`: the dry run of a sweep, against hand counts on a one-layer model and against the sweep itself
(the chunks it runs are the ones planned; every cell's CellStatus says what its value is)."""

import jax
import numpy as np
import pytest

from jaxlens import patching
from jaxlens.patching import CellStatus
from jaxlens.patching.cost import block_flops, forward_flops


def never(done, total):
    raise AssertionError("plan_sweep ran a chunk")


def test_hand_counts_on_a_one_layer_model(one_layer):
    """resid_pre over (layer, pos) of a 1-layer model (d_model 40, 5 heads of 8, d_mlp 72, vocab 97), batch 2,
    7 positions, prompts differing at positions 2 and 4, one device, one cell per chunk."""
    s = one_layer
    kw = dict(hook="resid_pre", axes=("layer", "pos"), devices=jax.devices()[:1], chunk_size=1,
              progress=False)
    plan = patching.plan_sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, on_chunk=never, **kw)
    # 1 layer x 7 positions; resid_pre at layer 0 is the embedding: only positions 2 and 4 differ
    assert plan.hook == "blocks.hook_resid_pre" and plan.shape == (1, 7) and plan.n_cells == 7
    assert plan.counts == {CellStatus.COMPUTED: 2, CellStatus.NO_OP: 5, CellStatus.OUTSIDE_LAYERS: 0}
    assert [CellStatus(int(x)) for x in plan.status[0]] == [CellStatus.NO_OP] * 2 + [CellStatus.COMPUTED] + [
        CellStatus.NO_OP, CellStatus.COMPUTED] + [CellStatus.NO_OP] * 2
    # the patch at position p runs positions p..6: windows of 5 and 3 positions, one program each
    assert [(p.window, p.chunk_size, p.n_chunks, p.n_cells, p.layers) for p in plan.programs] == [
        (3, 1, 1, 1, (0,)), (5, 1, 1, 1, (0,))]
    assert plan.n_programs == 2 and plan.n_chunks == 2
    assert plan.n_logits == 2  # logits[:, -1, 3] and logits[:, -1, 7]
    # FLOPs by hand. Projections per position: Q 40*5*8 = 1600, K and V 2*1600, O 1600, MLP 2*40*72 = 5760:
    # 12160 multiply-adds; attention QK^T and AV over 7 keys: 2 * 7 * 5 * 8 = 560 per query position.
    # A block on S positions: 2 * S * (12160 + 560) = 25440 * S FLOPs; reading 2 logits: 2 * 2 * 40 = 160.
    assert block_flops(s.cfg, 5, 7) == 25440 * 5
    assert [p.flops for p in plan.programs] == [2 * (25440 * 3 + 160), 2 * (25440 * 5 + 160)]  # batch 2
    assert plan.flops == 407680
    # naive: 7 cells x batch 2 x (one block on 7 positions + the full unembedding 2 * 7 * 97 * 40)
    assert forward_flops(s.cfg, 7) == 25440 * 7 + 54320
    assert plan.naive_flops == 7 * 2 * (25440 * 7 + 54320) == 3_253_600
    assert all(p.peak_bytes > 0 for p in plan.programs) and plan.peak_bytes == plan.programs[1].peak_bytes
    text = str(plan)
    assert "7 cells" in text and "no-ops 5" in text
    assert "2 chunk program(s)" in text and "window 5 of 7" in text
    assert repr(plan).startswith("SweepPlan(hook='blocks.hook_resid_pre', shape=(1, 7), computed=2, no_op=5")
    # XLA's own count of the compiled chunk (one layer: the loop body runs once) is the matmuls plus a little
    # elementwise work (norms, GELU, softmax)
    ca = plan.lower(1).compile().cost_analysis()
    xla = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    assert plan.programs[1].flops <= xla <= 1.3 * plan.programs[1].flops
    # the plan's NO_OP cells hold the unpatched metric; COMPUTED cells were computed
    res = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, **kw)
    np.testing.assert_array_equal(res.values[plan.status == CellStatus.NO_OP], res.baseline)
    assert (res.values[plan.status == CellStatus.COMPUTED] != res.baseline).all()


@pytest.mark.parametrize("options", [
    dict(max_windows=1),
    dict(chunk_size=2, devices="one"),
    dict(memory_budget=300_000, layers=[1, 2], fill=-1.0, devices="one"),
    dict(prefix_reuse=False, chunk_size=8, layers=[0]),
])
def test_the_sweep_runs_the_planned_chunks(gpt2, options):
    s = gpt2
    kw = dict(hook="hook_resid_mid", axes=("layer", "pos"), progress=False, **options)
    if kw.get("devices") == "one":
        kw["devices"] = jax.devices()[:1]
    plan = patching.plan_sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, on_chunk=never, **kw)
    calls = []
    record = lambda done, total: calls.append(total)  # noqa: E731
    res = patching.sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, on_chunk=record, **kw)
    assert len(calls) == plan.n_chunks and set(calls) == {plan.n_chunks}
    assert sum(p.n_cells for p in plan.programs) == plan.counts[CellStatus.COMPUTED]
    assert all(p.chunk_size % plan.n_devices == 0 for p in plan.programs)
    assert sum(len(c.cells) for c in plan.chunks) == plan.counts[CellStatus.COMPUTED]
    assert res.shape == plan.shape and res.axes == plan.axes
    np.testing.assert_array_equal(res.values[plan.status == CellStatus.NO_OP], res.baseline)
    assert (res.values[plan.status == CellStatus.OUTSIDE_LAYERS] == options.get("fill", 0.0)).all()
    if "layers" in options:
        skipped = (s.cfg.n_layers - len(options["layers"])) * plan.shape[1]
        assert plan.counts[CellStatus.OUTSIDE_LAYERS] == skipped
    if options.get("prefix_reuse") is False:
        assert plan.counts[CellStatus.NO_OP] == 0 and [p.window for p in plan.programs] == [plan.n_pos]


def test_plan_errors_are_the_sweeps(gpt2):
    s = gpt2
    from jaxlens.errors import InputError

    with pytest.raises(InputError, match="memory budget of 1,000 bytes per device is too small"):
        patching.plan_sweep(s.params, s.cfg, s.corrupted, s.cache, s.metric, hook="resid_pre",
                            axes=("layer", "pos"), memory_budget=1000)
