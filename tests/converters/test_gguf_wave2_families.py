"""GGUF files of Gemma 3 (`gemma3`) and Qwen3-MoE (`qwen3moe`), and the GGUF tokenizers of the families
jaxlens maps from GGUF (Qwen, OLMo 2, StarCoder, Command R, Gemma 3).

Models: a random `transformers` model is written as llama.cpp's convert_hf_to_gguf.py writes it
(test_smollm2's `write_like_llama_cpp`: the gguf package's own tensor names, F32) with the metadata of
llama.cpp's `Gemma3Model` / `Qwen3MoeModel` (`Qwen2MoeModel.set_gguf_parameters`) and their tensor changes:
Gemma 3's norms (q/k norms included) stored as 1 + w and its embedding cut to the tokenizer's vocabulary;
Qwen3-MoE's experts stacked per projection. Loaded back through jaxlens, the logits equal the PyTorch model's
within 1e-4. The layer pattern and the 27B query scale, which llama.cpp's loader fixes rather than reads, are
checked on the metadata alone.

Tokenizers: a small BPE trained with the `tokenizers` package on a fixed corpus, with the pre-tokenizer of
each family's own tokenizer.json (regexes written out here from those files), is the Hugging Face reference;
its vocabulary is written into a GGUF file as llama.cpp's `_set_vocab_gpt2` / `_set_vocab_sentencepiece`
write it (tokens, token types, merges or scores, special token ids, `tokenizer.ggml.pre`). The tokenizer
jaxlens rebuilds from the file must encode and decode sample text as the reference does.
"""

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_writing import write_out
from test_gguf_families import _hf_tensors
from test_smollm2 import text_model_hparams, write_like_llama_cpp

from jaxlens import HookedTransformer, converters, testing
from jaxlens.converters import _gguf, _gguf_map, _gguf_tokenizer
from jaxlens.converters._gguf_split import read_gguf
from jaxlens.errors import CheckpointError

T = 12
N_TOKENS = 97  # Gemma 3: the tokenizer's vocabulary, below the embedding's 101 rows (llama.cpp cuts them)


def _gemma3_hparams(w, c):
    """llama.cpp's `Gemma3Model.set_gguf_parameters`: the global layers' rope base (and linear scaling),
    the window, the final softcap; no layer pattern, local rope base or query scale (the loader
    fixes them)."""
    full = c.rope_parameters["full_attention"]
    text_model_hparams(w, c, rope_theta=full["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(full["factor"])


def _qwen3moe_hparams(w, c):
    """llama.cpp's `TextModel.set_gguf_parameters` plus `Qwen2MoeModel`'s expert width."""
    text_model_hparams(w, c)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)


def _gemma3_tensors(hf) -> dict[str, np.ndarray]:
    """The state dict as llama.cpp's `Gemma3Model.modify_tensors` changes it: norms + 1, OOV rows dropped."""
    out = {}
    for name, t in hf.state_dict().items():
        a = t.detach().float().numpy().copy()
        out[name] = a + 1 if name.endswith("norm.weight") else a[:N_TOKENS] if "embed_tokens" in name else a
    return out


# case -> (HF config class, HF model class, config kwargs, metadata writer, tensors as llama.cpp changes them)
CASES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=32, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        intermediate_size=40, vocab_size=101, max_position_embeddings=64, sliding_window=4,
        query_pre_attn_scalar=12, final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        _gemma3_hparams, _gemma3_tensors),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=14,
        intermediate_size=64, moe_intermediate_size=28, num_experts=5, num_experts_per_tok=2,
        norm_topk_prob=True, vocab_size=N_TOKENS, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0}), _qwen3moe_hparams, _hf_tensors),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (GGUF path, tokens [2 T], HF logits over the file's vocabulary), built on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            cls, model_cls, conf, hparams, tensors = CASES[case]
            hf = testing.random_hf_model(cls, model_cls, seed=80 + len(case),
                                         **{"initializer_range": 0.2, **conf})
            path = write_like_llama_cpp(hf, case, tmp_path_factory.mktemp(case) / f"{case}.gguf",
                                        tensors=tensors(hf), hparams=hparams)
            tokens = np.random.RandomState(11).randint(0, N_TOKENS, (2, T))
            cache[case] = path, tokens, testing.hf_outputs(hf, tokens)["logits"][..., :N_TOKENS]
        return cache[case]

    return get


def _logits(cfg, params, tokens) -> np.ndarray:
    return np.asarray(HookedTransformer(cfg, jax.tree.map(jnp.asarray, params))(tokens))


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_of_family_matches_hf(built, case, tmp_path):
    path, tokens, want = built(case)
    cfg, params = _gguf.load(path, cache_dir=tmp_path, progress=False)
    assert cfg.d_vocab == N_TOKENS and cfg.use_qk_norm
    if case == "gemma3":
        assert cfg.window_sizes == (4, 4, 4, 4, 4, None, 4) and cfg.output_logits_soft_cap == 3.0
    else:
        assert (cfg.num_experts, cfg.experts_per_token, cfg.d_mlp) == (5, 2, 28)
        assert cfg.normalize_expert_weights
    np.testing.assert_allclose(_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)


def test_gemma3_window_pattern_matters(built, tmp_path, monkeypatch):
    """Guards the test above: read with every layer global, the same file gives other logits."""
    path, tokens, want = built("gemma3")
    monkeypatch.setattr(_gguf_map, "GEMMA3_GLOBAL_EVERY", 1)
    cfg, params = _gguf.load(path, cache_dir=tmp_path, progress=False)
    assert cfg.window_sizes is None
    assert np.abs(_logits(cfg, params, tokens) - want).max() > 1e-3


# --- the metadata llama.cpp's loader completes ------------------------------------------------------------


def _meta(arch: str, **keys) -> dict:
    base = {"block_count": 26, "embedding_length": 64, "attention.head_count": 4,
            "attention.head_count_kv": 2, "context_length": 128, "attention.layer_norm_rms_epsilon": 1e-6,
            "feed_forward_length": 96}
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in {**base, **keys}.items()}}


