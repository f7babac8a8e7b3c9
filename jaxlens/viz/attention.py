"""Attention patterns of chosen heads: a PNG grid (matplotlib) and a self-contained interactive HTML page.

    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    heads = [(5, 1), (7, 3)]
    patterns = np.stack([cache["pattern", l][0, h] for l, h in heads])          # [head query_pos key_pos]
    fig = attention_patterns_figure(patterns, model.to_str_tokens(tokens[0]), [f"L{l}H{h}" for l, h in heads])
    Path("heads.html").write_text(attention_html(patterns, str_tokens, labels))

The HTML page needs nothing from the network: data, style and script are inline. Hovering a token shows where
it attends (or, switched, which tokens attend to it); a menu chooses the head; the whole pattern is drawn too.
"""

import html
import json
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from matplotlib.figure import Figure

from jaxlens.errors import InputError
from jaxlens.viz._common import ArrayLike, as_numpy, check_labels, new_figure, thin_ticks, token_labels


def attention_patterns_figure(
    patterns: Float[ArrayLike, "head query_pos key_pos"],
    tokens: Sequence[str],
    head_labels: Sequence[str] | None = None,
    *,
    title: str = "Attention patterns",
    ncols: int = 3,
    max_ticks: int = 40,
) -> Figure:
    """One query x key panel per chosen head (rows attend to columns), sharing a 0-1 colour scale.

    Args:
        patterns: attention probabilities of the chosen heads for one prompt [head query_pos key_pos].
        tokens: the prompt's string tokens, one per position.
        head_labels: a label per head (e.g. "L5H1"); default "head 0", "head 1", ...
        title: figure title.
        ncols: panels per row.
        max_ticks: label at most this many tokens per axis (every k-th one on long prompts).

    Returns:
        A `Figure` with one axes per head followed by one colour-bar axes.

    Raises:
        InputError: patterns not 3-D, not square in (query_pos, key_pos), or labels of the wrong length.
    """
    arr = _check_patterns(patterns)
    n_heads, n_pos, _ = arr.shape
    labels = check_labels(token_labels(tokens), n_pos, "tokens")
    heads = check_labels(head_labels, n_heads, "head_labels", "head ")
    ncols = max(1, min(ncols, n_heads))
    nrows = -(-n_heads // ncols)
    side = 1.6 + 0.16 * min(n_pos, max_ticks)
    fig = new_figure(0.8 + ncols * side, 0.6 + nrows * side)
    grid = fig.add_gridspec(nrows, ncols)
    ticks = thin_ticks(n_pos, max_ticks)
    image = None
    for h in range(n_heads):
        ax = fig.add_subplot(grid[h // ncols, h % ncols])
        masked = np.where(np.tril(np.ones((n_pos, n_pos), bool)), arr[h], np.nan)
        image = ax.imshow(masked, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(heads[h], fontsize=10)
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query (attending)", fontsize=8)
    fig.colorbar(image, ax=fig.axes, label="attention probability", shrink=0.8)
    fig.suptitle(title)
    return fig


def attention_html(
    patterns: Float[ArrayLike, "head query_pos key_pos"],
    tokens: Sequence[str],
    head_labels: Sequence[str] | None = None,
    *,
    title: str = "Attention patterns",
    description: str = "",
    decimals: int = 4,
) -> str:
    """A standalone HTML page to explore attention patterns: hover a token, choose the head.

    Args:
        patterns: attention probabilities of the chosen heads for one prompt [head query_pos key_pos].
        tokens: the prompt's string tokens, one per position.
        head_labels: a label per head (e.g. "L5H1"); default "head 0", "head 1", ...
        title: page title; description: a paragraph shown under it (plain text, escaped).
        decimals: rounding of the embedded probabilities (keeps the page small).

    Returns:
        The page as a string: no external scripts, styles or fonts, the data embedded as JSON.

    Raises:
        InputError: patterns not 3-D or not square, or labels of the wrong length.
    """
    arr = _check_patterns(patterns)
    n_heads, n_pos, _ = arr.shape
    check_labels(tokens, n_pos, "tokens")
    heads = check_labels(head_labels, n_heads, "head_labels", "head ")
    data = {"tokens": [str(t) for t in tokens], "heads": heads,
            "patterns": np.round(np.tril(arr), decimals).tolist()}
    # "<", ">" and "&" as JSON escapes: no token can close the data block or open a comment in it
    payload = json.dumps(data, ensure_ascii=True)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (_PAGE.replace("__TITLE__", html.escape(title))
            .replace("__DESCRIPTION__", html.escape(description))
            .replace("__STYLE__", _STYLE).replace("__SCRIPT__", _SCRIPT).replace("__DATA__", payload))


def _check_patterns(patterns) -> np.ndarray:
    arr = as_numpy(patterns, 3, "patterns", "head query_pos key_pos")
    if arr.shape[1] != arr.shape[2]:
        raise InputError(
            f"patterns must be square over (query_pos, key_pos); found shape {arr.shape}. Pass one prompt's "
            "pattern per head, e.g. cache['pattern', layer][batch_index, head]."
        )
    return arr


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<h1>__TITLE__</h1>
<p class="desc">__DESCRIPTION__</p>
<div class="controls">
  <label>Head <select id="head"></select></label>
  <label><input type="checkbox" id="reverse"> show which tokens attend <em>to</em> the hovered token</label>
</div>
<p class="hint">Hover a token (or a cell of the grid); click to pin, click again to release.</p>
<div id="tokens" class="tokens"></div>
<div id="info" class="info">&nbsp;</div>
<canvas id="grid" width="480" height="480"></canvas>
<script type="application/json" id="attention-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
h1 { font-size: 1.3em; } .desc { color: #444; } .hint { color: #777; font-size: 0.9em; }
.controls label { margin-right: 1.5em; }
.tokens { line-height: 2.1em; margin: 0.8em 0; font-family: ui-monospace, monospace; }
.tok { padding: 0.15em 0.1em; margin: 0 1px; border: 1px solid #ddd; border-radius: 3px; cursor: pointer;
       white-space: pre; }
.tok.focus { outline: 2px solid #d62728; }
.info { font-family: ui-monospace, monospace; min-height: 1.4em; margin-bottom: 0.6em; }
canvas { border: 1px solid #ccc; image-rendering: pixelated; }
"""

_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById("attention-data").textContent);
  const n = data.tokens.length;
  const select = document.getElementById("head"), reverse = document.getElementById("reverse");
  const box = document.getElementById("tokens"), info = document.getElementById("info");
  const canvas = document.getElementById("grid"), ctx = canvas.getContext("2d");
  let head = 0, focus = null, pinned = false;
  const show = (t) => JSON.stringify(t);
  data.heads.forEach((h, i) => { const o = document.createElement("option"); o.value = i; o.textContent = h;
                                 select.appendChild(o); });
  const spans = data.tokens.map((t, i) => {
    const s = document.createElement("span"); s.className = "tok"; s.textContent = t.replace(/\n/g, "\\n");
    s.title = i + ": " + show(t);
    s.addEventListener("mouseenter", () => { if (!pinned) setFocus(i); });
    s.addEventListener("click", () => { pinned = !(pinned && focus === i); setFocus(i); });
    box.appendChild(s); return s; });
  function weights(i) {
    const p = data.patterns[head];
    return reverse.checked ? p.map((row) => row[i]) : p[i];
  }
  function setFocus(i) {
    focus = i;
    const w = weights(i), mx = Math.max(1e-9, ...w);
    spans.forEach((s, j) => {
      s.style.background = "rgba(31, 119, 180, " + (w[j] / mx).toFixed(3) + ")";
      s.classList.toggle("focus", j === i); });
    let best = 0; w.forEach((v, j) => { if (v > w[best]) best = j; });
    info.textContent = data.heads[head] + ": " + i + " " + show(data.tokens[i]) +
      (reverse.checked ? " is attended most by " : " attends most to ") + best + " " +
      show(data.tokens[best]) + " (" + w[best].toFixed(3) + ")";
    draw();
  }
  function draw() {
    const p = data.patterns[head], c = canvas.width / n;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    for (let q = 0; q < n; q++) for (let k = 0; k <= q; k++) {
      const v = p[q][k]; ctx.fillStyle = "rgba(31, 119, 180, " + v.toFixed(3) + ")";
      ctx.fillRect(k * c, q * c, Math.ceil(c), Math.ceil(c)); }
    if (focus !== null) {
      ctx.strokeStyle = "#d62728"; ctx.lineWidth = 1.5;
      if (reverse.checked) ctx.strokeRect(focus * c, 0, c, canvas.height);
      else ctx.strokeRect(0, focus * c, canvas.width, c);
    }
  }
  canvas.addEventListener("mousemove", (e) => {
    const r = canvas.getBoundingClientRect(), c = r.width / n;
    const q = Math.floor((e.clientY - r.top) / c), k = Math.floor((e.clientX - r.left) / c);
    if (q < 0 || q >= n || k < 0 || k > q) return;
    info.textContent = data.heads[head] + ": query " + q + " " + show(data.tokens[q]) + " -> key " + k + " " +
      show(data.tokens[k]) + ": " + data.patterns[head][q][k].toFixed(4);
  });
  select.addEventListener("change", () => {
    head = +select.value; setFocus(focus === null ? n - 1 : focus); });
  reverse.addEventListener("change", () => setFocus(focus === null ? n - 1 : focus));
  setFocus(n - 1);
})();
"""
