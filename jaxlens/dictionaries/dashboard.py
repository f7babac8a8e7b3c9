"""Feature dashboards: what a dictionary feature responds to and what it does, in the style of Anthropic's
"Towards monosemanticity" (Bricken et al. 2023) feature pages and SAE-Vis: the top-activating contexts of a
token corpus with each token shaded by the feature's activation, the activation histogram, the firing
frequency, and the tokens the feature's decoder direction promotes and suppresses through the unembedding.

    boards = feature_dashboards(sae, params, cfg, tokens, "blocks.15.hook_resid_post", features=[3, 71],
                                tokenizer=model.tokenizer)
    save_dashboard_html(boards, "features.html")      # one self-contained page: no CDN, no external URL
    fig = plot_feature_dashboard(boards[0])           # matplotlib: histogram and logit effects

The dictionary is anything with `encode(x) -> acts [... d_sae]` and `W_dec [d_sae d_in]` (the SAEs and
transcoders of `jaxlens.dictionaries`, SAELens's layout). Activations over the corpus are computed in
batches of sequences by one jitted program (the model up to the hook, then the encoder); the statistics are
array operations over the whole corpus.
"""

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlens import _atomic, hook_names
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.model.forward import check_tokens, forward
from jaxlens.shapes import AnyArray, Params


@dataclasses.dataclass(frozen=True)
class Context:
    """A window of the corpus around one of a feature's top activations.

    seq: the sequence's index in the corpus; pos: the position of the activation there; tokens, strings, acts:
    the window's token ids, their text and the feature's activation at each; centre: the index of `pos` in
    the window.
    """

    seq: int
    pos: int
    tokens: list[int]
    strings: list[str]
    acts: list[float]
    centre: int

    @property
    def value(self) -> float:
        return self.acts[self.centre]


@dataclasses.dataclass(frozen=True)
class FeatureDashboard:
    """Everything one feature's dashboard shows.

    frequency: fraction of corpus tokens where the feature is active (> 0). max_act / mean_act: the largest
    activation and the mean over active tokens. histogram: (counts, bin edges) of the active values.
    contexts: the top-activating contexts, strongest first. promoted / suppressed: (token id, text, logit
    effect W_dec[f] @ W_U) of the tokens whose logits the decoder direction raises / lowers most.
    """

    feature: int
    frequency: float
    max_act: float
    mean_act: float
    histogram: tuple[np.ndarray, np.ndarray]
    contexts: list[Context]
    promoted: list[tuple[int, str, float]]
    suppressed: list[tuple[int, str, float]]


def feature_activations(dictionary: Any, params: Params, cfg: Config, tokens: AnyArray, hook: str,
                        features: Sequence[int] | None = None, *, batch_size: int = 16) -> np.ndarray:
    """The dictionary's feature activations over a token corpus: [n_seq pos n_features].

    Args:
        dictionary: has `encode(x)`; an NNX module is passed to the compiled program as its split state.
        params, cfg: the model.
        tokens: [n_seq pos] token ids.
        hook: where the dictionary reads (a hook with a layer index, or a global one).
        features: feature indices to keep (default all).
        batch_size: sequences per compiled call (the last batch is padded, so one program serves all).

    Raises:
        InputError: tokens not [n_seq pos], a width that does not match the dictionary, a layer-free hook.
        UnknownHookError: a hook the model lacks.
    """
    tokens = _tokens(tokens, cfg)
    layer, _ = hook_names.parse(cfg, hook)
    if layer == "all":
        raise InputError(f"A dictionary reads one hook; {hook!r} addresses every layer. Name the layer.")
    stop = None if layer is None else int(layer) + 1
    d_in = _decoder(dictionary).shape[1]
    keep = None if features is None else jnp.asarray(_features(features, _decoder(dictionary).shape[0]))
    encode, state = _encoder(dictionary)

    @jax.jit
    def run(params, state, batch):
        _, cache = forward(params, cfg, batch, cache_names=(hook,), stop_at_layer=stop)
        x = cache[hook]
        if x.shape[-1] != d_in:
            if int(np.prod(x.shape[2:])) != d_in:
                raise InputError(f"The dictionary reads d_in={d_in}, but {hook!r} has shape {x.shape}. Use a "
                                 "dictionary trained at this hook.")
            x = x.reshape(x.shape[:2] + (d_in,))
        acts = encode(state, x)
        return (acts if keep is None else acts[..., keep]).astype(jnp.float32)

    n = tokens.shape[0]
    size = min(batch_size, n)
    out = []
    for start in range(0, n, size):
        batch = tokens[start:start + size]
        pad = size - batch.shape[0]
        if pad:
            batch = jnp.concatenate([batch, jnp.zeros((pad, batch.shape[1]), batch.dtype)])
        out.append(np.asarray(run(params, state, batch))[: size - pad])
    return np.concatenate(out)


