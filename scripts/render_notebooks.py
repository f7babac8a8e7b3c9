"""Execute the notebooks in their full settings; store the executed copies, with outputs, for the docs site.

    .venv/bin/python scripts/render_notebooks.py                   # all of notebooks/*.ipynb, one at a time
    .venv/bin/python scripts/render_notebooks.py --only 03_induction_heads
    .venv/bin/python scripts/render_notebooks.py --settings small  # a labelled fallback, never the default

Each notebook runs top to bottom with nbclient in a fresh kernel, as a reader's plain session runs it:
`JAXLENS_NB_SMALL` unset (the full settings, on the bundled SmolLM2 model) and no `XLA_FLAGS` or `MPLBACKEND`
from this shell (02 sets its own 8 simulated devices; figures come out as inline PNGs), in a scratch working
folder, so files a notebook writes do not land in the repository. The executed copy is written to
`docs/rendered/<name>.ipynb` and its provenance to `docs/rendered/<name>.json` (both atomically): the UTC
date, the wall seconds, the machine, the jaxlens git commit, the sha256 of the notebook's code cells
(`code_sha256`) and the jax / flax versions. `tests/test_rendered_notebooks.py` checks that every notebook
has a copy whose `code_sha256` matches the current source, so a notebook edited without re-rendering fails CI.

Outputs are stored as the kernel produced them, with one exception: a progress bar's intermediate redraws
(text before the last carriage return of a line, and widget views that need a live kernel) are dropped, since
they change every run and say nothing the final state does not; and a PNG figure over 100 kB is re-encoded
with an adaptive 256-colour palette when that is smaller (a figure of many thin antialiased lines, 06's
circuit, is 1.4 MB as the kernel writes it and a third of that in a palette). A rendered copy over
`--max-mb` (2 MB by default) is an error, not a silent truncation.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxlens.errors import InputError, JaxlensError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
RENDERED = ROOT / "docs" / "rendered"
MAX_MB = 2.0
# environment variables of this shell that would change how a notebook runs from a reader's plain session
_CLEARED_ENV = ("JAXLENS_NB_SMALL", "XLA_FLAGS", "MPLBACKEND")
_WIDGET_MIMES = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


class RenderError(JaxlensError, RuntimeError):
    """A notebook could not be rendered (it failed, or its rendered copy breaks a limit)."""


def code_sha256(nb: dict) -> str:
    """The sha256 of a notebook's code cells: the JSON list of their sources (each one string), in order.

    Args:
        nb: the notebook as JSON (`json.load` of the .ipynb, or an nbformat node).

    Returns:
        64 hex digits; changes whenever a code cell is added, removed, reordered or edited (markdown does not
        count: prose edits need no re-render).
    """
    sources = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
               for c in nb["cells"] if c["cell_type"] == "code"]
    return hashlib.sha256(json.dumps(sources, ensure_ascii=False).encode()).hexdigest()


def check_size(data: str, name: str, max_mb: float = MAX_MB) -> None:
    """Raise RenderError when a rendered notebook's JSON is over `max_mb` megabytes.

    Raises:
        RenderError: naming the notebook, its size, the limit and what to do.
    """
    size = len(data.encode())
    if size > max_mb * 1e6:
        raise RenderError(f"The rendered {name} is {size / 1e6:.2f} MB, over the {max_mb:g} MB limit on a "
                          "stored notebook. Make its figures smaller (fewer, lower dpi) or print less in the "
                          "notebook, or raise the limit with --max-mb if the size is really needed.")


def _strip_progress(nb) -> None:
    """Drop progress bars' intermediate redraws: each line of a stream output keeps only its last non-empty
    carriage-return segment, and widget views go (they need a live kernel; their text/plain stays)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and "\r" in out["text"]:
                out["text"] = "\n".join(([s for s in line.split("\r") if s] or [""])[-1]
                                        for line in out["text"].split("\n"))
            if "data" in out:
                for mime in _WIDGET_MIMES:
                    out["data"].pop(mime, None)
        cell.get("metadata", {}).pop("execution", None)
    nb.metadata.pop("widgets", None)