def _family_config(hf):
    return converters.family_for(hf).config_from_hf(hf)


SHAPES = {"token_embd.weight": (50, 64)}
MOE_SHAPES = {**SHAPES, "blk.0.ffn_gate_inp.weight": (4, 64), "blk.0.ffn_gate_exps.weight": (4, 24, 64)}


@pytest.mark.parametrize("layers,scalar", [(26, 32), (62, 16)])
def test_gemma3_query_scale_and_layer_pattern(layers, scalar):
    """Query scale 1/sqrt(head_dim), but 1/sqrt(d_model / n_heads) in the 62-layer 27B; one layer in six
    global (layers 5, 11, ...) when the file has a window; the local layers' rope base 10000."""
    hf = _gguf_map.hf_config(_meta("gemma3", block_count=layers, **{"attention.key_length": 32,
                                                                   "attention.sliding_window": 512}), SHAPES)
    assert hf["query_pre_attn_scalar"] == scalar and hf["sliding_window"] == 512
    globals_ = [i for i, kind in enumerate(hf["layer_types"]) if kind == "full_attention"]
    assert globals_ == list(range(5, layers, 6)) and len(hf["layer_types"]) == layers
    assert hf["rope_local_base_freq"] == 10000.0 and hf["final_logit_softcapping"] is None


def test_gemma3_without_window_is_all_global():
    hf = _gguf_map.hf_config(_meta("gemma3"), SHAPES)
    assert set(hf["layer_types"]) == {"full_attention"}
    cfg = _family_config(hf)
    assert cfg.window_sizes is None and cfg.attn_scale == 4.0  # sqrt(head_dim 16)