def feature_dashboards(dictionary: Any, params: Params, cfg: Config, tokens: AnyArray, hook: str,
                       features: Sequence[int], *, tokenizer: Any = None, n_contexts: int = 8,
                       window: tuple[int, int] = (10, 4), n_logits: int = 10, bins: int = 30,
                       batch_size: int = 16, exclude_bos: bool = False) -> list[FeatureDashboard]:
    """Dashboards for `features`: top contexts, histogram, frequency and logit effects.

    Args:
        dictionary, params, cfg, tokens, hook, batch_size: as `feature_activations`.
        features: the feature indices.
        tokenizer: turns ids into text (`decode([id])`, or a callable id -> str); default "<id>".
        n_contexts: top-activating contexts per feature (only active ones are shown).
        window: tokens shown (before, after) the activation.
        n_logits: promoted and suppressed tokens per feature.
        bins: histogram bins.
        exclude_bos: leave out position 0 of every row (a corpus row starts with BOS, whose activation is
            the model's huge attention-sink vector; the activation store and `evals` leave it out too): it is
            never a top context, shows an activation of 0 in windows, and is not counted in the statistics.

    Returns:
        One FeatureDashboard per feature, in the order given.

    Raises:
        InputError: as `feature_activations`; a decoder whose width is not d_model (no unembedding applies);
            rows of one token with exclude_bos.
    """
    feats = _features(features, _decoder(dictionary).shape[0])
    acts = feature_activations(dictionary, params, cfg, tokens, hook, feats, batch_size=batch_size)
    if exclude_bos:
        if acts.shape[1] < 2:
            raise InputError(f"exclude_bos leaves out position 0, so rows need at least 2 tokens; found "
                             f"shape {tuple(np.shape(tokens))}. Pass longer rows or exclude_bos=False.")
        acts[:, 0] = 0.0
    tokens = np.asarray(tokens)
    effects = logit_effects(dictionary, params, cfg, feats)
    to_str = _to_str(tokenizer)
    flat = acts.reshape(-1, len(feats))
    n_tokens = flat.shape[0] - (acts.shape[0] if exclude_bos else 0)
    k = min(n_contexts, flat.shape[0])
    top = np.argsort(-flat, axis=0, kind="stable")[:k]  # [k n_features]: flat corpus indices
    order = np.argsort(-effects, axis=1, kind="stable")
    boards = []
    for j, f in enumerate(feats):
        col = flat[:, j]
        active = col[col > 0]
        hist = np.histogram(active, bins=bins) if active.size else (np.zeros(bins, np.int64),
                                                                    np.linspace(0.0, 1.0, bins + 1))
        contexts = [_context(tokens, acts[..., j], int(i), window, to_str) for i in top[:, j] if col[i] > 0]
        row = effects[j]
        promoted = [(int(t), to_str(int(t)), float(row[t])) for t in order[j, :n_logits]]
        suppressed = [(int(t), to_str(int(t)), float(row[t])) for t in order[j, ::-1][:n_logits]]
        boards.append(FeatureDashboard(
            feature=f, frequency=float(active.size / n_tokens), max_act=float(col.max()),
            mean_act=float(active.mean()) if active.size else 0.0, histogram=hist, contexts=contexts,
            promoted=promoted, suppressed=suppressed))
    return boards


def logit_effects(dictionary: Any, params: Params, cfg: Config,
                  features: Sequence[int] | None = None) -> np.ndarray:
    """W_dec[f] @ W_U for each feature: [n_features d_vocab], the direct effect of a unit activation on each
    logit (before the final norm's scaling, as SAE dashboards show it).

    Raises:
        InputError: a decoder whose width is not d_model.
    """
    W_dec = _decoder(dictionary)
    if W_dec.shape[1] != cfg.d_model:
        raise InputError(f"The decoder writes vectors of width {W_dec.shape[1]}; the unembedding reads "
                         f"d_model={cfg.d_model}. Logit effects need a dictionary that writes the residual "
                         "stream.")
    rows = W_dec if features is None else W_dec[np.asarray(_features(features, W_dec.shape[0]))]
    return np.asarray(rows, np.float32) @ np.asarray(params["unembed"]["W_U"], np.float32)


