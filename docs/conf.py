"""Sphinx configuration of the jaxlens documentation (see docs/README.md for why Sphinx, and how to build).

Build: `bash scripts/build_docs.sh` (strict: `sphinx-build -W --keep-going -n`) -> docs/_build/html, which
opens from disk (file://): Sphinx's search loads its index through a <script> tag, and the furo theme ships
its fonts, scripts and styles with the build (no CDN at view time).
"""

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "jaxlens"
author = "jaxlens contributors"
copyright = "jaxlens contributors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
    "jaxlens_dialect",
    "jaxlens_apigen",
]

# The API reference: one page per package, generated from what each exports (docs/_ext/jaxlens_apigen.py).
# To document a new package, add its import name here (modules it re-exports, like jaxlens.hook_names, get a
# page of their own automatically).
jaxlens_api_packages = [
    "jaxlens",
    "jaxlens.patching",
    "jaxlens.analysis",
    "jaxlens.cache",
    "jaxlens.encoder",
    "jaxlens.converters",
    "jaxlens.hub",
    "jaxlens.weight_processing",
    "jaxlens.viz",
    "jaxlens.testing",
    "jaxlens.errors",
    "jaxlens.dictionaries",
    "jaxlens.circuits",
    "jaxlens.graphs",
    "jaxlens.scale",
    "jaxlens.flax",
    "jaxlens.nnx",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
# rendered/: the executed notebooks, read through their copies in notebooks/ (_copy_notebooks below)
exclude_patterns = ["_build", "README.md", "rendered", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
root_doc = "index"

# docstrings: Google style, `x` is code (jaxlens's docstrings use single backticks for code)
default_role = "code"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False
add_module_names = False

# Names from other libraries appear in signatures; without network there is no intersphinx inventory for
# them, so strict mode (-n) would flag each one. They are ignored by pattern; jaxlens's own must resolve.
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|enum|jaxtyping|numpy|np|jnp|collections|typing|pathlib|os|flax|optax|matplotlib|"
              r"tokenizers|transformers|torch|pandas|safetensors|gguf|tqdm|concurrent|types|dataclasses)(\..*)?"),
    ("py:.*", r"(Array|Float|Int|Bool|Num|Shaped|Key|ArrayLike|Callable|Sequence|Mapping|Iterable|Iterator|"
              r"Any|Literal|Path|Figure|PyTree|DTypeLike|Self|Device|Sharding|Mesh|NoneType|ndarray)(\[.*)?"),
    ("py:class", r"(int|float|str|bool|dict|list|tuple|set|frozenset|bytes|object|type|slice|Exception|"
                 r"KeyError|ValueError|IndexError|AssertionError|TypeError|RuntimeError|OSError)"),
]

# notebooks: shown as rendered by scripts/render_notebooks.py (docs/rendered/: the outputs of a recorded full
# run on SmolLM2); nothing executes at build time
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "jaxlens"
html_static_path = []
templates_path = ["_templates"]  # page.html: furo's footer without its links to the web
# Search works from file:// (the index is a <script>), but its result summaries fetch() each page, which
# browsers refuse from file:// (CORS): summaries off, results only.
html_show_search_summary = False
html_copy_source = False
html_show_sourcelink = False


def _copy_notebooks(app) -> None:
    """The notebooks live in notebooks/ at the repository root, stored without outputs; the site shows their
    rendered copies (docs/rendered/, executed in full settings by scripts/render_notebooks.py, with a
    provenance record each), copied to docs/notebooks/ with a line saying when and where they ran. A notebook
    with no rendered copy stops the build. A notebook saved without language metadata gets Python's, so its
    cells are highlighted (strict mode otherwise flags each cell)."""
    import json

    from sphinx.errors import ExtensionError

    rendered = DOCS / "rendered"
    missing = [nb.name for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))
               if not (rendered / nb.name).exists() or not (rendered / f"{nb.stem}.json").exists()]
    if missing:
        raise ExtensionError(f"no rendered copy (docs/rendered/<name>.ipynb and .json) of {missing}: the "
                             "site shows the notebooks with their outputs. Render them with "
                             "`.venv/bin/python scripts/render_notebooks.py --only NAME` (one --only each).")
    out = DOCS / "notebooks"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        data = json.loads((rendered / nb.name).read_text())
        record = json.loads((rendered / f"{nb.stem}.json").read_text())
        meta = data.setdefault("metadata", {})
        meta.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
        meta.setdefault("language_info", {"name": "python", "pygments_lexer": "ipython3"})
        commit = (record["git"]["commit"] or "unknown")[:10]
        cores = record["machine"]["cpu_count"]
        note = (f"*Outputs from a run in {record['settings']} settings on {record['date_utc'][:10]} (jaxlens "
                f"commit `{commit}`, {record['wall_s']:.0f} s on {cores} CPU cores), written by "
                "`scripts/render_notebooks.py`.*")
        cells = data["cells"]
        at = 1 if cells and cells[0]["cell_type"] == "markdown" else 0  # after the title
        cells.insert(at, {"cell_type": "markdown", "id": "rendered-note", "metadata": {}, "source": note})
        (out / nb.name).write_text(json.dumps(data, indent=1))


def setup(app):
    app.connect("builder-inited", _copy_notebooks, priority=400)
