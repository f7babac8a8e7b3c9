"""Text generation with a key/value cache: prefill once, then one compiled decode step per token.

    tokens = generate(params, cfg, prompt_tokens, max_new_tokens=20, do_sample=False, eos_token_id=0)
    text = model.generate("The capital of France is", max_new_tokens=5, do_sample=False)
    steered = model.generate(prompt, 20, key=key,
                             interventions={"blocks.6.hook_resid_post": Add(4.0 * direction)})

The cache holds keys and values for a fixed number of slots (prompt + max_new_tokens), so the decode step has
one shape and compiles once; the whole loop is a `lax.while_loop` inside one jit, and each step costs the same
whatever its position (attention reads the fixed-size cache under a mask). Sampling follows TransformerLens's
`sample_logits` (temperature, top-k, top-p, frequency penalty) with a JAX PRNG key: pass `key=` for
reproducible samples; without one each call draws a fresh key (so it samples afresh, as TransformerLens does)
and warns once. Generation stops when every sequence has produced an EOS token; finished sequences are padded
with EOS.

Where an intervention applies is `intervention_positions` (one mode, or {hook name: mode}):
    "prompt"    the prefill only: position axes of size 1 or the prompt's length (their keys/values are
                cached, so the effect persists, exactly as re-running the patched prompt at every step would);
    "all"       the prefill and every decode step, position axes of size 1 (steering);
    "absolute"  every call, one entry per position of the output (prompt + max_new_tokens), sliced per call;
    "auto"      (default) by each array's size: 1 -> "all", prompt length -> "prompt", prompt + max_new_tokens
                -> "absolute"; an error where that is ambiguous (a size-1 axis with a one-token prompt).
A `key_pos` axis must have size 1 or prompt + max_new_tokens (attention reads every cache slot). Function
interventions (`Fn`) see the prefill activations [batch prompt_len ...] and then one position at a time
("prompt": the prefill only). Batches of prompts of different lengths are left-padded and run under a mask.
"""

import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxlens._generate_plan import plan_interventions, slice_leaves
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.model.attention import KVState
from jaxlens.model.forward import check_tokens, run, unembed
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm
from jaxlens.shapes import ParamsLike, PRNGKey, resolve_params

# einsum letters: b=batch v=d_vocab


def generate(
    params: ParamsLike,
    cfg: Config,
    tokens: Int[Array, "batch pos"],
    *,
    max_new_tokens: int,
    key: PRNGKey | None = None,
    attention_mask: Bool[Array, "batch pos"] | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    freq_penalty: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_at_eos: bool = True,
    interventions: Mapping[str, Any] | None = None,
    use_past_kv_cache: bool = True,
    intervention_positions: str | Mapping[str, str] = "auto",
) -> Int[Array, "batch total"]:
    """Continue each prompt by `max_new_tokens` tokens (greedy or sampled); returns prompt + new tokens.

    Args:
        params, cfg: the model.
        tokens: prompt ids [batch pos]; rows shorter than others are left-padded (see attention_mask).
        max_new_tokens: tokens to generate; prompt length + max_new_tokens must be at most cfg.n_ctx.
        key: PRNG key for sampling. None draws a fresh random key each call (TL samples afresh too) and warns
            once: pass a key for reproducible samples. Unused when greedy.
        attention_mask: [batch pos], False on left padding; None when no row is padded.
        do_sample: sample (True) or take the argmax (False, greedy). temperature == 0 is greedy too.
        temperature, top_k, top_p, freq_penalty: as TransformerLens's `sample_logits`.
        eos_token_id: id(s) that end a sequence; needed when stop_at_eos.
        stop_at_eos: stop a sequence at its first EOS (it is then padded with eos_token_id); stop the loop
            when all sequences have stopped (the rest of the output is EOS).
        interventions: {hook name: intervention}.
        use_past_kv_cache: False re-runs the whole (fixed-size) sequence every step: slower, for checking.
        intervention_positions: "auto", "prompt", "all" or "absolute" for every intervention, or {hook name:
            mode}: where each applies (module docstring).

    Returns:
        [batch pos + max_new_tokens] ids: the prompts, then the generated tokens.

    Raises:
        InputError: empty prompt, too many tokens for n_ctx, bad sampling settings, stop_at_eos without an EOS
            id, a mask that is not left padding, or an intervention whose position axis does not fit its
            intervention_positions mode (or is ambiguous under "auto").
    """
    params, cfg = resolve_params(params, cfg)
    tokens = check_tokens(tokens, cfg)
    b, p = tokens.shape
    eos = _check_settings(cfg, tokens.shape, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                          stop_at_eos)
    total = p + max_new_tokens
    if attention_mask is not None:
        attention_mask = _check_mask(attention_mask, tokens.shape)
    prefill_iv, decode_iv, spec = plan_interventions(cfg, interventions or {}, p, total, use_past_kv_cache,
                                                     intervention_positions)
    greedy = (not do_sample) or temperature == 0
    if key is None:
        key = jax.random.key(0) if greedy else _fresh_key()
    settings = dict(cfg=cfg, max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                    use_top_p=top_p is not None, use_freq=freq_penalty != 0, stop_at_eos=stop_at_eos,
                    use_cache=use_past_kv_cache, spec=spec)
    return _generate_jit(
        params, tokens, attention_mask, key,
        jnp.asarray(temperature if not greedy else 1.0, jnp.float32), jnp.asarray(top_p or 1.0, jnp.float32),
        jnp.asarray(freq_penalty, jnp.float32), jnp.asarray(eos, jnp.int32), prefill_iv, decode_iv,
        **settings)