def test_qwen3moe_expert_metadata():
    meta = _meta("qwen3moe", expert_count=4, expert_used_count=2)
    hf = _gguf_map.hf_config(meta, MOE_SHAPES)  # no expert_feed_forward_length: the tensor gives the width
    assert (hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"]) == (4, 2, 24)
    assert hf["norm_topk_prob"] is True  # llama.cpp's Qwen3-MoE graph always renormalises
    off = _gguf_map.hf_config({**meta, "qwen3moe.expert_weights_norm": False}, MOE_SHAPES)
    assert off["norm_topk_prob"] is False and not _family_config(off).normalize_expert_weights


@pytest.mark.parametrize("arch,keys,shapes,message", [
    ("qwen3moe", dict(expert_count=4), MOE_SHAPES, r"no qwen3moe\.expert_used_count"),
    ("qwen3moe", dict(expert_count=4, expert_used_count=2), SHAPES, r"no router tensor blk\.0\.ffn_gate_inp"),
    ("qwen3", dict(expert_count=4, expert_used_count=2), MOE_SHAPES,
     r"expert_count=4.*\['llama', 'qwen3moe'\].*not 'qwen3'"),
    ("gemma3", {"attention.sliding_window_pattern": 4}, SHAPES,
     r"\['gemma3\.attention\.sliding_window_pattern'\] are not understood"),
])
def test_bad_metadata_is_refused(arch, keys, shapes, message):
    with pytest.raises(CheckpointError, match=message):
        _gguf_map.hf_config(_meta(arch, **keys), shapes)


def test_unsupported_architecture_names_itself_and_the_supported_ones():
    with pytest.raises(CheckpointError, match=r"'mamba' is not supported.*'qwen3moe', 'gemma3'"):
        _gguf_map.architecture({"general.architecture": "mamba"})
    assert {"gemma3", "qwen3moe"} <= set(_gguf_map.SUPPORTED)


# --- tokenizers --------------------------------------------------------------------------------------------

# the `pre_tokenizer` of each family's tokenizer.json: Qwen2/Qwen3, OLMo 2 (cl100k's split, llama.cpp's
# "dbrx"), OLMo 1 (GPT-2's), StarCoder and Command R (digits one by one, then GPT-2's)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CL100K_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = lambda regex: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex)
    if kind in ("qwen2", "dbrx"):
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT if kind == "qwen2" else CL100K_SPLIT), "isolated")
        return pre_tokenizers.Sequence([split, byte_level(False)])
    if kind == "olmo":
        return byte_level(True)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level(True)])


CORPUS = ["def f(x):\n    return x + 12345\n", "    y = 1  +  22  *  333\n", "Hello world, it's 2024; don't!",
          "naïve café — 東京 and ✓ marks", "<think>reasoning</think> done", "the quick brown fox " * 3,
          "  indented  text\n\n\tand tabs 99 bottles", "HELLO World Again"] * 20
TEXTS = ["hello world", "    123 and  45", "x =  7", "  héllo\n\n  world 12 123 ✓", "<think>ok</think>",
         "It's 2024-01-01; DON'T!", "naïve café — 東京 €", "the quick brown fox jumps", ""]
# case -> (GGUF architecture, tokenizer.ggml.model, tokenizer.ggml.pre, [bos, eos, pad, ...], add BOS)
TOKENIZER_CASES = {
    "qwen": ("qwen3moe", "gpt2", "qwen2", [None, "<|im_end|>", "<|endoftext|>", "<|im_start|>"], False),
    "olmo2": ("olmo2", "gpt2", "dbrx", [None, "<|endoftext|>", "<|pad|>"], False),
    "olmo": ("olmo2", "gpt2", "olmo", [None, "<|endoftext|>", "<|padding|>"], False),
    "starcoder": ("starcoder", "gpt2", "starcoder", [None, "<|endoftext|>", "<fim_prefix>"], False),
    "command-r": ("command-r", "gpt2", "command-r", ["<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<PAD>"], True),
    "gemma3": ("gemma3", "llama", "default", ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<start_of_turn>",
                                              "<end_of_turn>"], True),
}


