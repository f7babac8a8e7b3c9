"""jaxlens's docstring dialect -> reStructuredText, before napoleon reads it.

jaxlens's docstrings are written to read as plain text in help(): Google sections, `code` in single
backticks, shapes such as [*batch pos] and |x| with no markup meaning, and "the one example to read" as an
indented block. Before napoleon reads them, stray * and | are escaped and an indented block that follows a
blank line (or a line ending in ':') outside a Google section becomes a literal block; a hanging indent that
continues a paragraph is joined to it.
"""

import re

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Keyword Args|Returns?|Raises|Yields?|Attributes|"
                      r"Examples?|Notes?|Warnings?|See Also|Todo|References|Methods|Other Parameters):\s*$")
_BULLET = re.compile(r"^([-*+]|\d+\.) ")
_CODE_SPAN = re.compile(r"(``.+?``|`[^`]+`)")


def _escape(line: str) -> str:
    parts = _CODE_SPAN.split(line)
    out = []
    for i, p in enumerate(parts):
        if i % 2 == 0:
            out.append(p.replace("*", r"\*").replace("|", r"\|"))
            continue
        before, after = parts[i - 1], parts[i + 1] if i + 1 < len(parts) else ""
        # `__init__`s: reST ends inline markup only before space or punctuation; "\ " is an empty separator
        out.append(("\\ " if before[-1:].isalnum() else "") + p + ("\\ " if after[:1].isalnum() else ""))
    return "".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def plain_to_rest(lines: list[str]) -> list[str]:
    """jaxlens's plain-text docstring lines as reStructuredText that napoleon then reads."""
    out: list[str] = []
    in_section = in_literal = in_doctest = in_bullet = False
    for line in lines:
        blank = not line.strip()
        if in_doctest:
            in_doctest = not blank
            out.append(line)
            continue
        if in_literal:
            if blank or _indent(line) > 0:
                out.append(line)
                continue
            in_literal = False
        if not blank and _indent(line) == 0:
            in_section = bool(_SECTION.match(line))
            in_bullet = bool(_BULLET.match(line))
        if line.lstrip().startswith(">>>"):
            in_doctest = True
            out.append(line)
            continue
        if not blank and _indent(line) > 0 and not in_section:
            prev = next((p for p in reversed(out) if p.strip()), "")
            after_blank = bool(out) and not out[-1].strip()
            if prev.rstrip().endswith("::"):
                in_literal = True
                out.append(line)
                continue
            if after_blank or prev.rstrip().endswith(":"):
                in_literal = True
                out += ["::", "", line] if after_blank else ["", "::", "", line]
                continue
            if prev and _indent(prev) == 0 and not in_bullet:  # a hanging indent: the paragraph goes on
                out.append(_escape(line.lstrip()))
                continue
        out.append(line if blank else _escape(line))
    return out


def _to_rest(app, what, name, obj, options, lines):
    lines[:] = plain_to_rest(lines)
    if what == "data" and type(obj).__doc__ and lines and lines[0].strip() == \
            _escape(type(obj).__doc__.strip().splitlines()[0].strip()):
        lines[:] = []  # a constant without a docstring of its own: not its type's


# Napoleon reads a property's first line "type: description" as an attribute type; jaxlens's properties are
# prose ("JAX's default backend: ..."), so their docstrings are kept as written.
_RAW: dict[tuple[str, str], list[str]] = {}


def _keep_raw(app, what, name, obj, options, lines):
    if what in ("attribute", "data", "property"):
        _RAW[(what, name)] = list(lines)


def _restore_raw(app, what, name, obj, options, lines):
    if (what, name) in _RAW:
        lines[:] = _RAW.pop((what, name))


def _signature(app, what, name, obj, options, signature, return_annotation):
    """`jaxlib._jax.Array` (where jax.Array is defined) is written `jax.Array`, as users type it."""
    def tidy(text):
        return text and text.replace("jax.jaxlib._jax.", "jax.").replace("jaxlib._jax.", "jax.")
    return tidy(signature), tidy(return_annotation)


def setup(app):
    app.connect("autodoc-process-signature", _signature)
    app.connect("autodoc-process-docstring", _to_rest, priority=300)  # napoleon runs at 500
    app.connect("autodoc-process-docstring", _keep_raw, priority=400)
    app.connect("autodoc-process-docstring", _restore_raw, priority=900)
    return {"parallel_read_safe": True, "version": "1"}