def sample_logits(
    logits: Float[Array, "batch d_vocab"],
    key: PRNGKey,
    *,
    greedy: bool = False,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
    top_p: float | Array | None = None,
    freq_penalty: float | Array = 0.0,
    counts: Float[Array, "batch d_vocab"] | None = None,
) -> Int[Array, " batch"]:
    """One token per row: argmax, or a sample after temperature, frequency penalty, top-k and top-p filtering.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (the first always).
    `counts` [batch d_vocab] is how often each token occurred so far (for freq_penalty).
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if counts is not None:
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) > top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def steps_taken(tokens: np.ndarray, prompt_len: int, eos_token_id: int | Sequence[int] | None) -> int:
    """How many generation steps ran before every row had produced an EOS (TL's output length)."""
    new = np.asarray(tokens)[:, prompt_len:]
    if eos_token_id is None or new.shape[1] == 0:
        return new.shape[1]
    hit = np.isin(new, np.atleast_1d(np.asarray(eos_token_id)))
    first = np.where(hit.any(1), hit.argmax(1) + 1, new.shape[1])
    return int(first.max())


_warned_fresh_key = False  # generate() warns once per process when it draws a key itself


def _fresh_key() -> PRNGKey:
    """A key from the OS's entropy (each call samples afresh, as TL's torch sampling), warning once."""
    global _warned_fresh_key
    if not _warned_fresh_key:
        _warned_fresh_key = True
        warnings.warn("generate(do_sample=True) without key=: drawing a fresh random key, so each call "
                      "samples afresh (as TransformerLens does). Pass key=jax.random.key(seed) for "
                      "reproducible samples. (Shown once.)", UserWarning, stacklevel=3)
    return jax.random.key(secrets.randbits(31))


# -- the compiled loop ----------------------------------------------------------------------------------

def _generate_core(params, tokens, mask, key, temperature, top_p, freq_penalty, eos, prefill_iv, decode_iv, *,
                   cfg, max_new_tokens, greedy, top_k, use_top_p, use_freq, stop_at_eos, use_cache, spec):
    b, p = tokens.shape
    total = p + max_new_tokens
    fill = eos[0] if eos.shape[0] else jnp.int32(0)
    buf = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), fill, tokens.dtype)], axis=1)
    full_mask = None if mask is None else jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)

    if use_cache:
        shape = (cfg.n_layers, b, total, cfg.n_key_value_heads, cfg.d_head)
        dtype = params["blocks"]["attn"]["W_K"].dtype
        kv = KVState(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        logits, kv = _prefill(params, cfg, tokens, full_mask, kv, prefill_iv)
    else:
        kv = None
        logits = _full_logits(params, cfg, buf, full_mask, decode_iv, p - 1)

    def decode(tok, t, kv, buf):
        if use_cache:
            iv = slice_leaves(decode_iv, spec, p + t)
            out, _, kv = run(params, cfg, tok[:, None], interventions=iv, kv_cache=kv, pos_offset=p + t,
                             attention_mask=full_mask)
            return out[:, -1].astype(jnp.float32), kv
        return _full_logits(params, cfg, buf, full_mask, decode_iv, p + t), kv

    counts = None
    if use_freq:
        valid = jnp.ones(tokens.shape, bool) if mask is None else mask
        counts = jnp.zeros((b, cfg.d_vocab), jnp.float32).at[jnp.arange(b)[:, None], tokens].add(
            valid.astype(jnp.float32))

    def body(carry):
        t, buf, kv, key, finished, counts, logits = carry
        key, sub = jax.random.split(key)
        tok = sample_logits(logits, sub, greedy=greedy, temperature=temperature, top_k=top_k,
                            top_p=top_p if use_top_p else None, freq_penalty=freq_penalty, counts=counts)
        if stop_at_eos:
            tok = jnp.where(finished, fill, tok)
            finished = finished | jnp.isin(tok, eos)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None].astype(buf.dtype), p + t, axis=1)
        if counts is not None:
            counts = counts.at[jnp.arange(b), tok].add(1.0)
        logits, kv = jax.lax.cond(t + 1 < max_new_tokens, lambda: decode(tok, t, kv, buf),
                                  lambda: (logits, kv))
        return t + 1, buf, kv, key, finished, counts, logits

    def cond(carry):
        t, finished = carry[0], carry[4]
        return (t < max_new_tokens) & ~(stop_at_eos & jnp.all(finished))

    carry = (jnp.int32(0), buf, kv, key, jnp.zeros((b,), bool), counts, logits)
    return jax.lax.while_loop(cond, body, carry)[1]


