"""treescope renderings with named axes (ActivationCache, params, PatchResult) and offline HTML export.
Expected axis names are TransformerLens's, written out here."""

import re

import jax
import numpy as np
import treescope

import jaxlens
from jaxlens import testing
from jaxlens.patching.result import PatchResult
from jaxlens.treescope_view import LabelledArray, export_html, labelled_params

CFG = testing.tiny_config(n_layers=2)
PARAMS = jaxlens.init_params(CFG, jax.random.key(0))
URL = re.compile(r"(https?:)?//[\w-]+(\.[\w-]+)+|<script[^>]+src=|<link[^>]+href=|@import", re.I)


def test_cache_renders_each_activation_with_its_axes():
    model = jaxlens.HookedTransformer(CFG, PARAMS)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG.d_vocab)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_pattern", "hook_embed"])
    text = treescope.render_to_text(cache)
    assert "ActivationCache" in text
    assert "float32[batch:2 head_index:5 query_pos:7 key_pos:7]" in text
    assert "float32[batch:2 pos:7 d_model:40]" in text
    html = treescope.render_to_html(cache, compressed=False)
    for axis in ("head_index", "query_pos", "key_pos"):
        assert axis in html


def test_params_and_patch_result_render_with_named_axes():
    text = treescope.render_to_text(labelled_params(PARAMS, CFG))
    assert "float32[layer:2 head_index:5 d_model:40 d_head:8]" in text  # W_Q
    assert "float32[d_vocab:97 d_model:40]" in text  # W_E
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = PatchResult(values, ("layer", "pos"), {"pos": ["The", " cat", " sat"]}, baseline=np.float32(0.5))
    text = treescope.render_to_text(result)
    assert "PatchResult" in text and "float32[layer:2 pos:3]" in text
    html = treescope.render_to_html(result, compressed=False)
    assert " cat" in html and "layer" in html
    assert LabelledArray(values, ("a",)).axes == ("axis0", "axis1")  # names that do not fit fall back


def test_static_html_export_is_self_contained(tmp_path):
    values = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    result = PatchResult(values, ("layer", "pos", "head"))
    html = export_html(result, tmp_path / "result.html")
    assert (tmp_path / "result.html").read_text(encoding="utf-8") == html
    assert "<script" in html and "head" in html
    found = URL.search(html)
    assert found is None, html[max(0, found.start() - 80):found.end() + 80]