def dashboard_html(boards: Sequence[FeatureDashboard], title: str = "jaxlens feature dashboards") -> str:
    """One self-contained HTML page (inline CSS, SVG and script; nothing fetched) for the dashboards."""
    from jaxlens.dictionaries._dashboard_html import page

    return page(boards, title)


def save_dashboard_html(boards: Sequence[FeatureDashboard], path: str | Path,
                        title: str = "jaxlens feature dashboards") -> Path:
    """Write `dashboard_html` to `path` atomically; returns the path."""
    return _atomic.write_text(path, dashboard_html(boards, title))


def plot_feature_dashboard(board: FeatureDashboard):
    """A matplotlib Figure: the activation histogram and the promoted / suppressed logits (needs [viz])."""
    from jaxlens.viz._common import new_figure, token_label

    fig = new_figure(11.0, 3.6)
    ax_h, ax_l = fig.subplots(1, 2, width_ratios=(1.2, 1.0))
    counts, edges = board.histogram
    ax_h.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#e8590c")
    ax_h.set_xlabel("activation (active tokens)")
    ax_h.set_ylabel("tokens")
    ax_h.set_title(f"feature {board.feature}: fires on {100 * board.frequency:.3g}% of tokens")
    rows = board.promoted[::-1] + board.suppressed
    colours = ["#2b8a3e" if r[2] > 0 else "#c92a2a" for r in rows]
    ax_l.barh(range(len(rows)), [r[2] for r in rows], color=colours)
    ax_l.set_yticks(range(len(rows)), [token_label(r[1]) for r in rows], fontsize=7)
    ax_l.set_xlabel("logit effect (W_dec @ W_U)")
    ax_l.set_title("promoted / suppressed tokens")
    return fig


# -- private -------------------------------------------------------------------------------------------------


def _decoder(dictionary: Any) -> np.ndarray:
    w = getattr(dictionary, "W_dec", None)
    if w is None or not hasattr(dictionary, "encode"):
        raise InputError(f"A dashboard needs a dictionary with encode(x) and W_dec [d_sae d_in]; found "
                         f"{type(dictionary).__name__} without {'W_dec' if w is None else 'encode'}.")
    w = np.asarray(w[...] if isinstance(w, nnx.Variable) else w)
    if w.ndim != 2:
        raise InputError(f"W_dec must be [d_sae d_in]; found shape {w.shape}.")
    return w


def _encoder(dictionary: Any) -> tuple[Callable, Any]:
    """(encode(state, x), state): an NNX module travels as its split state; anything else is closed over."""
    if isinstance(dictionary, nnx.Module):
        graphdef, state = nnx.split(dictionary)
        return (lambda s, x: nnx.merge(graphdef, s).encode(x)), state
    return (lambda _, x: dictionary.encode(x)), None


def _features(features: Sequence[int], d_sae: int) -> list[int]:
    feats = [int(f) for f in np.asarray(features).reshape(-1)]
    bad = [f for f in feats if not 0 <= f < d_sae]
    if not feats or bad:
        raise InputError(f"features must be indices in [0, d_sae={d_sae}); found {list(features)}.")
    return feats


def _tokens(tokens, cfg: Config):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise InputError(f"The corpus must be token ids [n_seq pos] with at least one sequence; found shape "
                         f"{tokens.shape}.")
    return check_tokens(tokens, cfg)


def _to_str(tokenizer) -> Callable[[int], str]:
    if tokenizer is None:
        return lambda t: f"<{t}>"
    if hasattr(tokenizer, "decode"):
        return lambda t: tokenizer.decode([t])
    if callable(tokenizer):
        return lambda t: str(tokenizer(t))
    raise InputError(f"tokenizer must have decode([id]) or be a callable id -> str; found "
                     f"{type(tokenizer).__name__}.")


def _context(tokens: np.ndarray, acts: np.ndarray, flat_index: int, window: tuple[int, int],
             to_str: Callable[[int], str]) -> Context:
    seq, pos = divmod(flat_index, tokens.shape[1])
    lo, hi = max(0, pos - window[0]), min(tokens.shape[1], pos + window[1] + 1)
    ids = [int(t) for t in tokens[seq, lo:hi]]
    return Context(seq=seq, pos=pos, tokens=ids, strings=[to_str(t) for t in ids],
                   acts=[float(a) for a in acts[seq, lo:hi]], centre=pos - lo)