_generate_jit = jax.jit(_generate_core, static_argnames=(
    "cfg", "max_new_tokens", "greedy", "top_k", "use_top_p", "use_freq", "stop_at_eos", "use_cache", "spec"))


def _prefill(params, cfg: Config, tokens, full_mask, kv, iv):
    """Run the prompt through every block (filling the cache) and unembed only its last position."""
    if any(name.startswith("ln_final") for name in iv):  # interventions on the final norm: the plain path
        out, _, kv = run(params, cfg, tokens, interventions=iv, kv_cache=kv, attention_mask=full_mask)
        return out[:, -1].astype(jnp.float32), kv
    resid, _, kv = run(params, cfg, tokens, interventions=iv, kv_cache=kv, attention_mask=full_mask,
                       stop_at_layer=cfg.n_layers)
    last = norm(params.get("ln_final", {}), resid[:, -1:], cfg, Hooks(), "ln_final")
    return unembed(params, cfg, last)[:, -1].astype(jnp.float32), kv


def _full_logits(params, cfg: Config, buf, full_mask, iv, index):
    """Next-token logits at position `index` from a forward over the whole fixed-size buffer (no cache)."""
    out, _, _ = run(params, cfg, buf, interventions=iv, attention_mask=full_mask)
    return jax.lax.dynamic_index_in_dim(out, index, axis=1, keepdims=False).astype(jnp.float32)


def _check_settings(cfg, shape, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                    stop_at_eos) -> list[int]:
    p = shape[1]
    if cfg.attention_dir != "causal":
        raise InputError("generate needs a causal (decoder) model; this config has bidirectional attention.")
    if p == 0:
        raise InputError(f"Empty prompt (tokens of shape {shape}): generation needs at least one token. "
                         "Pass some text or token ids, or prepend_bos=True to start from the BOS token.")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative int; found {max_new_tokens!r}. Pass the "
                         "number of tokens to generate (0 returns the prompt).")
    if p + max_new_tokens > cfg.n_ctx:
        raise InputError(
            f"Prompt of {p} tokens + max_new_tokens={max_new_tokens} = {p + max_new_tokens} exceeds the "
            f"model's context n_ctx={cfg.n_ctx}. Ask for at most {max(cfg.n_ctx - p, 0)} new tokens or "
            "shorten the prompt.")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy); found {temperature}. Use 1.0 to sample "
                         "from the model's distribution, lower for sharper, or do_sample=False for greedy.")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= cfg.d_vocab):
        raise InputError(f"top_k must be an int in [1, d_vocab={cfg.d_vocab}] or None; found {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] or None; found {top_p!r}. It is the probability mass to "
                         "sample from (e.g. 0.9); None or 1.0 turns top-p filtering off.")
    eos = [] if eos_token_id is None else [int(e) for e in np.atleast_1d(np.asarray(eos_token_id))]
    if stop_at_eos and not eos:
        raise InputError("stop_at_eos=True needs an EOS id: pass eos_token_id=..., or stop_at_eos=False.")
    if any(not 0 <= e < cfg.d_vocab for e in eos):
        raise InputError(f"eos_token_id {eos} is outside the vocabulary [0, {cfg.d_vocab}).")
    return eos


