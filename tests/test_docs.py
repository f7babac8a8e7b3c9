"""The documentation site builds in strict mode and works from disk in headless Chromium: the index loads with
no console message, search finds `run_with_cache`, the API page shows `get_act_patch_resid_pre`'s signature,
every exported name is documented, and no page loads anything from the network or links outside the site
except to cited papers and repositories.

Needs the `docs` extra (Sphinx, myst-nb, furo: `bash scripts/setup.sh` installs it) and Debian's `chromium`;
without either the tests fail with the command that installs it."""

import ast
import html
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).parent.parent
# Hosts a page may link to: cited papers and repositories.
CITED_HOSTS = {"arxiv.org", "doi.org", "aclanthology.org", "openreview.net", "proceedings.neurips.cc",
               "transformer-circuits.pub", "distill.pub", "github.com", "www.neelnanda.io"}
# Headless, and quiet on a machine without a network (no background connections, updates or sync).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_nb") is None:
        pytest.fail("The docs tests need Sphinx and myst-nb: pip install -e '.[docs]' "
                    "(bash scripts/setup.sh installs them).")
    out = tmp_path_factory.mktemp("docs") / "html"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "build_docs.sh"), str(out)], cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"strict docs build failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    return out


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("The docs tests need a headless browser: apt-get install chromium (Debian's package).")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def load(url: str) -> tuple[str, list[str]]:
        """(the DOM after the page's scripts ran, the console messages it logged)."""
        run = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                              "--virtual-time-budget=8000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"chromium failed on {url}:\n{run.stderr[-3000:]}"
        return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]

    return load


def test_console_check_catches_errors(chromium, tmp_path):
    """The check below has teeth: a page that logs an error and throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    _, console = chromium(bad.as_uri())
    assert any("boom" in line for line in console) and any("notDefined" in line for line in console)


def test_index_loads_without_console_messages(site, chromium):
    dom, console = chromium((site / "index.html").as_uri())
    assert "From TransformerLens" in dom and "Sweeps at scale" in dom and "API reference" in dom
    assert not console, "the index logged to the console:\n" + "\n".join(console)


@pytest.mark.parametrize("page", ["guides/from_transformerlens.html", "notebooks/01_quickstart.html"])
def test_pages_load_without_console_messages(site, chromium, page):
    dom, console = chromium((site / page).as_uri())
    assert "<h1>" in dom
    assert not console, f"{page} logged to the console:\n" + "\n".join(console)


def test_search_finds_run_with_cache(site, chromium):
    dom, console = chromium((site / "search.html").as_uri() + "?q=run_with_cache")
    results = re.search(r'<ul[^>]*class="search"[^>]*>(.*?)</ul>', dom, re.S)
    assert results, "search produced no result list (did searchindex.js load from file://?)"
    hrefs = re.findall(r'href="([^"]+)"', results.group(1))
    assert any(h.endswith("#jaxlens.HookedTransformer.run_with_cache") for h in hrefs), hrefs
    assert not console, "\n".join(console)


def test_api_page_shows_get_act_patch_resid_pre_signature(site, chromium):
    dom, console = chromium((site / "api" / "_generated" / "jaxlens.patching.html").as_uri())
    sig = re.search(r'<dt[^>]*id="jaxlens\.patching\.get_act_patch_resid_pre"[^>]*>(.*?)</dt>', dom, re.S)
    assert sig, "no entry for jaxlens.patching.get_act_patch_resid_pre"
    text = html.unescape(re.sub(r"<[^>]+>", "", sig.group(1)))
    expected = r"get_act_patch_resid_pre\(model, corrupted_tokens, clean_cache, patching_metric"
    assert re.search(expected, text), text
    assert not console, "\n".join(console)


def test_signatures_show_jaxtyping_shapes(site):
    page = (site / "api" / "_generated" / "jaxlens.html").read_text()
    sig = re.search(r'<dt[^>]*id="jaxlens\.forward"[^>]*>(.*?)</dt>', page, re.S)
    assert sig and "batch pos" in html.unescape(re.sub(r"<[^>]+>", "", sig.group(1)))


def api_packages() -> list[str]:
    """`jaxlens_api_packages` from docs/conf.py: the packages the API reference documents."""
    tree = ast.parse((ROOT / "docs" / "conf.py").read_text())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "jaxlens_api_packages" for t in node.targets))


@pytest.mark.parametrize("package", api_packages())
def test_every_exported_name_is_documented(site, package):
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        from jaxlens_apigen import exported_names
    finally:
        sys.path.remove(str(ROOT / "docs" / "_ext"))
    module = importlib.import_module(package)
    page = (site / "api" / "_generated" / f"{package}.html").read_text()
    # documented here (an entry with its id), or listed as an alias of an entry on another page
    missing = [n for n in exported_names(module) if f'id="{package}.{n}"' not in page
               and not re.search(rf'<span class="pre">{re.escape(n)}</span></code>: (see|the module)', page)]
    assert not missing, f"{package} exports names its API page lacks: {missing}"


def test_dialect_reads_plain_docstrings_as_rest():
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        from jaxlens_dialect import plain_to_rest
    finally:
        sys.path.remove(str(ROOT / "docs" / "_ext"))
    doc = ["Shapes [*batch pos]; |x| and `a*b` stay code; `__init__`s.", "", "    grid = sweep(x)  # a*b",
           "", "Args:", "    x: the input [*batch],", "        continued.", "- a bullet", "  continued",
           "Text that", "    hangs.", ">>> f(*args)", "2"]
    out = plain_to_rest(doc)
    assert out[0] == r"Shapes [\*batch pos]; \|x\| and `a*b` stay code; `__init__`\ s."
    assert out[1:5] == ["", "::", "", "    grid = sweep(x)  # a*b"]          # a literal block, unescaped
    assert r"    x: the input [\*batch]," in out and "        continued." in out  # Args left to napoleon
    assert "  continued" in out and "hangs." in out        # the bullet's indent kept, a hanging indent joined
    assert out[-2:] == [">>> f(*args)", "2"]                                # doctests untouched


def test_nothing_loads_from_the_network_and_links_stay_in_the_site(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    remote_assets, outside = [], set()
    for page in pages:
        text = page.read_text()
        for tag, attr, url in re.findall(r"<(script|link|img|iframe|source)\b[^>]*?\b(src|href)=\"([^\"]+)\"",
                                         text):
            if re.match(r"(https?:)?//", url):
                remote_assets.append(f"{page.relative_to(site)}: <{tag} {attr}={url}>")
        for url in re.findall(r"<a\b[^>]*\bhref=\"([^\"]+)\"", text):
            if re.match(r"(https?:)?//", url) and urlparse(url).hostname not in CITED_HOSTS:
                outside.add(url)
    for css in site.rglob("*.css"):
        for url in re.findall(r"url\(['\"]?((?:https?:)?//[^)'\"]+)", css.read_text()):
            remote_assets.append(f"{css.relative_to(site)}: url({url})")
    assert not remote_assets, "pages load from the network:\n" + "\n".join(remote_assets)
    assert not outside, f"links outside the site to neither a cited paper nor a repository: {sorted(outside)}"