def _compress_images(nb, min_bytes: int = 100_000) -> None:
    """Re-encode each PNG output over `min_bytes` with an adaptive 256-colour palette if that is smaller."""
    import base64
    import io

    from PIL import Image

    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            png = out.get("data", {}).get("image/png")
            raw = base64.b64decode(png) if png else b""
            if len(raw) <= min_bytes:
                continue
            buf = io.BytesIO()
            Image.open(io.BytesIO(raw)).convert("RGB").quantize(256).save(buf, format="png", optimize=True)
            if buf.tell() < len(raw):
                out["data"]["image/png"] = base64.b64encode(buf.getvalue()).decode() + "\n"


def _check_executed(nb, name: str) -> None:
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        if cell.get("execution_count") is None:
            raise RenderError(f"{name}: code cell {i} was not executed (execution_count is empty).")
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            error = errors[0]
            raise RenderError(f"{name}: code cell {i} raised {error.get('ename')}: {error.get('evalue')}")


def _git_commit() -> dict:
    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return run.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "jaxlens", "converters", "notebooks")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "numpy", "matplotlib", "nbclient"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def render(path: Path, out_dir: Path = RENDERED, *, settings: str = "full", timeout: int = 7200,
           max_mb: float = MAX_MB) -> dict:
    """Execute one notebook and write its rendered copy and provenance record into `out_dir`.

    Args:
        path: the notebook (notebooks/<name>.ipynb).
        out_dir: where `<name>.ipynb` and `<name>.json` are written.
        settings: "full" (the default a reader gets) or "small" (`JAXLENS_NB_SMALL=1`; a labelled fallback,
            recorded as such).
        timeout: seconds one cell may run.
        max_mb: the largest rendered notebook accepted.

    Returns:
        The provenance record written.

    Raises:
        InputError: `settings` is neither "full" nor "small".
        RenderError: a cell failed, or the rendered copy is over `max_mb`; nothing is written.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from jaxlens._atomic import write_json, write_text

    if settings not in ("full", "small"):
        raise InputError(f"settings must be 'full' or 'small', got {settings!r}; 'full' is what a reader "
                         "runs, 'small' (JAXLENS_NB_SMALL=1) a labelled fallback.")
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    if settings == "small":
        env["JAXLENS_NB_SMALL"] = "1"
    # a scratch folder of a fixed name, so that paths a notebook prints are the same from run to run
    work = Path(tempfile.gettempdir()) / "jaxlens-render" / path.stem
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(work)}})
        start = time.perf_counter()
        try:
            client.execute(env=env, cwd=str(work))
        except CellExecutionError as e:
            raise RenderError(f"{path.name} failed in {settings} settings:\n{e}") from e
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _check_executed(nb, path.name)
    _strip_progress(nb)
    _compress_images(nb)
    data = nbformat.writes(nb)
    check_size(data, path.name, max_mb)
    record = {
        "notebook": f"notebooks/{path.name}",
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": round(wall, 1),
        "settings": settings,
        "code_sha256": code_sha256(nb),
        "git": _git_commit(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "machine": platform.machine()},
        "versions": _versions(),
        "bytes": len(data.encode()),
    }
    write_text(out_dir / path.name, data)
    write_json(out_dir / f"{path.stem}.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="render only this notebook (its stem, e.g. 03_induction_heads); repeatable")
    parser.add_argument("--out", type=Path, default=RENDERED, help=f"output folder (default {RENDERED})")
    parser.add_argument("--settings", choices=("full", "small"), default="full",
                        help="full (default) or small: a fallback, recorded in the provenance")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds one cell may run (default 7200)")
    parser.add_argument("--max-mb", type=float, default=MAX_MB,
                        help=f"size limit per notebook (default {MAX_MB})")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.only:
        known = {p.stem: p for p in paths}
        unknown = [n for n in args.only if n.removesuffix(".ipynb") not in known]
        if unknown:
            parser.error(f"no notebook named {unknown} in notebooks/; the notebooks are {sorted(known)}")
        paths = [known[n.removesuffix(".ipynb")] for n in args.only]
    for path in paths:
        print(f"rendering {path.name} ({args.settings} settings) ...", flush=True)
        try:
            record = render(path, args.out, settings=args.settings, timeout=args.timeout, max_mb=args.max_mb)
        except RenderError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        kb = record["bytes"] / 1e3
        print(f"  {record['wall_s']:.0f} s, {kb:.0f} kB -> {args.out / path.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
