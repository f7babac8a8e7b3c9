"""Weights of the gemma library (google-deepmind/gemma 4.0.1, linen) into jaxlens, checked logit for logit
against gemma's own forward pass (`gm.nn.Transformer.apply`) on random weights.

gemma needs Python >= 3.12 and the project runs on 3.11, so the reference runs in its own environment on a
CPython 3.13 built from source into the reference-env cache (tests/ref_python.py, tests/ref_envs.py; pins in
tests/ref_locks/gemma.txt). The child process builds each model, perturbs its random init so every norm and
softcap matters, and writes the config fields, the parameters and the logits to an .npz file; the test
converts the parameters with `jaxlens.flax.gemma_lib` and runs `jaxlens.forward`.

Configs: gemma's own test model `gm.testing.DummyGemma` (global attention, fused qkv_einsum) and two small
versions of its real configs (written out: importing `gm.nn.Gemma2_2B` pulls gemma's checkpoint code and with
it kauldron's training stack): Gemma 2 (`Gemma2_2B`: grouped-query attention, post norms, attention and logit
softcaps, sliding/global layers) and Gemma 3 (`Gemma3_270M`: one KV head, QK-norm, transposed gating einsum,
local/global rotary bases, a global linear rope scale of 8, queries scaled by 1/sqrt(embed_dim // num_heads)).
"""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens.errors import CheckpointError, InputError
from jaxlens.flax import LayoutError
from jaxlens.flax.gemma_lib import from_gemma, gemma_fields, gemma_param_shapes, to_gemma

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ref_envs  # noqa: E402
import ref_python  # noqa: E402

STEPS = ref_envs.locked("gemma")

SCRIPT = r'''
import dataclasses, enum, json, sys, types
import jax, jax.numpy as jnp, numpy as np
# kauldron's `typing` module imports tensorflow at import time only to name `tf.Tensor` in type aliases; the
# transformer never touches TF, so a stand-in module saves installing it and is dropped once kauldron is in
sys.modules["tensorflow"] = types.SimpleNamespace(Tensor=type("Tensor", (), {}), __name__="tensorflow")
from gemma import gm
from gemma.gm.nn import _config, _modules
from kauldron import kd
gm.nn.Transformer, gm.testing.DummyGemma, kd.nn, kd.typing, kd.ktyping  # lazy imports, resolved now
del sys.modules["tensorflow"]

jax.config.update("jax_default_matmul_precision", "highest")
L, G = _modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL
Q = _config.QueryPreAttentionNormalisation
small = dict(num_embed=37, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=16, sliding_window_size=3)
configs = {  # gemma's test model, and Gemma2_2B's / Gemma3_270M's configs (gm/nn/_gemma.py) made small
    "dummy": gm.testing.DummyGemma.config,
    "gemma2": _config.TransformerConfig(
        **small, num_kv_heads=2, attention_types=(L, G, L), use_post_attn_norm=True, use_post_ffw_norm=True,
        query_pre_attn_norm=Q.BY_ONE_OVER_SQRT_HEAD_DIM, attn_logits_soft_cap=3.0, final_logit_softcap=4.0),
    "gemma3": _config.TransformerConfig(
        **small, num_kv_heads=1, attention_types=(L, L, G), use_post_attn_norm=True, use_post_ffw_norm=True,
        use_qk_norm=True, transpose_gating_einsum=True, final_logit_softcap=None, attn_logits_soft_cap=None,
        local_base_frequency=10_000, global_base_frequency=1_000_000, global_scale_factor=8.0,
        query_pre_attn_norm=Q.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS),
}
out = {}
for name, cfg in configs.items():
    model = gm.nn.Transformer(config=cfg, dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 1, cfg.num_embed)  # 0 is gemma's padding id
    params = model.init(jax.random.key(0), tokens)["params"]
    leaves, tdef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    # gemma inits einsums at std 0.01 and norm scales at 0: redraw at O(1) so every part of the block counts
    new = [jax.random.normal(k, x.shape) * (0.3 if x.ndim == 1 else 1.0 / np.sqrt(x.shape[-2]))
           for (_, x), k in zip(leaves, keys)]
    params = jax.tree_util.tree_unflatten(tdef, new)
    logits = model.apply({"params": params}, tokens).logits
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    plain = lambda v: (v.name if isinstance(v, enum.Enum) else [plain(a) for a in v] if isinstance(v, tuple)
                       else v)
    out[f"{name}:config"] = np.array(json.dumps({k: plain(v) for k, v in fields.items()}))
    out[f"{name}:tokens"], out[f"{name}:logits"] = np.asarray(tokens), np.asarray(logits)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[f"{name}:param:" + "/".join(k.key for k in path)] = np.asarray(x)
np.savez(sys.argv[1], **out)
print("OK", sorted(configs))
'''
NAMES = ("dummy", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """{config name: (gemma config fields, gemma params, tokens, gemma's logits)} from the reference env."""
    python = ref_python.ensure_python("3.13")
    exe = ref_envs.ensure_env("gemma", STEPS, python=str(python))
    path = tmp_path_factory.mktemp("gemma") / "ref.npz"
    out = ref_envs.run_script(exe, SCRIPT, str(path), env={"JAX_PLATFORMS": "cpu"})
    assert out.startswith("OK"), out
    data = dict(np.load(path))
    result = {}
    for name in NAMES:
        params: dict = {}
        for key, x in data.items():
            if key.startswith(f"{name}:param:"):
                *parents, leaf = key.split(":", 2)[2].split("/")
                node = params
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = x
        fields = json.loads(str(data[f"{name}:config"]))
        result[name] = fields, params, data[f"{name}:tokens"], data[f"{name}:logits"]
    return result


@pytest.mark.reference_env
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_gemma_forward(reference, name):
    fields, params, tokens, want = reference[name]
    cfg, ours = from_gemma(params, fields)
    got = np.asarray(jaxlens.forward(ours, cfg, jnp.asarray(tokens))[0])
    assert np.abs(want).max() > 1.0  # random weights that exercise the block, not near-zero logits
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if name == "dummy":  # gemma's own test config, as shipped
        assert (cfg.d_vocab, cfg.d_model, cfg.n_heads, cfg.d_head) == (13, 32, 2, 128)
    if name == "gemma3":
        assert cfg.window_sizes == (3, 3, None) and cfg.use_qk_norm and cfg.rotary_local_freqs is not None


@pytest.mark.reference_env
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_to_gemma_layout(reference, name):
    fields, params, _, _ = reference[name]
    cfg, ours = from_gemma(params, fields)
    back, back_fields = to_gemma(ours, cfg, transpose_gating_einsum=fields["transpose_gating_einsum"])
    assert gemma_fields(back_fields) == gemma_fields(fields)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(back),
                          strict=True):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# -- bad input (no reference env needed) -------------------------------------------------------------------
