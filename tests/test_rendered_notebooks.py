"""The docs site shows every notebook with the outputs of a full run of its current code
(scripts/render_notebooks.py writes docs/rendered/<name>.ipynb and <name>.json): each rendered copy matches
the code cells of notebooks/<name>.ipynb (sha256, computed here independently of the script), every code cell
ran without an error, the notebooks that draw figures carry PNG outputs, and the record's date is a real past
date.
The render script itself: its hash follows code cells only, its size limit and bad input raise clear errors,
and it renders a hand-made notebook with a figure end to end; the docs build refuses a notebook with no
rendered copy."""

import base64
import datetime
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RENDERED = ROOT / "docs" / "rendered"
SCRIPT = "scripts/render_notebooks.py"
# notebooks whose code draws a matplotlib figure (viz.*, plot_*, pyplot); a test keeps this list honest
DRAWS_FIGURES = {"01_quickstart", "02_activation_patching_at_scale", "03_induction_heads", "04_ioi_circuit",
                 "05_features", "06_circuit_discovery"}
FIGURE_CALL = re.compile(r"\b(viz\.(?!attention_html)\w+|plot_\w+|plt\.\w+)\(")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render_notebooks = _load(ROOT / SCRIPT, "render_notebooks")


def _code_sources(nb: dict) -> list[str]:
    return [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
            for c in nb["cells"] if c["cell_type"] == "code"]


def _reference_hash(nb: dict) -> str:
    """The documented rule, written out here: sha256 of the JSON list of the code cells' sources, in order."""
    return hashlib.sha256(json.dumps(_code_sources(nb), ensure_ascii=False).encode()).hexdigest()


