"""Hook names: TransformerLens's get_act_name conventions and the GPT-2 hook list in TL's order."""

import pytest

from jaxlens import hook_names, testing
from jaxlens.errors import UnknownHookError

CFG = testing.tiny_config(n_layers=2)


@pytest.mark.parametrize("args,want", [
    (("embed",), "hook_embed"),
    (("pos_embed",), "hook_pos_embed"),
    (("resid_pre", 3), "blocks.3.hook_resid_pre"),
    (("pattern", 0), "blocks.0.attn.hook_pattern"),
    (("attn", 0), "blocks.0.attn.hook_pattern"),
    (("attn_scores", 2), "blocks.2.attn.hook_attn_scores"),
    (("z", 5), "blocks.5.attn.hook_z"),
    (("key", 1), "blocks.1.attn.hook_k"),
    (("post", 4), "blocks.4.mlp.hook_post"),
    (("mlp_pre", 4), "blocks.4.mlp.hook_pre"),
    (("mlp_out", 1), "blocks.1.hook_mlp_out"),
    (("scale", 2, "ln1"), "blocks.2.ln1.hook_scale"),
    (("normalized", 2, "ln2"), "blocks.2.ln2.hook_normalized"),
    (("scale",), "ln_final.hook_scale"),
    (("k6a",), "blocks.6.attn.hook_k"),
    (("pre2",), "blocks.2.mlp.hook_pre"),
    (("blocks.0.hook_resid_post",), "blocks.0.hook_resid_post"),
])
def test_get_act_name_follows_transformerlens(args, want):
    assert hook_names.get_act_name(*args) == want


def test_gpt2_hook_list_in_transformerlens_order():
    # TL's HookedTransformer(gpt2).hook_dict order, written out by hand for one block
    block = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
             "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
             "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
             "hook_mlp_out", "hook_resid_post"]
    want = ["hook_embed", "hook_pos_embed"] + [f"blocks.{l}.{n}" for l in range(2) for n in block] + [
        "ln_final.hook_scale", "ln_final.hook_normalized"]
    assert hook_names.default_names(CFG) == want


def test_rotary_gated_parallel_names():
    cfg = testing.tiny_config(positional_embedding_type="rotary", gated_mlp=True, parallel_attn_mlp=True,
                              normalization_type="RMS", n_key_value_heads=1)
    names = hook_names.default_names(cfg)
    assert "hook_pos_embed" not in names and "blocks.0.hook_resid_mid" not in names
    assert {"blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k",
            "blocks.0.mlp.hook_pre_linear"} <= set(names)
    assert hook_names.hook_axes(cfg, "blocks.1.attn.hook_k") == "batch pos kv_head_index d_head"


def test_parse_and_select():
    assert hook_names.parse(CFG, "blocks.1.attn.hook_z") == (1, "attn.hook_z")
    assert hook_names.parse(CFG, "blocks.-1.attn.hook_z") == (1, "attn.hook_z")
    assert hook_names.parse(CFG, "blocks.attn.hook_z") == ("all", "attn.hook_z")
    assert hook_names.parse(CFG, "ln_final.hook_scale") == (None, "ln_final.hook_scale")
    with pytest.raises(UnknownHookError, match="blocks.2.hook_resid_pre"):
        hook_names.parse(CFG, "blocks.2.hook_resid_pre")  # only 2 layers
    assert hook_names.select(CFG, lambda n: n.endswith("hook_z")) == ["blocks.0.attn.hook_z",
                                                                       "blocks.1.attn.hook_z"]
    assert hook_names.select(CFG, "blocks.0.attn.hook_result") == ["blocks.0.attn.hook_result"]
    with pytest.raises(UnknownHookError):
        hook_names.select(CFG, ["hook_embed", "hook_bogus"])