def _check_mask(mask, shape) -> Bool[Array, "batch pos"]:
    m = np.asarray(mask).astype(bool)
    if m.shape != tuple(shape):
        raise InputError(f"attention_mask must have the tokens' shape {tuple(shape)}; found {m.shape}.")
    if not m[:, -1].all() or (np.diff(m.astype(np.int8), axis=1) < 0).any():
        raise InputError("generate needs left padding: each attention_mask row must be False...False "
                         "True...True (padding first), so every prompt ends at the last position.")
    return jnp.asarray(m)


def generate_from_input(model, input, max_new_tokens: int = 10, *, stop_at_eos: bool = True,
                        eos_token_id: int | Sequence[int] | None = None, do_sample: bool = True,
                        top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                        freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                        prepend_bos: bool | None = None, return_type: str = "input",
                        key: PRNGKey | None = None, interventions: Mapping[str, Any] | None = None,
                        intervention_positions: str | Mapping[str, str] = "auto", verbose: bool = True):
    """`HookedTransformer.generate`: text or ids in, text or ids out, as TransformerLens's `generate`.

    Prompts in a list are tokenized one by one and left-padded. The output stops where every sequence has
    produced an EOS (or after max_new_tokens). return_type "input" gives text for text and ids for ids; "str"
    decodes each sequence without padding or the prepended BOS, up to and including its first EOS; "tokens"
    gives the ids [batch pos] (left padding included). `verbose` is accepted for TL's signature and ignored:
    the whole loop is one compiled call, with no per-token progress to show (TL's bridge ignores it too).
    """
    del verbose
    if return_type not in ("input", "str", "tokens"):
        raise InputError(f"return_type must be 'input', 'str' or 'tokens'; found {return_type!r}.")
    is_text = isinstance(input, str) or (isinstance(input, list) and bool(input)
                                         and isinstance(input[0], str))
    mask = None
    if is_text:
        rows = [np.asarray(model.to_tokens(t, prepend_bos=prepend_bos))[0] for t in
                ([input] if isinstance(input, str) else input)]
        width = max(len(r) for r in rows)
        tok = model.tokenizer
        pad = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        tokens = np.asarray([[pad] * (width - len(r)) + list(r) for r in rows], np.int32)
        if any(len(r) < width for r in rows):
            lengths = np.asarray([len(r) for r in rows])
            mask = jnp.asarray(np.arange(width)[None] >= (width - lengths)[:, None])
    else:
        tokens = np.atleast_2d(np.asarray(input))
    if eos_token_id is None and stop_at_eos and model.tokenizer is not None:
        eos_token_id = model.tokenizer.eos_token_id
    out = generate(model.params, model.cfg, jnp.asarray(tokens), max_new_tokens=max_new_tokens, key=key,
                   attention_mask=mask, do_sample=do_sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, freq_penalty=freq_penalty, eos_token_id=eos_token_id, stop_at_eos=stop_at_eos,
                   interventions=interventions, use_past_kv_cache=use_past_kv_cache,
                   intervention_positions=intervention_positions)
    p = tokens.shape[1]
    out = out[:, :p + steps_taken(np.asarray(out), p, eos_token_id if stop_at_eos else None)]
    if return_type == "tokens" or (return_type == "input" and not is_text):
        return out
    bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    texts = [_decode_row(model, row, p, None if mask is None else np.asarray(mask[i]), bos,
                         eos_token_id if stop_at_eos else None) for i, row in enumerate(np.asarray(out))]
    return texts[0] if isinstance(input, str) else texts


def _decode_row(model, row: np.ndarray, p: int, mask, bos: bool, eos) -> str:
    prompt = row[:p] if mask is None else row[:p][mask]
    new = row[p:]
    if eos is not None:
        hit = np.nonzero(np.isin(new, np.atleast_1d(np.asarray(eos))))[0]
        new = new[: hit[0] + 1] if hit.size else new
    ids = np.concatenate([prompt[1:] if bos else prompt, new])
    return model.tokenizer.decode(ids.tolist())
