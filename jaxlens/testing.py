"""Test helpers: tiny configs with unequal sizes (axes cannot be confused), random Hugging Face reference
models saved to a directory, and their outputs as numpy; `interrupt_after` stops a sweep part-way, as a killed
job would. torch/transformers are imported lazily: reference only."""

from pathlib import Path

import numpy as np

from jaxlens.config import Config


def tiny_config(**overrides) -> Config:
    """A 3-layer GPT-2-like config with prime-ish sizes (d_model 40, 5 heads of 8, d_mlp 72, vocab 97)."""
    base = dict(d_model=40, n_layers=3, n_heads=5, d_head=8, d_mlp=72, d_vocab=97, n_ctx=32)
    return Config(**{**base, **overrides})


def perturb_hf_model(model, scale: float = 0.1, seed: int = 0):
    """Add noise to every 1-D parameter (norm gains, biases) so weight processing is not trivially exact."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def numpy_params(cfg, seed: int, scale: float = 0.3) -> dict:
    """Random params drawn with numpy (no compile): every tensor `scale` * N(0, 1), norm gains 1 + that;
    shapes from `jaxlens.param_shapes`."""
    import jax
    import jax.numpy as jnp

    from jaxlens.params import param_shapes

    rng = np.random.RandomState(seed)
    is_entry = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
    paths, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_entry)
    out = []
    for path, (_, shape) in paths:
        x = scale * rng.randn(*shape) + jax.tree_util.keystr(path).endswith("['w']")
        out.append(jnp.asarray(x, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_hf_model(config_cls_name: str, model_cls_name: str, seed: int = 0, **config):
    """A randomly initialised `transformers` model in float32 eval mode, eager attention, gains perturbed."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls_name)(**config)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls_name)(cfg).float().eval()
    return perturb_hf_model(model, seed=seed)


def write_random_gpt2(path: Path, d_model: int, n_layers: int, vocab: int, n_ctx: int = 1024,
                      tie_word_embeddings: bool | None = None) -> Path:
    """A random GPT-2 checkpoint (model.safetensors + config.json, 12 heads, no torch) written into `path`:
    weights N(0, 0.02), LayerNorm gains 1 + N(0, 0.02). Large checkpoints for loading tests and benchmarks."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)

    def r(*shape, one=0.0):
        return one + 0.02 * rng.standard_normal(shape, np.float32)

    D = d_model
    t = {"transformer.wte.weight": r(vocab, D), "transformer.wpe.weight": r(n_ctx, D),
         "transformer.ln_f.weight": r(D, one=1.0), "transformer.ln_f.bias": r(D)}
    for l in range(n_layers):
        p = f"transformer.h.{l}."
        t |= {p + "ln_1.weight": r(D, one=1.0), p + "ln_1.bias": r(D), p + "ln_2.weight": r(D, one=1.0),
              p + "ln_2.bias": r(D), p + "attn.c_attn.weight": r(D, 3 * D), p + "attn.c_attn.bias": r(3 * D),
              p + "attn.c_proj.weight": r(D, D), p + "attn.c_proj.bias": r(D),
              p + "mlp.c_fc.weight": r(D, 4 * D), p + "mlp.c_fc.bias": r(4 * D),
              p + "mlp.c_proj.weight": r(4 * D, D), p + "mlp.c_proj.bias": r(D)}
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": D, "n_layer": n_layers,
              "n_head": 12, "vocab_size": vocab, "n_positions": n_ctx}
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
    (path / "config.json").write_text(json.dumps(config))
    return path


def save_hf_model(model, path: Path, tokenizer=None) -> Path:
    """save_pretrained (safetensors) into `path`, with a tokenizer if given."""
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def saved_random_hf_model(path: Path, config_cls_name: str, model_cls_name: str, seed: int, n_tokens: int,
                          **config):
    """`random_hf_model` saved into `path` (with a tiny trained tokenizer when vocab_size is 300) and random
    tokens [2, n_tokens] for it: (model, tokens)."""
    hf = random_hf_model(config_cls_name, model_cls_name, seed=seed, **config)
    tokens = np.random.RandomState(seed).randint(0, config["vocab_size"], (2, n_tokens))
    tok = train_tiny_tokenizer(path) if config["vocab_size"] == 300 else None
    save_hf_model(hf, path, tok)
    return hf, tokens


def hf_outputs(model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Logits, hidden states [layer+1 batch pos d_model] and attentions [layer batch head q k] as numpy."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True,
                    output_attentions=True)
    res = {"logits": out.logits.float().numpy(),
           "hidden_states": np.stack([h.float().numpy() for h in out.hidden_states])}
    if out.attentions is not None and all(a is not None for a in out.attentions):
        res["attentions"] = np.stack([a.float().numpy() for a in out.attentions])
    return res


def train_tiny_tokenizer(path: Path, texts: list[str] | None = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained offline on a few sentences, as a transformers tokenizer saved to
    `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [
        "The quick brown fox jumps over the lazy dog.",
        "When Mary and John went to the store, John gave a drink to Mary.",
        "The capital of France is Paris.", "Induction heads copy repeated tokens: A B ... A -> B.",
    ] * 20
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(path)
    return tok


class SweepInterrupted(Exception):
    """Raised by `interrupt_after` to stop a sweep part-way, as a killed job would
    (to show and test resume)."""


def interrupt_after(n_chunks: int, record: list | None = None):
    """An `on_chunk` callback for `jaxlens.patching` sweeps that raises SweepInterrupted once `n_chunks`
    chunks are stored; each (done, total) call is appended to `record` if given."""

    def on_chunk(done: int, total: int) -> None:
        if record is not None:
            record.append((done, total))
        if done >= n_chunks:
            raise SweepInterrupted(f"stopped after {done} of {total} chunks")

    return on_chunk
