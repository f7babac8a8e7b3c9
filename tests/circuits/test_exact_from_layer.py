"""Exact edge patching from the destination's layer on (`circuits.exact`) against the dense edge-mask path
(`edges.masked_metric` carrying every source's difference through every layer, one mask per edge) on every
edge of three families, and `chunks.map_groups` (groups of items with their own arguments, one store).

The dense path is the independent reference here: it never starts from a cached clean residual and applies
each edge by a mask over all edges; test_attribute.py checks a few edges against plain forwards with one Add,
and test_vs_tl_edge_baseline.py against TransformerLens hooks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from circuit_refs import metric

from jaxlens import testing
from jaxlens.circuits import attribute_edges, chunks
from jaxlens.circuits.attribute import run_masks, setup
from jaxlens.errors import InputError

RTOL = 1e-5  # of the largest |score|: fp32, the same model computed by two orders of operations


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel"])
def test_every_edge_equals_the_dense_mask_path(family, name):
    """Every edge: from the input and from heads and MLPs, into q, k, v (per key/value head under GQA), MLPs
    and the logits, within a layer and across layers (parallel blocks: heads do not feed their MLP)."""
    model, clean, corrupted = family(name)
    got = attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=16)
    n = got.n_edges
    masks = np.concatenate([np.ones((1, n), bool), ~np.eye(n, dtype=bool)])  # nothing patched, then each edge
    values = run_masks(setup(model, clean, corrupted, metric), masks, 32, None)
    want = values[1:] - values[0]
    scale = float(np.abs(want).max())
    assert scale > 1e-2 and np.isfinite(got.scores).all()
    np.testing.assert_allclose(got.scores, want, rtol=0, atol=RTOL * scale)
    kinds = {d[-3:] if d.endswith(">") else d[0] for d in (e.split("->")[1] for e in got.edge_labels())}
    assert kinds == {"<q>", "<k>", "<v>", "m", "l"}  # q, k, v, MLP and logits readers all compared


def test_chosen_edges_run_only_their_layers_groups(family):
    """A subset of edges (into one layer only, and into the logits only) gives the same scores as the full
    run, NaN elsewhere, on one device and in chunks of one edge."""
    model, clean, corrupted = family("llama-gqa")
    full = attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=16).scores
    for some in (["a0.h4->a1.kv1<k>", "input->a1.h0<q>", "m0->m1"], ["input->logits", "a1.h3->logits"]):
        part = attribute_edges(model, clean, corrupted, metric, method="exact", edges=some, chunk_size=1,
                               devices=jax.devices()[:1])
        idx = part.edge_index(some)
        np.testing.assert_allclose(part.scores[idx], full[idx], rtol=1e-6, atol=1e-6)
        assert np.isnan(np.delete(part.scores, idx)).all()


def _item_fn(args, item):
    offset, scale = args
    return item.astype(jnp.float32) * scale + offset


def test_map_groups_keeps_group_arguments_order_and_resumes(tmp_path):
    groups = [chunks.Group(_item_fn, (jnp.float32(100 * k), jnp.float32(k + 1)), np.arange(n), 2)
              for k, n in enumerate([3, 1, 4])]
    want = np.concatenate([np.arange(n) * (k + 1) + 100 * k for k, n in enumerate([3, 1, 4])])
    np.testing.assert_array_equal(chunks.map_groups(groups, devices=jax.devices()[:1]), want)
    record = []
    with pytest.raises(testing.SweepInterrupted):
        chunks.map_groups(groups, devices=jax.devices()[:1], checkpoint_dir=tmp_path, fingerprint="g",
                          on_chunk=testing.interrupt_after(3, record))
    again = []
    got = chunks.map_groups(groups, devices=jax.devices()[:1], checkpoint_dir=tmp_path, fingerprint="g",
                            on_chunk=lambda done, total: again.append((done, total)))
    assert record[-1] == (3, 5) and again == [(1, 2), (2, 2)]  # chunks 2 + 1 + 2, three stored before
    np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError, match="another computation"):
        chunks.map_groups(groups, devices=jax.devices()[:1], checkpoint_dir=tmp_path, fingerprint="other")
    with pytest.raises(InputError, match="chunk_size must be a positive number of items; found 0"):
        chunks.map_groups([chunks.Group(_item_fn, groups[0].args, np.arange(3), 0)])