def _rendered(path: Path) -> tuple[dict, dict]:
    nb, record = RENDERED / path.name, RENDERED / f"{path.stem}.json"
    assert nb.exists() and record.exists(), (f"{path.name} has no rendered copy in docs/rendered/: run "
                                             f"`.venv/bin/python {SCRIPT} --only {path.stem}`")
    return json.loads(nb.read_text()), json.loads(record.read_text())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rendered_copy_matches_the_current_code(path):
    nb, record = _rendered(path)
    source = json.loads(path.read_text())
    assert record["code_sha256"] == _reference_hash(source), (
        f"notebooks/{path.name} changed since it was rendered ({record['date_utc']}): re-render it with "
        f"`.venv/bin/python {SCRIPT} --only {path.stem}`")
    assert _code_sources(nb) == _code_sources(source)  # the copy holds the same code the hash was taken of
    assert record["notebook"] == f"notebooks/{path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rendered_copy_comes_from_a_full_run(path):
    nb, record = _rendered(path)
    assert record["settings"] == "full", (
        f"{path.name} was rendered in {record['settings']!r} settings (a fallback); the site shows full "
        f"runs: `.venv/bin/python {SCRIPT} --only {path.stem}`")
    date = datetime.datetime.fromisoformat(record["date_utc"])
    assert date.tzinfo is not None and date.utcoffset() == datetime.timedelta(0)
    assert datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC) < date <= datetime.datetime.now(datetime.UTC)
    assert record["wall_s"] > 0 and record["machine"]["cpu_count"] >= 1
    assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"] or ""), record["git"]
    assert record["versions"]["jax"] and record["versions"]["flax"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "every cell ran, in order"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name}: a stored error: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert record["bytes"] == len((RENDERED / path.name).read_bytes()) <= render_notebooks.MAX_MB * 1e6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_that_draw_show_their_figures(path):
    source = "\n".join(_code_sources(json.loads(path.read_text())))
    draws = bool(FIGURE_CALL.search(source))
    assert draws == (path.stem in DRAWS_FIGURES), f"update DRAWS_FIGURES: {path.stem} draws: {draws}"
    if not draws:
        return
    nb, _ = _rendered(path)
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    images = ["".join(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} draws figures, but its rendered copy has no image output"
    assert all(base64.b64decode(img)[:8] == PNG_MAGIC for img in images)


def _tiny_notebook(*code: str) -> dict:
    import nbformat

    cells = [nbformat.v4.new_markdown_cell("# tiny")] + [nbformat.v4.new_code_cell(c) for c in code]
    return nbformat.v4.new_notebook(cells=cells)


def test_hash_follows_code_cells_only():
    nb = _tiny_notebook("x = 1", "x + 1")
    base = render_notebooks.code_sha256(nb)
    assert base == _reference_hash(nb)
    nb.cells[0].source = "# tiny, retitled"  # prose: no re-render needed
    assert render_notebooks.code_sha256(nb) == base
    for edit in ("x = 2", "x = 1 "):
        nb.cells[1].source = edit
        assert render_notebooks.code_sha256(nb) != base
    nb.cells[1].source = "x = 1"
    nb.cells[1], nb.cells[2] = nb.cells[2], nb.cells[1]  # reordered
    assert render_notebooks.code_sha256(nb) != base
    as_lists = json.loads(json.dumps(_tiny_notebook("x = 1\n", "x + 1")))  # sources as lists of lines on disk
    as_lists["cells"][1]["source"] = ["x = 1\n"]
    assert render_notebooks.code_sha256(as_lists) == _reference_hash(_tiny_notebook("x = 1\n", "x + 1"))


def test_size_limit_raises():
    render_notebooks.check_size("x" * 1_999_999, "small.ipynb")  # under 2 MB: accepted
    with pytest.raises(render_notebooks.RenderError, match=r"big\.ipynb is 2\.10 MB, over the 2 MB limit"):
        render_notebooks.check_size("x" * 2_100_000, "big.ipynb")


def test_progress_bar_redraws_are_dropped():
    import nbformat

    nb = _tiny_notebook("pass")
    bar = " 10%|#\r 50%|###\r100%|#####\r\nok\n"
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stderr", text=bar)]
    render_notebooks._strip_progress(nb)
    assert nb.cells[1].outputs[0].text == "100%|#####\nok\n"


def test_bad_arguments_raise(capsys):
    from jaxlens.errors import InputError

    with pytest.raises(InputError, match="settings must be 'full' or 'small', got 'tiny'"):
        render_notebooks.render(NOTEBOOKS[0], settings="tiny")
    with pytest.raises(SystemExit):
        render_notebooks.main(["--only", "99_missing"])
    err = capsys.readouterr().err
    assert "no notebook named ['99_missing']" in err and "01_quickstart" in err


def test_render_writes_outputs_and_provenance(tmp_path):
    """A hand-made notebook with a figure, rendered for real: outputs, PNG, provenance; an over-size copy and
    a failing cell raise and write nothing."""
    import nbformat

    src = tmp_path / "tiny.ipynb"
    nbformat.write(_tiny_notebook("import os\nprint(os.environ.get('JAXLENS_NB_SMALL'))",
                                  "import numpy as np\nfrom jaxlens import viz\nviz.heatmap(np.eye(3))"), src)
    out = tmp_path / "out"
    with pytest.raises(render_notebooks.RenderError, match="over the 0.001 MB limit"):
        render_notebooks.render(src, out, max_mb=0.001)
    assert not out.exists() or not any(out.iterdir())
    record = render_notebooks.render(src, out, settings="small")
    nb = nbformat.read(out / "tiny.ipynb", as_version=4)  # joins the lists of lines of the file
    assert nb["cells"][1]["outputs"][0]["text"] == "1\n"  # the small switch reached the kernel
    assert base64.b64decode(nb["cells"][2]["outputs"][0]["data"]["image/png"])[:8] == PNG_MAGIC
    assert json.loads((out / "tiny.json").read_text()) == record
    assert record["settings"] == "small" and record["code_sha256"] == _reference_hash(nb)
    nbformat.write(_tiny_notebook("1 / 0"), src)
    with pytest.raises(render_notebooks.RenderError, match="tiny.ipynb failed in full settings"):
        render_notebooks.render(src, tmp_path / "out2")
    assert not (tmp_path / "out2" / "tiny.ipynb").exists()


def test_docs_build_refuses_a_notebook_without_rendered_copy(tmp_path, monkeypatch):
    from sphinx.errors import ExtensionError

    conf = _load(ROOT / "docs" / "conf.py", "jaxlens_docs_conf")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "docs" / "rendered").mkdir(parents=True)
    nbformat_json = json.dumps(_tiny_notebook("1"))
    (tmp_path / "notebooks" / "09_new.ipynb").write_text(nbformat_json)
    monkeypatch.setattr(conf, "ROOT", tmp_path)
    monkeypatch.setattr(conf, "DOCS", tmp_path / "docs")
    with pytest.raises(ExtensionError, match=r"\['09_new.ipynb'\].*scripts/render_notebooks.py --only NAME"):
        conf._copy_notebooks(None)
    (tmp_path / "docs" / "rendered" / "09_new.ipynb").write_text(nbformat_json)
    record = {"settings": "full", "date_utc": "2026-01-02T03:04:05+00:00", "git": {"commit": "ab" * 20},
              "wall_s": 12.0, "machine": {"cpu_count": 2}}
    (tmp_path / "docs" / "rendered" / "09_new.json").write_text(json.dumps(record))
    conf._copy_notebooks(None)
    shown = json.loads((tmp_path / "docs" / "notebooks" / "09_new.ipynb").read_text())
    assert shown["cells"][1]["source"].startswith("*Outputs from a run in full settings on 2026-01-02")
    assert shown["cells"][0]["source"] == "# tiny" and shown["cells"][2]["source"] == "1"
