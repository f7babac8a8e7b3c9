"""Attribution: the adjacency A[target, source] of one prompt's attribution graph (Ameisen et al. 2025,
"Circuit Tracing"; circuit-tracer 0.5 `attribution/attribute.py`, ../shared/RESEARCH.md 1.3-1.7).

    graph = attribute(model, transcoders, "The capital of France is", max_feature_nodes=2000)
    graph.adjacency                        # [n_nodes, n_nodes], circuit-tracer's node order (graph.py)

One forward of the replacement model (`replacement.py`) gives the active features, the error vectors
(MLP output minus the transcoder's reconstruction) and the logits. A row of A is one vector-Jacobian product
of the frozen forward with respect to the additive source sites (the embedding, every MLP output), with the
cotangent one-hot at the target's (layer, position) times its encoder row (a feature) or the demeaned
unembedding column at the final normalised residual, last position (a logit); the gradients are contracted
with the sources' vectors (a_s W_dec_s at every layer the feature writes, the error vectors, the token
embeddings).

Rows are computed in chunks of at most `batch_size`, vmapped, one compiled call each, and each call is a
backward pass alone: the clean run's attention patterns and norm scales are patched in as constants, so none
of the forward's values is needed. A feature at layer l reads only blocks [0, l], so the rows to compute are
sorted by layer and each chunk runs the forward truncated at its highest target's layer, rounded up to one of
a few depths (`_depths`: 1/8, 1/4, 1/2, 3/4 and all of n_layers; one compiled program each). circuit-tracer
also starts each batch's backward at its highest target layer, but its batches stay in influence order, so
most of them start near the top. The gradients meet the decoder rows and error vectors site by site
(`_site_layout`).

Prompts are padded on the right to a bucket length (`bucket_length`: powers of two below `pad_to`,
multiples of `pad_to` from there, at most n_ctx), and the counts that set the compiled programs' shapes
(the active features, the decoder-row blocks) to powers of two, so every prompt of a bucket reuses the same
compiled programs (module-level `jax.jit`s, keyed on shapes and the static config, never on the prompt).
The model is causal, so the real positions' values and Jacobians do not see the padding; the padded
positions get no feature, error or token node, their columns are dropped, and the logits are read at the
real last position.

As circuit-tracer: the logits kept are the most probable up to `max_n_logits`, the smallest prefix whose
cumulative probability reaches `desired_logit_prob`; features and errors at the first `zero_positions`
positions (the BOS) are zeroed; with `max_feature_nodes`, feature rows are computed in order of their partial
influence on the logits, recomputed every `UPDATE_INTERVAL` batches, and only the visited features stay nodes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.errors import InputError, JaxlensError
from jaxlens.graphs.graph import AttributionGraph
from jaxlens.graphs.replacement import (
    Sources,
    TranscoderSet,
    embedding,
    encode,
    frozen_forward,
    numpy_decoder_rows,
    reconstruct,
    transcoder_set,
    zero_sources,
)

# einsum letters: b=row l=layer p=pos d=d_model

#: Feature batches between two updates of the influence ranking (circuit-tracer's `update_interval`).
UPDATE_INTERVAL = 4
#: Rows per compiled call at most (fewer if batch_size is smaller): smaller chunks of the layer-sorted rows
#: follow their targets' layers more closely (SmolLM2 on CPU: 32 rows about 10% faster than 64).
CHUNK_ROWS = 32
#: `attribute`'s default bucket step (`bucket_length`): prompts of 9-16 tokens share programs, of 17-32, ...
PAD_TO = 16


def attribute(model, transcoders, prompt, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              max_feature_nodes: int | None = None, batch_size: int | None = None,
              zero_positions: int | None = None, pad_to: int | None = PAD_TO) -> AttributionGraph:
    """The attribution graph of `prompt` on `model` with `transcoders` replacing its MLPs.

    Args:
        model: a decoder HookedTransformer (`.params`, `.cfg`, `.tokenizer`), loaded the way the transcoders
            were trained (circuit-tracer's: `from_pretrained_no_processing`).
        transcoders: {layer: Transcoder} (plain or skip), a CrossLayerTranscoder, or a circuit-tracer path
            (`jaxlens.dictionaries.load_circuit_tracer`).
        prompt: a string (tokenised without special tokens, then a special token, BOS first, prepended unless
            the first token is special: circuit-tracer's `ensure_tokenized`), or token ids [pos] / [1 pos]
            (given a tokenizer, the same prefix rule applies).
        max_n_logits: at most this many logit nodes.
        desired_logit_prob: keep the most probable logits until their cumulative probability reaches this.
        max_feature_nodes: the budget of feature nodes (None: every active feature). It counts features only:
            error (n_layers * n_pos), token (n_pos) and logit nodes are always in the graph.
        batch_size: rows per batch of the visiting order (circuit-tracer's batch_size) and at most per
            compiled call; None fits `default_batch_size`'s memory budget.
        zero_positions: how many leading positions have their features and errors zeroed (default 1: BOS).
        pad_to: the bucket step (`bucket_length`): the prompt is padded on the right to its bucket's length
            and the compiled programs are shared by every prompt of the bucket (the graph is the same, up to
            float32 rounding); None computes at the prompt's own length and counts (a compile per prompt).

    Returns:
        An AttributionGraph (adjacency in circuit-tracer's node order, unpruned).

    Raises:
        TranscoderError: transcoders whose hooks, widths or layers do not fit the model.
        InputError: an empty prompt, one longer than the context, a string without a tokenizer, options out
            of range (a feature budget below 1, max_n_logits outside [1, d_vocab], ...).
    """
    cfg, params = model.cfg, model.params
    ts = transcoder_set(transcoders, cfg)
    _check_options(cfg, max_n_logits, desired_logit_prob, max_feature_nodes, batch_size)
    if pad_to is not None and (not isinstance(pad_to, int | np.integer) or pad_to < 1):
        raise InputError(f"pad_to={pad_to!r} must be a positive int (the bucket step prompts are padded to), "
                         "or None for no padding.")
    tokens = prompt_tokens(model, prompt)
    n_pos, L = len(tokens), cfg.n_layers
    zp = 1 if zero_positions is None else zero_positions
    if not isinstance(zp, int | np.integer) or not 0 <= zp < n_pos:
        raise InputError(f"zero_positions={zero_positions!r} must be an int in [0, n_pos={n_pos}): how many "
                         "leading positions (the BOS, a chat prefix) have their features and errors zeroed.")
    P = bucket_length(n_pos, pad_to, cfg.n_ctx)
    padded = np.concatenate([tokens, np.repeat(tokens[-1:], P - n_pos)])  # causal: any token will do
    resid0, clean, acts = _clean_run(params, cfg, ts, jnp.asarray(padded, jnp.int32)[None])
    acts = np.asarray(acts).copy()
    acts[:, :zp] = 0
    acts[:, n_pos:] = 0  # the padding has no feature nodes
    recon = np.asarray(reconstruct(ts, jnp.asarray(acts), clean.inputs))
    errors = (np.asarray(clean.mlp_out) - recon)[:, :n_pos]
    errors[:, :zp] = 0
    active = np.stack(np.nonzero(acts), axis=1).astype(np.int64)  # layer-major, then pos, then feature
    values = acts[tuple(active.T)].astype(np.float32)
    logit_ids, probs, logit_vecs = select_logits(np.asarray(clean.logits)[0, n_pos - 1],
                                                 np.asarray(params["unembed"]["W_U"]), max_n_logits,
                                                 desired_logit_prob)
    n_active, n_logits = len(active), len(logit_ids)
    S = n_active if pad_to is None else _pow2(max(n_active, 1))  # error sources from S, tokens from S + L*P
    dec = numpy_decoder_rows(ts, active, values)
    enc_vecs = np.asarray(ts.W_enc)[active[:, 0], :, active[:, 2]] if n_active else np.zeros((0, cfg.d_model))
    tok_vecs = np.zeros((P, cfg.d_model), np.float32)
    tok_vecs[:n_pos] = np.asarray(params["embed"]["W_E"])[tokens]
    budget = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    # padded: the blocks below layer l are at most l * P (a site's first block, with its error row) + R (the
    # decoder rows' own), R a power of two: a count per depth that every prompt of the bucket shares
    R = _pow2(max(-(-len(dec[0]) // SITE_BLOCK), 1))
    caps = None if pad_to is None else np.arange(L + 1) * P + R
    arrays, below = _site_layout(_with_error_rows(dec, errors, S, P), L, P, S + L * P,
                                 n_blocks=None if caps is None else int(caps[-1]))
    below = below if caps is None else caps  # _decoder_dots masks the blocks above the depth
    bs = batch_size or default_batch_size(cfg, P, arrays[0].shape[0] * SITE_BLOCK, ts.d_sae)
    chunk = min(bs, CHUNK_ROWS, _pow2(max(max_n_logits, budget, 1)))
    frozen = _frozen_run(params, cfg, ts, resid0)
    cols = np.concatenate([np.arange(n_active), S + np.arange(L)[:, None] * P + np.arange(n_pos),
                           S + L * P + np.arange(n_pos)], axis=None)
    rows = functools.partial(_rows, params, cfg, ts, resid0, frozen, (arrays, below), tok_vecs, S, chunk,
                             cols, n_pos - 1)

    logit_offset = n_active + (L + 1) * n_pos
    edges = np.zeros((budget + n_logits, logit_offset + n_logits), np.float32)
    row_node = np.zeros(budget + n_logits, np.int64)
    rows(np.full(n_logits, L), np.full(n_logits, n_pos - 1), logit_vecs, edges[:n_logits, :logit_offset])
    row_node[:n_logits] = logit_offset + np.arange(n_logits)  # logit rows first
    st, visited = n_logits, np.zeros(n_active, bool)
    while st - n_logits < budget:
        if budget == n_active:
            pending = np.arange(n_active)
        else:
            infl = partial_influences(edges[:st], probs, row_node[:st])
            rank = np.argsort(-infl[:n_active], kind="stable")
            pending = rank[~visited[rank]][:min(UPDATE_INTERVAL * bs, budget - (st - n_logits))]
        rows(active[pending, 0], active[pending, 1], enc_vecs[pending],
             edges[st:st + len(pending), :logit_offset])
        row_node[st:st + len(pending)] = pending
        visited[pending] = True
        st += len(pending)

    selected = np.nonzero(visited)[0]
    if budget < n_active:
        edges = edges[:, np.concatenate([selected, np.arange(n_active, logit_offset + n_logits)])]
    edges = edges[np.argsort(row_node, kind="stable")]
    n_nodes = edges.shape[1]
    adjacency = np.zeros((n_nodes, n_nodes), np.float32)
    adjacency[:budget] = edges[:budget]
    adjacency[n_nodes - n_logits:] = edges[budget:]
    tok = model.tokenizer
    decode = (lambda ids: tok.decode([int(i) for i in ids])) if tok is not None else (
        lambda ids: " ".join(str(int(i)) for i in ids))
    return AttributionGraph(
        prompt=decode(tokens), tokens=tokens,
        token_strings=[decode([t]) for t in tokens], active_features=active, activation_values=values,
        selected_features=selected.astype(np.int64), adjacency=adjacency, logit_tokens=logit_ids,
        logit_probabilities=probs, logit_strings=[decode([t]) for t in logit_ids], n_layers=L,
        vocab_size=cfg.d_vocab, model_name=str(getattr(model, "model_name", "") or ""),
        transcoder_name=ts.name, feature_input_hook=ts.input_hook, feature_output_hook=ts.output_hook,
        zero_positions=int(zp))


def prompt_tokens(model, prompt) -> np.ndarray:
    """[n_pos] token ids of `prompt` as circuit-tracer's `ensure_tokenized` makes them (see `attribute`).

    Raises:
        InputError: a string without a tokenizer, ids that are not one sequence, an empty prompt, or one
            longer than the model's context.
    """
    tok = model.tokenizer
    if isinstance(prompt, str):
        if tok is None:
            raise InputError("This model has no tokenizer, so the prompt must be token ids [pos]; found a "
                             "string. Pass ids, or give the model a tokenizer.")
        ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    else:
        arr = np.asarray(prompt)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"A prompt of token ids must be one integer sequence [pos] or [1 pos]; found "
                             f"shape {arr.shape}, dtype {arr.dtype}.")
        ids = [int(i) for i in arr]
    if tok is not None and (not ids or ids[0] not in tok.all_special_ids):
        candidates = [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, *tok.all_special_ids]
        first = next((c for c in candidates if c is not None), None)
        if first is not None:
            ids = [first] + ids
    if not ids:
        raise InputError("The prompt is empty: it has no tokens (and the tokenizer no special token to start "
                         "it). Pass some text or ids.")
    n_ctx = model.cfg.n_ctx
    if len(ids) > n_ctx:
        raise InputError(f"The prompt has {len(ids)} tokens (with the special token prepended first), more "
                         f"than the model's context n_ctx={n_ctx}. Shorten it to at most {n_ctx} tokens.")
    return np.asarray(ids, np.int64)


def select_logits(last_logits: np.ndarray, W_U: np.ndarray, max_n_logits: int, desired_logit_prob: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """circuit-tracer's salient logits: the top `max_n_logits` by probability, cut to the smallest prefix
    whose cumulative probability reaches `desired_logit_prob`. Returns (ids [n], probabilities [n], demeaned
    unembedding columns [n d_model])."""
    x = last_logits.astype(np.float64)
    p = np.exp(x - x.max())
    p = (p / p.sum()).astype(np.float32)
    top = np.argsort(-p, kind="stable")[:max_n_logits]
    cut = int(np.searchsorted(np.cumsum(p[top]), desired_logit_prob)) + 1
    ids = top[:cut]
    W = W_U.astype(np.float32)
    return ids.astype(np.int64), p[ids], (W[:, ids] - W.mean(-1, keepdims=True)).T


def partial_influences(edges: np.ndarray, logit_probs: np.ndarray, row_node: np.ndarray,
                       max_iter: int = 128) -> np.ndarray:
    """Every node's influence on the logits through the rows computed so far (circuit-tracer's
    `compute_partial_influences`): |A| row-normalised, influence = sum_k p_logits N^k, by power iteration.

    Args:
        edges: [n_rows, n_nodes] the rows computed so far (logit rows first).
        logit_probs: [n_logits] the logits' probabilities (the last n_logits nodes).
        row_node: [n_rows] the node of each row.
    """
    N = np.abs(edges)
    N /= np.maximum(N.sum(1, keepdims=True), 1e-8)
    infl = np.zeros(edges.shape[1], np.float32)
    prod = np.zeros(edges.shape[1], np.float32)
    prod[len(prod) - len(logit_probs):] = logit_probs
    for _ in range(max_iter):
        prod = prod[row_node] @ N
        if not prod.any():
            return infl
        infl += prod
    raise JaxlensError(f"Partial influences did not vanish after {max_iter} steps: the rows computed do not "
                       "form an acyclic graph (a bug: please report it).")


def bucket_length(n_pos: int, pad_to: int | None, n_ctx: int | None = None) -> int:
    """The length a prompt of `n_pos` tokens is padded to: the smallest power of two >= n_pos below `pad_to`,
    else the smallest multiple of `pad_to` >= n_pos (never above n_ctx; n_pos itself if pad_to is None).

        bucket_length(5, 16) == 8; bucket_length(16, 16) == 16; bucket_length(17, 16) == 32
    """
    if pad_to is None:
        return n_pos
    n = min(_pow2(n_pos), pad_to) if n_pos < pad_to else -(-n_pos // pad_to) * pad_to
    return max(n_pos, min(n, n_ctx or n))


def default_batch_size(cfg, n_pos: int, n_decoder_rows: int, d_sae: int, budget: int = 2**30) -> int:
    """Rows per compiled call so that one call's backward passes fit `budget` bytes (at least 1, at most 512,
    circuit-tracer's default)."""
    per_row = 4 * (n_decoder_rows + cfg.n_layers * n_pos * (  # decoder dots: _site_layout
        8 * cfg.d_model + 2 * cfg.n_heads * n_pos + 3 * cfg.d_mlp + d_sae))
    return int(np.clip(budget // max(per_row, 1), 1, 512))


# -- helpers -------------------------------------------------------------------------------------------------
def _check_options(cfg, max_n_logits, desired_logit_prob, max_feature_nodes, batch_size) -> None:
    if not isinstance(max_n_logits, int | np.integer) or not 1 <= max_n_logits <= cfg.d_vocab:
        raise InputError(f"max_n_logits={max_n_logits!r} must be an int in [1, d_vocab={cfg.d_vocab}].")
    if not 0 < float(desired_logit_prob) <= 1:
        raise InputError(f"desired_logit_prob={desired_logit_prob!r} must be a probability in (0, 1].")
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int | np.integer)
                                          or max_feature_nodes < 1):
        raise InputError(
            f"max_feature_nodes={max_feature_nodes!r}: the node budget counts feature nodes only (the "
            "error, token and logit nodes, up to max_n_logits of them, are always in the graph), so it must "
            "be an int >= 1, or None for every active feature.")
    if batch_size is not None and (not isinstance(batch_size, int | np.integer) or batch_size < 1):
        raise InputError(f"batch_size={batch_size!r} must be a positive int (rows per batch), or None.")


def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("cfg",))
def _clean_run(params, cfg, ts: TranscoderSet, tokens):
    resid0 = embedding(params, cfg, tokens)
    out = frozen_forward(params, cfg, ts, resid0, zero_sources(cfg, tokens.shape[1]))
    return resid0, out, encode(ts, out.inputs)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _frozen_run(params, cfg, ts: TranscoderSet, resid0):
    """The clean run's frozen activations (`frozen_forward`'s keep_frozen)."""
    out = frozen_forward(params, cfg, ts, resid0, zero_sources(cfg, resid0.shape[1]), keep_frozen=True)
    return out.frozen


def _depths(n_layers: int) -> np.ndarray:
    """The layer counts a chunk of rows runs through: n_layers times 1/8, 1/4, 1/2, 3/4 (rounded up) and 1."""
    return np.unique([-(-n_layers * k // 8) for k in (1, 2, 4, 6, 8)])


def _rows(params, cfg, ts, resid0, frozen, layout, tok_vecs, n_active: int, chunk: int, cols, last: int,
          layers, positions, vecs, out) -> None:
    """Fill `out` [n, len(cols)] with the rows for targets at (layer, pos) with cotangent vectors (layer
    n_layers: the final normalised residual, at position `last`): sorted by layer, `chunk` rows per compiled
    call (the last one padded), each call through the layers its highest target reads, rounded up to one of
    `_depths`. `layout` is `_site_layout`'s (arrays, blocks up to each layer); `n_active` is the first error
    source (`_with_error_rows`); `cols` picks the graph's sources out of the program's."""
    L = cfg.n_layers
    depths = _depths(L)
    (site_arrays, blocks_below), order = layout, np.argsort(layers, kind="stable")
    tok_vecs = jnp.asarray(tok_vecs, jnp.float32)
    for i in range(0, len(order), chunk):
        idx = order[i:i + chunk]
        depth = int(depths[np.searchsorted(depths, min(int(layers[idx].max()) + 1, L))])
        part = [_padded(np.asarray(a)[idx], chunk) for a in (layers, positions, vecs)]
        got = _rows_jit(params, cfg, ts, resid0, frozen, site_arrays, tok_vecs,
                        jnp.asarray(part[0], jnp.int32), jnp.asarray(part[1], jnp.int32),
                        jnp.asarray(part[2], jnp.float32), n_active, depth, int(blocks_below[depth]),
                        jnp.asarray(last, jnp.int32))
        out[idx] = np.asarray(got)[:len(idx), cols]


def _padded(a: np.ndarray, chunk: int) -> np.ndarray:
    """a padded to `chunk` rows by repeating its first."""
    return np.concatenate([a, np.repeat(a[:1], chunk - len(a), axis=0)])


@functools.partial(jax.jit, static_argnames=("cfg", "n_active", "depth", "n_blocks"))
def _rows_jit(params, cfg, ts, resid0, frozen, site_arrays, tok_vecs, layers, positions, vecs, n_active,
              depth, n_blocks, last=None):
    """Rows for targets below layer `depth` (or the logits, at position `last`, default the final one, if
    depth is n_layers): the vjp of the frozen forward truncated at `depth` layers, with the clean run's
    `frozen` activations as constants; columns: the sources up to n_active + n_layers * n_pos, then one per
    token position. The cotangents and gradients keep the layer axis first (batch second), as the blocks'
    scan has them."""
    L, n_pos = cfg.n_layers, resid0.shape[1]

    def targets(src: Sources):
        out = frozen_forward(params, cfg, ts, resid0, src, frozen)
        return (out.inputs, out.final) if depth == L else (out.inputs,)

    zero = zero_sources(cfg, n_pos)
    _, vjp = jax.vjp(targets, Sources(zero.embed, zero.mlp_out[:depth]))
    # one-hot cotangents [depth batch pos d] built by a select (one pass, no scatter into zeros)
    hot = ((jnp.arange(depth)[:, None, None, None] == layers[None, :, None, None])
           & (jnp.arange(n_pos)[None, None, :, None] == positions[None, :, None, None]))
    cts = (jnp.where(hot, vecs[None, :, None, :], 0.0),)
    if depth == L:  # logit rows: at the final residual's last position
        at = (jnp.arange(n_pos)[:, None, None] == (n_pos - 1 if last is None else last))
        cts += (jnp.where(at & (layers == L)[None, :, None], vecs[None], 0.0),)
    (g,) = jax.vmap(vjp, in_axes=1, out_axes=1)(cts)  # g.mlp_out [depth batch pos d], g.embed [pos batch d]
    feat_err = _decoder_dots(g.mlp_out, site_arrays, n_blocks, n_active + L * n_pos)
    tok = jnp.einsum("pbd,pd->bp", g.embed, tok_vecs)
    return jnp.concatenate([feat_err, tok], axis=1)


#: Decoder rows per block of `_site_layout`.
SITE_BLOCK = 64


def _with_error_rows(dec, errors: np.ndarray, n_active: int, n_pos: int | None = None):
    """The decoder rows (`numpy_decoder_rows`) and one row per error node (layer, pos) of `errors` [layer pos
    d_model], its source index n_active + layer * n_pos + pos (n_pos: the padded length, default the
    errors'): an error vector meets the gradient at its site as a decoder row does."""
    L, n, D = errors.shape
    layer, pos = np.divmod(np.arange(L * n), n)
    err = (errors.reshape(-1, D).astype(np.float32), layer, pos, n_active + layer * (n_pos or n) + pos)
    return tuple(np.concatenate([np.asarray(a), b]) for a, b in zip(dec, err, strict=True))


def _site_layout(dec, n_layers: int, n_pos: int, n_sources: int, width: int = SITE_BLOCK,
                 n_blocks: int | None = None):
    """The decoder rows (`numpy_decoder_rows`: vectors, output layer, position, source) in blocks of `width`
    rows that share a site (output layer, position), layer-major, so a gradient at a site meets its decoder
    rows in small matrix products rather than a gather of one gradient per row, and the blocks of the first
    k layers are a prefix.

    With `n_blocks`, zero blocks (source n_sources, site 0) are appended up to that many, so that layouts of
    similar size have the same shapes.

    Returns:
        ((vectors [n_blocks width d_model], zero-padded; each block's layer [n_blocks] and position
        [n_blocks]; each slot's source [n_blocks * width], n_sources for padding), [n_layers + 1] the number
        of blocks below each layer).
    """
    vecs, layer, pos, src = (np.asarray(a) for a in dec)
    n_sites, D = n_layers * n_pos, vecs.shape[1]
    site = (layer * n_pos + pos).astype(np.int64)
    order = np.argsort(site, kind="stable")
    counts = np.bincount(site, minlength=n_sites)
    blocks = -(-counts // width)
    first_block = np.cumsum(blocks) - blocks
    rank = np.arange(len(site)) - (np.cumsum(counts) - counts)[site[order]]  # place within its site
    slot = (first_block[site[order]] + rank // width) * width + rank % width
    n_real = int(blocks.sum())
    n_blocks = n_real if n_blocks is None else n_blocks
    if n_blocks < n_real:
        raise JaxlensError(f"_site_layout: {n_real} blocks do not fit n_blocks={n_blocks} (a bug).")
    V = np.zeros((n_blocks * width, D), np.float32)
    V[slot] = vecs[order]
    slot_src = np.full(n_blocks * width, n_sources, np.int32)
    slot_src[slot] = src[order]
    pad = np.zeros(n_blocks - n_real, np.int64)  # zero blocks at site 0
    block_site = np.concatenate([np.repeat(np.arange(n_sites), blocks), pad])
    below = np.concatenate([[0], np.cumsum(blocks.reshape(n_layers, n_pos).sum(1))])
    arrays = (jnp.asarray(V.reshape(n_blocks, width, D)), jnp.asarray(block_site // n_pos, jnp.int32),
              jnp.asarray(block_site % n_pos, jnp.int32), jnp.asarray(slot_src))
    return arrays, below


def _decoder_dots(grads, site_arrays, n_blocks: int, n_sources: int):
    """[batch n_sources]: each row's gradient at every decoder row's site dotted with that decoder vector,
    summed per source (a cross-layer feature writes several layers).

    Args:
        grads: [layer batch pos d_model] gradients at the sites of the first layers.
        site_arrays: `_site_layout`'s arrays (over every layer).
        n_blocks: how many blocks to visit: at least those in the layers of `grads` (`_site_layout`'s count
            below that layer); blocks above them count zero.
        n_sources: the number of sources (active features).
    """
    V, block_layer, block_pos, slot_src = site_arrays
    g = grads[block_layer[:n_blocks], :, block_pos[:n_blocks]]  # [block batch d_model], above: clamped
    g = jnp.where((block_layer[:n_blocks] < grads.shape[0])[:, None, None], g, 0.0)
    dots = jnp.einsum("kbd,kwd->kwb", g, V[:n_blocks]).reshape(-1, grads.shape[1])
    per_source = jax.ops.segment_sum(dots, slot_src[:dots.shape[0]], num_segments=n_sources + 1)
    return per_source[:n_sources].T
