"""Every notebook in notebooks/ runs top to bottom in small settings (JAXLENS_NB_SMALL=1) without a cell
error, and holds narrative and calls only (no function or class definitions: library code lives in the
package)."""

import ast
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_activation_patching_at_scale", "03_induction_heads", "04_ioi_circuit",
            "05_features", "06_circuit_discovery", "07_attribution_graphs", "08_flax_and_jax_codebases"]


def test_the_numbered_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_narrative_and_calls_only(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and any(c.cell_type == "markdown" for c in nb.cells)
    assert "JAXLENS_NB_SMALL" in code[0].source, "the first cell reads the small-settings switch"
    for cell in code:
        assert not any(o for o in cell.get("outputs", [])), f"{path.name}: commit notebooks without outputs"
        source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        tree = ast.parse(source)
        defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{path.name} defines {defs}: move library code into the package"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_small_settings(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JAXLENS_NB_SMALL", "1")
    # 02 shows sharding on 8 simulated CPU devices; the others run as a user's plain session does (one device,
    # so sweeps do not replicate the model eight times in memory)
    devices = 8 if path.stem.startswith("02_") else 1
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, if a cell errors
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
