"""`PatchResult` by hand: named axes and labels, the layout operations (transpose, rename, pad, stack, select)
carrying the baseline, TransformerLens's attributes in any layout, rows, and long form. No model runs."""

import numpy as np
import pytest

from jaxlens.errors import InputError
from jaxlens.patching import PatchingResult, PatchResult
from jaxlens.patching.activation import stack_patch_types


def per_example_result():
    """[layer 2, metric 2, pos 3, example 4], metric axis in the middle (no layout is special)."""
    v = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    base = np.arange(8, dtype=np.float32).reshape(2, 4)  # [metric, example]
    return PatchResult(v, ("layer", "metric", "pos", "example"), {"metric": ("ld", "top")}, base)


def test_named_axes_layout_and_baseline():
    r = per_example_result()
    assert PatchingResult is PatchResult and r.shape == (2, 2, 3, 4) and np.asarray(r).shape == (2, 2, 3, 4)
    want = "PatchResult(layer=2 x metric=2 x pos=3 x example=4; metrics ['ld', 'top'], with baseline)"
    assert repr(r) == want
    assert r.axis_names == ["layer", "pos"] and r.metric_names == ["ld", "top"] and not r.reduced
    assert r.coords["pos"] == (0, 1, 2)
    # statistics reduce "example" wherever it is; effect broadcasts the baseline over its own axes
    np.testing.assert_array_equal(r.mean(), r.values.mean(-1))
    np.testing.assert_array_equal(r.effect(), r.values - r.baseline[None, :, None, :])
    t = r.transpose("metric", "example", "pos", "layer")
    assert t.axes == ("metric", "example", "pos", "layer") and t.baseline.shape == (2, 4)
    np.testing.assert_array_equal(t.values, r.values.transpose(1, 3, 2, 0))
    np.testing.assert_allclose(t.stderr(), r.stderr().transpose(1, 2, 0), rtol=1e-6)
    tl = r.transpose("example", "metric", "layer", "pos")  # baseline axes reordered with them
    np.testing.assert_array_equal(tl.baseline, r.baseline.T)
    np.testing.assert_array_equal(tl.effect(), r.effect().transpose(3, 1, 0, 2))
    # TransformerLens's metric lookup and select drop the metric from values and baseline
    one = r["top"]
    assert one.axes == ("layer", "pos", "example") and one.metric_names == ["top"] and one.name == "top"
    np.testing.assert_array_equal(one.baseline, r.baseline[1])
    ex = r.select(example=2, pos=1)
    assert ex.axes == ("layer", "metric") and ex.reduced and ex.baseline.shape == (2,)
    np.testing.assert_array_equal(ex.values, r.values[:, :, 1, 2])
    with pytest.raises(KeyError, match="Unknown metric 'x'"):
        r["x"]
    # rank by the batch mean of one metric
    v, where = r.rank(by="max", metric="ld")[0]
    assert where == {"layer": 1, "pos": 2} and v == r.values[1, 0, 2].mean()


def test_layout_operations_and_every_helpers():
    """`stack_patch_types` (the *_every helpers) is rename + transpose + pad + stack: checked by hand."""
    rng = np.random.default_rng(0)
    out = PatchResult(rng.normal(size=(3, 5)), ("layer", "head"), baseline=np.float32(0.5))
    kv = PatchResult(rng.normal(size=(3, 2)), ("layer", "head"), baseline=np.float32(0.5))  # 2 kv heads
    pattern = PatchResult(rng.normal(size=(3, 5)), ("layer", "head_index"), baseline=np.float32(0.5))
    every = stack_patch_types("attn_head_all_pos_every", [out, out, kv, kv, pattern], n_heads=5)
    assert every.axes == ("patch_type", "layer", "head") and every.shape == (5, 3, 5)
    assert every.patch_type_names == ["out", "q", "k", "v", "pattern"] and every.baseline == np.float32(0.5)
    np.testing.assert_array_equal(every.values[2], np.concatenate([kv.values, np.zeros((3, 3))], 1))
    np.testing.assert_array_equal(every.values[4], pattern.values)
    # by position: the pattern part [layer head_index dest_pos] becomes [layer pos head]
    z = PatchResult(rng.normal(size=(3, 4, 5)), ("layer", "pos", "head"))
    pat = PatchResult(rng.normal(size=(3, 5, 4)), ("layer", "head_index", "dest_pos"))
    by_pos = stack_patch_types("attn_head_by_pos_every", [z, z, z, z, pat], n_heads=5)
    np.testing.assert_array_equal(by_pos.values[4], pat.values.transpose(0, 2, 1))
    df = every.to_dataframe()
    assert list(df.columns) == ["metric", "patch_type", "layer", "head", "patch_type_name", "value"]
    assert len(df) == 75 and df["patch_type_name"].iloc[-1] == "pattern"
    assert df["value"].iloc[1] == every.values[0, 0, 1]
    with pytest.raises(InputError, match="pad"):
        out.pad(head=4)
    with pytest.raises(InputError, match="fixed meanings"):
        out.rename(head="metric")
    with pytest.raises(InputError, match="same axes and shape"):
        PatchResult.stack([out, kv], "patch_type")


def test_rows_labels_and_errors():
    rows = ((1, 6, 2), (0, 4, 0), (1, 0, 3))
    r = PatchResult(np.array([[0.5, 2.0], [-3.0, 1.0], [1.0, 1.0]]), ("row", "example"), {"row": rows},
                    row_axes=("layer", "pos", "head"))
    assert r.axis_names == [] and r.index_df.values.tolist() == [list(x) for x in rows]
    assert r.rank(by="min")[0] == (-1.0, {"layer": 0, "pos": 4, "head": 0})
    long = r.to_dataframe()
    assert list(long.columns) == ["metric", "layer", "pos", "head", "example", "value"] and len(long) == 6
    assert long.iloc[1].tolist() == ["metric", 1, 6, 2, 1, 2.0]
    lab = PatchResult(np.arange(6.0).reshape(2, 3), ("layer", "pos"), {"pos": ["a", "b", "c"]})
    assert lab.top_k(1) == [(5.0, {"layer": 1, "pos": "c"})]
    assert lab.select(pos="b").values.tolist() == [1.0, 4.0]
    assert list(lab.to_dataframe().columns) == ["metric", "layer", "pos", "pos_name", "value"]
    with pytest.raises(InputError, match=r"labels\['pos'\] has 2 entries for an axis of size 3"):
        PatchResult(np.zeros((2, 3)), ("layer", "pos"), {"pos": ["a", "b"]})
    with pytest.raises(InputError, match="baseline must have the shape"):
        PatchResult(np.zeros((2, 3)), ("layer", "example"), baseline=np.zeros(2))
    with pytest.raises(InputError, match="one distinct name per axis"):
        PatchResult(np.zeros((2, 3)), ("layer", "layer"))
    with pytest.raises(InputError, match="needs row_axes"):
        PatchResult(np.zeros(3), ("row",))
    with pytest.raises(InputError, match="needs per-example values"):
        lab.stderr()