FIELDS = dict(num_embed=11, embed_dim=8, hidden_dim=12, num_heads=2, head_dim=4, num_kv_heads=1,
              final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
              attention_types=("LOCAL_SLIDING", "GLOBAL"), sliding_window_size=4, use_qk_norm=True)


def _tree(fields):
    return jax.tree_util.tree_map(np.array, gemma_param_shapes(fields))


def test_mismatching_tree_names_path_and_shapes():
    tree = _tree(FIELDS)
    tree["layer_1"]["attn"]["kv_einsum"]["w"] = np.zeros((2, 2, 8, 4), np.float32)
    with pytest.raises(LayoutError, match=r"'layer_1/attn/kv_einsum/w'.*\(2, 1, 8, 4\).*\(2, 2, 8, 4\)"):
        from_gemma(tree, FIELDS)
    del tree["layer_1"]["attn"]["kv_einsum"]
    with pytest.raises(LayoutError, match="'layer_1/attn/kv_einsum/w' .*missing"):
        from_gemma({"params": tree}, FIELDS)


def test_config_errors():
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['num_layers_x'\]"):
        from_gemma(_tree(FIELDS), {**FIELDS, "num_layers_x": 2})
    with pytest.raises(CheckpointError, match=r"required field\(s\) \['num_kv_heads'\]"):
        gemma_fields({k: v for k, v in FIELDS.items() if k != "num_kv_heads"})
    with pytest.raises(CheckpointError, match="use_post_attn_norm=True but use_post_ffw_norm=False"):
        from_gemma(_tree(FIELDS), {**FIELDS, "use_post_ffw_norm": False})
    with pytest.raises(CheckpointError, match="vision encoder"):
        gemma_fields({**FIELDS, "vision_encoder": object()})
    with pytest.raises(CheckpointError, match=r"unknown attention type\(s\) \['LOCAL'\]"):
        gemma_fields({**FIELDS, "attention_types": ("LOCAL", "GLOBAL")})
    with pytest.raises(CheckpointError, match="positive int sliding_window_size, found None"):
        from_gemma(_tree(FIELDS), {**FIELDS, "sliding_window_size": None})


def test_to_gemma_refuses_what_gemma_cannot_hold():
    cfg, params = from_gemma(_tree(FIELDS), FIELDS)
    biased = jax.tree_util.tree_map(np.array, params)  # writable copies
    biased["blocks"]["attn"]["b_Q"][0, 1, 2] = 0.5
    with pytest.raises(InputError, match=r"blocks.attn.b_Q is non-zero \(max \|x\| 0.5\)"):
        to_gemma(biased, cfg)
    untied = jax.tree_util.tree_map(np.array, params)
    untied["unembed"]["W_U"][0, 0] = 1.0
    with pytest.raises(InputError, match="W_E is not the tied unembedding"):
        to_gemma(untied, cfg)
    silu = dataclasses.replace(cfg, act_fn="silu", eps=1e-5)
    want = r"cannot express Config fields \{'eps': 1e-05, 'act_fn': 'silu'\}"
    with pytest.raises(CheckpointError, match=want):
        to_gemma(params, silu)
