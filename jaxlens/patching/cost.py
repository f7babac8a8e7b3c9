"""Analytic cost of patched forwards: FLOPs (matmuls and attention) and activation memory.

`plan_sweep` reports these before anything compiles, and the patching benchmark compares them with XLA's own
counts. FLOPs count the matrix products only: the attention projections (grouped-query keys and values at
their own width), QK^T and AV over every key position, the MLP (three matrices when gated), and the
unembedding of the logits the metric reads; norms, activations, the softmax and the embedding are not
counted. All figures are per batch row; a sweep multiplies by the batch.

    block_flops(cfg, window=5, n_pos=7)          # one block on 5 query positions over 7 keys
    kv_flops(cfg, window=5)                      # the keys and values of 5 positions
    forward_flops(cfg, n_pos=7)                  # a full forward with the full unembedding
"""

from jaxlens.config import Config


def block_flops(cfg: Config, window: int, n_pos: int) -> float:
    """FLOPs of one block on `window` query positions attending over `n_pos` key positions (one batch row)."""
    D, H, G, E, M = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp
    proj = D * H * E + 2 * D * G * E + H * E * D + (3 if cfg.gated_mlp else 2) * D * M
    return 2.0 * window * proj + 4.0 * window * n_pos * H * E


def kv_flops(cfg: Config, window: int) -> float:
    """FLOPs of the key and value projections of `window` positions (one batch row)."""
    return 4.0 * window * cfg.d_model * cfg.n_key_value_heads * cfg.d_head


def unembed_flops(cfg: Config, n_logits: int) -> float:
    """FLOPs of computing `n_logits` logits (positions x vocabulary entries) of one batch row."""
    return 2.0 * n_logits * cfg.d_model


def forward_flops(cfg: Config, n_pos: int) -> float:
    """FLOPs of one full forward of one batch row with the full unembedding (a naive sweep's cell)."""
    return cfg.n_layers * block_flops(cfg, n_pos, n_pos) + unembed_flops(cfg, n_pos * cfg.d_vocab)


def cell_flops(cfg: Config, kind: str, *, layer: int, window: int, n_pos: int, reuse: bool, point: bool,
               n_logits: int, last_queries: int | None = None) -> float:
    """FLOPs of one patched forward of one batch row, as the sweep's chunk functions compute it.

    Args:
        kind: where the hook is: "block", "pre" (before the blocks) or "post" (ln_final).
        layer: the patched layer (block hooks).
        window: positions computed, [n_pos - window, n_pos).
        reuse: start at the patched layer from the corrupted run (else every layer runs on every position).
        point: the patched block runs on the patched position only (`compute.ChunkSpec.point`).
        n_logits: logits the metric reads (positions x vocabulary entries).
        last_queries: the last layer runs on this many positions, plus the window's keys and values
            (`compute.ChunkSpec.last_queries`; None: on the whole window).
    """
    L = cfg.n_layers
    window_blocks = lambda n: n * block_flops(cfg, window, n_pos)  # noqa: E731
    if last_queries is not None:
        last = kv_flops(cfg, window) + block_flops(cfg, last_queries, n_pos)
        window_blocks = lambda n: (n - 1) * block_flops(cfg, window, n_pos) + last if n else 0.0  # noqa: E731
    if kind == "post":
        blocks = 0.0
    elif not reuse:
        blocks = L * block_flops(cfg, n_pos, n_pos)
    elif kind == "pre":
        blocks = window_blocks(L)
    elif point:
        blocks = block_flops(cfg, 1, n_pos) + window_blocks(L - layer - 1)
    else:
        blocks = (L - layer) * block_flops(cfg, window, n_pos)
    return blocks + unembed_flops(cfg, n_logits)


def cell_bytes_fn(cfg: Config, batch: int, n_pos: int, itemsize: int, n_logits: int):
    """Estimated peak bytes of one patched forward over a window of S positions (activations, not weights).

    n_logits: logits computed per batch row (positions x vocabulary entries the metric reads).
    """
    D, M, H, G, E = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head

    def f(S: int) -> int:
        per_tok = 8 * D + (4 if cfg.gated_mlp else 3) * M + 4 * H * E
        keys = 4 * n_pos * H * E + 2 * n_pos * G * E
        scores = 3 * H * S * n_pos * max(4 // itemsize, 1)
        elems = batch * (S * per_tok + keys + scores + 2 * n_logits)
        return int(1.5 * elems * itemsize) + 4096
    return f