def _reference(case: str):
    """(the HF reference tokenizer, its `tokenizers` backend): a BPE trained on CORPUS with the family's
    pipeline, special tokens first, `<think>` / `</think>` as plain added tokens (byte-level cases)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    _, model, pre, special, add_bos = TOKENIZER_CASES[case]
    named = [t for t in special if t]
    if model == "llama":  # Gemma's tokenizer.json: "▁" for spaces, no split, byte fallback
        def gemma_pipeline(tok):
            tok.normalizer = normalizers.Replace(" ", "\u2581")
            tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse()])
            return tok

        trained = gemma_pipeline(Tokenizer(models.BPE()))
        trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
        j = json.loads(trained.to_str())["model"]
        pieces = sorted(j["vocab"], key=j["vocab"].get)
        vocab = {t: i for i, t in enumerate(named + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
        merges = [tuple(m) for m in j["merges"]]
        tok = gemma_pipeline(Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                                                  fuse_unk=True)))
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=400, special_tokens=named, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{special[0]} $A", special_tokens=[(special[0], tok.token_to_id(special[0]))])
    names = dict(bos_token=special[0], eos_token=special[1], pad_token=special[2],
                 unk_token="<unk>" if model == "llama" else None)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names), tok


def _write_vocab_gguf(case: str, tok, path, pre: str | None = None):
    """The reference vocabulary as llama.cpp's converter writes it: byte-level (`_set_vocab_gpt2`): tokens in
    id order, CONTROL (3) for special added tokens, USER_DEFINED (4) for plain ones, merges; SentencePiece
    (`_set_vocab_sentencepiece`): scores, UNKNOWN (2), CONTROL, BYTE (6), no merges; ids and add_bos."""
    arch, model, family_pre, special, add_bos = TOKENIZER_CASES[case]
    j = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    added = {a["content"]: a["special"] for a in j["added_tokens"]}
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre or family_pre)
    w.add_token_list(tokens)
    if model == "llama":
        is_byte = lambda t: len(t) == 6 and t.startswith("<0x") and t.endswith(">")
        w.add_token_types([2 if t == "<unk>" else 3 if t in added else 6 if is_byte(t) else 1
                           for t in tokens])
        w.add_token_scores([0.0 if t in added or is_byte(t) else -float(i) for i, t in enumerate(tokens)])
        w.add_unk_token_id(vocab["<unk>"])
        w.add_add_space_prefix(False)
    else:
        w.add_token_types([(3 if added[t] else 4) if t in added else 1 for t in tokens])
        w.add_token_merges([" ".join(m) for m in j["model"]["merges"]])
    if special[0]:
        w.add_bos_token_id(vocab[special[0]])
    w.add_eos_token_id(vocab[special[1]])
    w.add_pad_token_id(vocab[special[2]])
    w.add_add_bos_token(add_bos)
    w.add_tensor("x", np.zeros(4, np.float32))
    write_out(w)
    return path


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_gguf_tokenizer_encodes_like_hf(case, tmp_path):
    ref, tok = _reference(case)
    path = _write_vocab_gguf(case, tok, tmp_path / "t.gguf")
    ours = _gguf_tokenizer.tokenizer_from_gguf(read_gguf(path).metadata)
    special = [t for t in TOKENIZER_CASES[case][3] if t]
    texts = [*TEXTS, f"{special[-1]}user\nhi {special[1]}\n"]
    for text in texts:
        want = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == want, text
        assert ours.decode(want) == ref.decode(want), text
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref) == len(tok.get_vocab(with_added_tokens=True))  # no id past the vocabulary


def test_digit_split_matters_for_starcoder_vocabularies(tmp_path, monkeypatch):
    """Guards the test above: with GPT-2's split alone (transformers' fallback), a StarCoder-style file
    tokenizes runs of spaces before digits differently from its reference."""
    ref, tok = _reference("starcoder")
    path = _write_vocab_gguf("starcoder", tok, tmp_path / "t.gguf")
    monkeypatch.setitem(_gguf_tokenizer.PRE_TOKENIZERS, "starcoder", False)
    ours = _gguf_tokenizer.tokenizer_from_gguf(read_gguf(path).metadata)
    assert ours("x =  7")["input_ids"] != ref("x =  7")["input_ids"]


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    _, tok = _reference("qwen")
    metadata = read_gguf(_write_vocab_gguf("qwen", tok, tmp_path / "t.gguf", pre="mystery-bpe")).metadata
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.pre='mystery-bpe'.*'qwen2'.*'starcoder'"):
        _gguf_tokenizer.tokenizer_from_gguf(metadata)
