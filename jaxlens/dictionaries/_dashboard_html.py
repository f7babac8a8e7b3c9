"""The HTML of `dashboard.dashboard_html`: one page with everything inline (CSS, SVG histograms, a small
script that shades each token by its activation relative to the feature's maximum). Nothing is fetched."""

import html

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
nav a { margin-right: .8em; }
section.feature { border-top: 2px solid #ccc; margin-top: 1.2em; padding-top: .6em; }
.row { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
table.logits { border-collapse: collapse; font-size: 13px; }
table.logits td { padding: 1px 6px; font-family: monospace; white-space: pre; }
table.logits.pos td.v { color: #2b8a3e; } table.logits.neg td.v { color: #c92a2a; }
.ctx { font-family: monospace; font-size: 13px; margin: 3px 0; white-space: pre; }
.ctx .val { display: inline-block; width: 5.5em; color: #666; }
span.tok { border-radius: 2px; padding: 1px 0; }
span.tok.top { outline: 1px solid #e8590c; }
svg rect.bar { fill: #e8590c; }
"""

SCRIPT = """
document.querySelectorAll("section.feature").forEach(function (sec) {
  var max = parseFloat(sec.dataset.max);
  sec.querySelectorAll("span.tok").forEach(function (t) {
    var a = parseFloat(t.dataset.act);
    var x = max > 0 ? Math.max(0, Math.min(1, a / max)) : 0;
    t.style.backgroundColor = "rgba(232, 89, 12, " + x.toFixed(3) + ")";
    t.title = "activation " + a.toPrecision(4);
  });
});
"""


def page(boards, title: str) -> str:
    """The whole page for a list of FeatureDashboards."""
    nav = " ".join(f'<a href="#f-{b.feature}">feature {b.feature}</a>' for b in boards)
    body = "\n".join(_section(b) for b in boards)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{_esc(title)}</h1><nav>{nav}</nav>\n{body}\n"
            f"<script>{SCRIPT}</script></body></html>\n")


def _section(b) -> str:
    stats = (f"fires on <b>{100 * b.frequency:.3g}%</b> of tokens &middot; max activation "
             f"<b>{b.max_act:.4g}</b> &middot; mean when active <b>{b.mean_act:.4g}</b>")
    contexts = "\n".join(_context(c) for c in b.contexts) or "<p>Never active on this corpus.</p>"
    return (f'<section class="feature" id="f-{b.feature}" data-feature="{b.feature}" '
            f'data-max="{b.max_act!r}"><h2>Feature {b.feature}</h2><p class="stats">{stats}</p>'
            f'<div class="row"><div><h3>Activation histogram</h3>{_histogram(*b.histogram)}</div>'
            f'<div><h3>Promoted logits</h3>{_logits(b.promoted, "pos")}</div>'
            f'<div><h3>Suppressed logits</h3>{_logits(b.suppressed, "neg")}</div></div>'
            f"<h3>Top activations</h3>\n{contexts}</section>")


def _context(c) -> str:
    spans = "".join(
        f'<span class="tok{" top" if i == c.centre else ""}" data-act="{a!r}">{_esc(_visible(s))}</span>'
        for i, (s, a) in enumerate(zip(c.strings, c.acts, strict=True)))
    return (f'<div class="ctx" data-seq="{c.seq}" data-pos="{c.pos}"><span class="val">{c.value:.3f}</span>'
            f"{spans}</div>")


def _logits(rows, kind: str) -> str:
    cells = "".join(f'<tr><td class="t">{_esc(_visible(s))}</td><td class="v">{v:+.3f}</td></tr>'
                    for _, s, v in rows)
    return f'<table class="logits {kind}">{cells}</table>'


def _histogram(counts, edges, width: int = 320, height: int = 120) -> str:
    n = len(counts)
    top = max(int(max(counts, default=0)), 1)
    bar = width / max(n, 1)
    rects = "".join(
        f'<rect class="bar" x="{i * bar:.2f}" y="{height - height * c / top:.2f}" width="{bar * 0.9:.2f}" '
        f'height="{height * c / top:.2f}"><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {int(c)}</title>'
        "</rect>"
        for i, c in enumerate(counts))
    axis = (f'<text x="0" y="{height + 14}" font-size="11">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>')
    return (f'<svg width="{width}" height="{height + 18}" '
            f'role="img" aria-label="activation histogram">{rects}{axis}</svg>')


def _visible(text: str) -> str:
    """Whitespace a reader can see: newlines and tabs as symbols."""
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5")


def _esc(text: str) -> str:
    return html.escape(text, quote=True)
