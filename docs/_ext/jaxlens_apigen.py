"""Writes one API page per public package before Sphinx reads the sources.

A package's public names are its `__all__` when it has one; otherwise its explicit re-exports
(`from m import X as X`, `import m as m`, the PEP 484 convention jaxlens's `__init__` files follow) and the
public names it defines itself (`def`, `class`, top-level assignments not starting with `_`). A re-exported
module gets a page of its own. An object exported from several places is documented once, at the first
package in `jaxlens_api_packages` (conf.py) that exports it; the others link to it.
"""

import ast
import importlib
import inspect
import shutil
import sys
import types
from pathlib import Path


def exported_names(module: types.ModuleType) -> list[str]:
    """The public names of `module`, in source order."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    tree = ast.parse(Path(inspect.getsourcefile(module)).read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names += [a.asname for a in node.names if a.asname and a.asname == a.name.split(".")[-1]
                      and not a.asname.startswith("_")]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    public = [n for n in dict.fromkeys(names) if not n.startswith("_") and hasattr(module, n)]
    return [n for n in public if not _is_foreign_module(getattr(module, n))]


# _key(object) -> the qualified name of the page entry that documents it (filled by write_pages)
DOCUMENTED: dict = {}


def _key(obj, qualname: str):
    """Functions and classes are the same object wherever they are exported; a constant (a small int, an
    interned string) may share its identity with an unrelated one, so each export of it is its own entry."""
    return id(obj) if callable(obj) else qualname


def _is_foreign_module(obj) -> bool:
    return isinstance(obj, types.ModuleType) and not obj.__name__.startswith("jaxlens")


def _canonical_names(module: types.ModuleType, exports: list[str]) -> dict:
    """_key(object) -> the export name its entry is written under: its own `__name__` when the module exports
    it under that name too (PatchResult, not its alias PatchingResult), else the first name it appears as."""
    names: dict = {}
    for export in exports:
        obj, key = getattr(module, export), _key(getattr(module, export), f"{module.__name__}.{export}")
        if key not in names or getattr(obj, "__name__", None) == export:
            names[key] = export
    return names


def _own_bases(cls: type) -> bool:
    """True when every base class (bar object) is jaxlens's, so inherited members are part of its API."""
    return all(b is object or b.__module__.startswith("jaxlens") for b in cls.__mro__[1:])


def _directive(qualname: str, obj) -> list[str]:
    if isinstance(obj, type):
        opts = ["   :members:", "   :show-inheritance:"]
        if _own_bases(obj):
            opts.append("   :inherited-members:")
        return [f".. autoclass:: {qualname}", *opts, ""]
    if callable(obj):
        return [f".. autofunction:: {qualname}", ""]
    return [f".. autodata:: {qualname}", "   :no-value:", ""]


def write_pages(packages: list[str], outdir: Path) -> list[str]:
    """Write `<package>.rst` for every package (and every jaxlens module they re-export) into `outdir`."""
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    documented = DOCUMENTED
    documented.clear()
    queue, done = list(packages), []
    while queue:
        name = queue.pop(0)
        if name in done:
            continue
        done.append(name)
        module = importlib.import_module(name)
        lines = [name, "=" * len(name), "", f".. automodule:: {name}", "   :no-members:", "",
                 f".. currentmodule:: {name}", ""]
        body, aliases = [], []
        exports = exported_names(module)
        canonical = _canonical_names(module, exports)
        for export in exports:
            obj = getattr(module, export)
            if isinstance(obj, types.ModuleType):
                queue.append(obj.__name__)
                aliases.append(f"* ``{export}``: the module :doc:`{obj.__name__}`")
                continue
            qualname = f"{name}.{export}"
            key = _key(obj, qualname)
            if key in documented or canonical[key] != export:
                target = documented.get(key, f"{name}.{canonical[key]}")
                aliases.append(f"* ``{export}``: see :py:obj:`{target}`")
                continue
            documented[key] = qualname
            body += _directive(qualname, obj)
        if body:
            names = [line.split(":: ")[1][len(name) + 1:] for line in body if line.startswith(".. auto")]
            lines += [".. autosummary::", "", *[f"   {n}" for n in names], ""]
        if aliases:
            lines += ["Also exported here:", "", *aliases, ""]
        lines += body
        (outdir / f"{name}.rst").write_text("\n".join(lines))
    return done


def _on_builder_inited(app) -> None:
    outdir = Path(app.srcdir) / "api" / "_generated"
    pages = write_pages(list(app.config.jaxlens_api_packages), outdir)
    index = ["API reference", "=============", "",
             "Generated from the docstrings of every package listed in ``jaxlens_api_packages``"
             " (``docs/conf.py``).", "", ".. toctree::", "   :maxdepth: 1", "",
             *[f"   {p}" for p in pages], ""]
    (outdir / "index.rst").write_text("\n".join(index))


def _resolve(dotted: str):
    """The object a dotted name such as `jaxlens.patching.result.PatchResult` stands for, or None."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj = module
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _on_missing_reference(app, env, node, contnode):
    """A jaxlens name written where it is defined (`jaxlens.patching.result.PatchResult`) links to where it
    is documented (`jaxlens.patching.PatchResult`); a jaxlens name that exists but is private (a base class in
    `jaxlens._module_view`, say) is shown as plain text. Anything else stays a strict-mode error."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py":
        return None
    if "." not in target:  # a bare name (`Raises: InputError: ...`): the one documented object of that name
        matches = [q for q in DOCUMENTED.values() if q.rsplit(".", 1)[-1] == target]
        if len(matches) == 1:
            py = env.get_domain("py")
            return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], matches[0], node,
                                   contnode)
        defined = any(isinstance(getattr(m, target, None), type) for n, m in list(sys.modules.items())
                      if n.startswith("jaxlens") and m is not None)
        return contnode if defined else None  # a jaxlens class not exported: plain text
    if not target.startswith("jaxlens."):
        return None
    obj = _resolve(target)
    if obj is None:
        return None
    documented = DOCUMENTED.get(id(obj)) if callable(obj) else None
    if documented is None:
        return contnode
    py = env.get_domain("py")
    return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], documented, node, contnode)


def setup(app):
    app.add_config_value("jaxlens_api_packages", [], "env")
    app.connect("builder-inited", _on_builder_inited)
    app.connect("missing-reference", _on_missing_reference)
    return {"parallel_read_safe": True, "version": "1"}
