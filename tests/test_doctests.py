"""Every example in the documentation runs: the doctests of the core entry points (forward, the façade's
run_with_cache / run_with_hooks, the patching functions) and every `python` block of the guides in
docs/guides/, each guide's blocks in order in one namespace, as a reader would paste them."""

import doctest
import re
from pathlib import Path

import pytest

from jaxlens import HookedTransformer, patching
from jaxlens.model.forward import forward

ROOT = Path(__file__).parent.parent
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))

# The core entry points whose docstrings carry examples; each must have at least one.
DOCTESTED = {
    "jaxlens.forward": forward,
    "HookedTransformer.run_with_cache": HookedTransformer.run_with_cache,
    "HookedTransformer.run_with_hooks": HookedTransformer.run_with_hooks,
    "patching.get_act_patch_resid_pre": patching.get_act_patch_resid_pre,
}


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a MyST page (blocks captioned TransformerLens use {code-block})."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


@pytest.mark.parametrize("name", list(DOCTESTED))
def test_docstring_examples_run(name):
    tests = doctest.DocTestFinder(recurse=False).find(DOCTESTED[name], name, globs={})
    examples = [t for t in tests if t.examples]
    assert examples, f"{name}'s docstring has no example (an `Example:` section with >>> lines)"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in examples:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (see above)"


def test_guides_exist_and_have_examples():
    names = {g.stem for g in GUIDES}
    assert {"from_transformerlens", "architecture", "sweeps", "multihost", "dictionaries", "circuits",
            "attribution_graphs", "flax_models"} <= names
    for guide in GUIDES:
        assert python_blocks(guide.read_text()), f"{guide.name} has no ```python block"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.stem)
def test_guide_examples_run(guide):
    namespace: dict = {"__name__": f"guide_{guide.stem}"}
    for i, block in enumerate(python_blocks(guide.read_text())):
        exec(compile(block, f"{guide.relative_to(ROOT)} (python block {i + 1})", "exec"), namespace)
