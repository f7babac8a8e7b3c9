"""Bad input gets a clear error that says what was wrong, what was found and how to fix it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import HookedTransformer, Patch, testing
from jaxlens.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    InterventionError,
    UnknownHookError,
    UnsafeCheckpointError,
)

CFG = testing.tiny_config()
PARAMS = jaxlens.init_params(CFG, jax.random.key(0))
TOKENS = jnp.zeros((1, 5), jnp.int32)


def test_unknown_hook_names_close_matches():
    with pytest.raises(UnknownHookError, match=r"Did you mean 'blocks.1.attn.hook_pattern'") as e:
        jaxlens.forward(PARAMS, CFG, TOKENS, cache_names=("blocks.1.attn.hook_pattrn",))
    assert str(e.value).startswith("No hook point named 'blocks.1.attn.hook_pattrn'")
    with pytest.raises(UnknownHookError):
        jaxlens.forward(PARAMS, CFG, TOKENS, interventions={"blocks.9.hook_resid_pre": Patch(jnp.zeros(()))})
    with pytest.raises(UnknownHookError):
        HookedTransformer(CFG, PARAMS).run_with_hooks(TOKENS, fwd_hooks=[("hook_embd", lambda x, hook: x)])


def test_token_outside_vocabulary_is_refused_not_clamped():
    bad = jnp.asarray([[1, 2, CFG.d_vocab]])
    with pytest.raises(InputError,
                       match=rf"Token id {CFG.d_vocab} is outside the vocabulary \[0, {CFG.d_vocab}\)"):
        jaxlens.forward(PARAMS, CFG, bad)
    with pytest.raises(InputError, match="Token id -1"):
        HookedTransformer(CFG, PARAMS)(jnp.asarray([[-1, 2]]))


def test_sequence_longer_than_context():
    with pytest.raises(InputError, match=rf"33 tokens .* n_ctx={CFG.n_ctx}"):
        jaxlens.forward(PARAMS, CFG, jnp.zeros((1, CFG.n_ctx + 1), jnp.int32))


def test_tokens_of_wrong_rank_or_dtype():
    # (under the test suite's jaxtyping hook `forward` itself rejects these at its signature first)
    from jaxlens.model.forward import check_tokens

    with pytest.raises(InputError, match=r"\[batch pos\]; found shape \(5,\)"):
        check_tokens(jnp.zeros((5,), jnp.int32), CFG)
    with pytest.raises(InputError, match="integer ids"):
        check_tokens(jnp.zeros((1, 5)), CFG)


def test_intervention_that_does_not_broadcast_names_hook_and_shapes():
    with pytest.raises(InterventionError,
                       match=r"'blocks.1.attn.hook_z'.*shape \(1, 5, 4, 8\).*\(1, 5, 5, 8\)"):
        jaxlens.forward(PARAMS, CFG, TOKENS,
                        interventions={"blocks.1.attn.hook_z": Patch(jnp.zeros((1, 5, 4, 8)))})
    with pytest.raises(InterventionError, match="leading layer axis of size n_layers=3"):
        jaxlens.forward(PARAMS, CFG, TOKENS,
                        interventions={"blocks.attn.hook_z": Patch(jnp.zeros((2, 1, 5, 5, 8)))})
    with pytest.raises(InterventionError, match="returned None"):
        HookedTransformer(CFG, PARAMS).run_with_hooks(TOKENS,
                                                      fwd_hooks=[("hook_embed", lambda x, hook: None)])


def test_invalid_configs():
    with pytest.raises(ConfigError, match="multiple of n_key_value_heads=3"):
        testing.tiny_config(n_key_value_heads=3)
    with pytest.raises(ConfigError, match="one entry per layer"):
        testing.tiny_config(window_sizes=(4, None))
    with pytest.raises(ConfigError, match="d_model must be a positive int"):
        testing.tiny_config(d_model=0)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4,
                                 vocab_size=50, n_positions=16)
    return testing.save_hf_model(hf, tmp_path_factory.mktemp("gpt2")), hf


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unknown_config_key_is_refused(gpt2_dir, tmp_path):
    d = _copy(gpt2_dir[0], tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["use_fancy_new_attention"] = True
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"\['use_fancy_new_attention'\]"):
        HookedTransformer.from_pretrained(d)


def test_unsupported_config_value_is_refused(gpt2_dir, tmp_path):
    d = _copy(gpt2_dir[0], tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["scale_attn_by_inverse_layer_idx"] = True
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        HookedTransformer.from_pretrained(d)


def _rewrite_tensors(src_dir, dst_dir, edit):
    from safetensors.numpy import save_file

    from jaxlens.converters._checkpoint import read_safetensors

    d = _copy(src_dir, dst_dir)
    f = d / "model.safetensors"
    tensors = {k: r() for k, r in read_safetensors(f).items()}
    edit(tensors)
    save_file(tensors, str(f))
    return d


def test_leftover_tensor_is_refused(gpt2_dir, tmp_path):
    d = _rewrite_tensors(gpt2_dir[0], tmp_path / "m",
                         lambda t: t.update({"transformer.h.0.attn.extra": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"1 checkpoint tensor\(s\) were not used.*h.0.attn.extra"):
        HookedTransformer.from_pretrained(d)


def test_wrong_shape_tensor_is_refused(gpt2_dir, tmp_path):
    def edit(t):
        t["transformer.h.1.mlp.c_fc.weight"] = t["transformer.h.1.mlp.c_fc.weight"][:, :-1].copy()
    d = _rewrite_tensors(gpt2_dir[0], tmp_path / "m", edit)
    with pytest.raises(CheckpointError,
                       match=r"h.1.mlp.c_fc.weight' has shape \(32, 127\), expected \(32, 128\)"):
        HookedTransformer.from_pretrained(d)


def test_truncated_safetensors_is_refused(gpt2_dir, tmp_path):
    d = _copy(gpt2_dir[0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        HookedTransformer.from_pretrained(d)


def test_pickled_checkpoint_refused_unless_allowed(gpt2_dir, tmp_path):
    import torch

    d = tmp_path / "pickled"
    gpt2_dir[1].save_pretrained(d, safe_serialization=False)
    for f in d.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"evil": Evil()}, d / "extra.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        HookedTransformer.from_pretrained(d)
    assert not marker.exists()  # nothing was unpickled


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["TotallyNewLM"]}))
    with pytest.raises(CheckpointError, match="No jaxlens converter for architecture 'TotallyNewLM'"):
        HookedTransformer.from_pretrained(tmp_path)


def test_remove_batch_dim_needs_batch_of_one():
    model = HookedTransformer(CFG, PARAMS)
    with pytest.raises(InputError, match="batch of 1"):
        model.run_with_cache(jnp.zeros((2, 4), jnp.int32), remove_batch_dim=True)
