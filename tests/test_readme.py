"""README.md holds exactly the two commands a newcomer runs, `.ci/run` runs the second, and the tour's code
runs as written on the real SmolLM2 and computes what its comments say."""

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def two_commands() -> list[str]:
    section = README.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    demo, tests = two_commands()
    assert demo.endswith("jaxlens demo") and "pytest" in tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert tests in ci, f".ci/run must run README's test command {tests!r}; it runs {ci}"


def small_smollm2_shaped_model(name, **_):
    """SmolLM2's real tokenizer on a 6-layer, 9-head random Llama: the tour's calls and shapes, in seconds."""
    import jax

    from jaxlens import Config, HookedTransformer, converters, hub, init_params

    cfg = Config(d_model=72, n_layers=6, n_heads=9, d_head=8, n_key_value_heads=3, d_mlp=96, d_vocab=49152,
                 n_ctx=64, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                 positional_embedding_type="rotary", rotary_dim=8)
    return HookedTransformer(cfg, init_params(cfg, jax.random.key(0)),
                             converters.load_tokenizer(hub.resolve(name)))


@pytest.mark.slow
def test_tour_runs_and_computes_what_it_says(tmp_path, monkeypatch):
    """The tour as written, on SmolLM2's tokenizer with small random weights (the real weights' sweeps take
    minutes on 2 cores; tests/converters/test_smollm2.py covers the real model)."""
    pytest.importorskip("matplotlib")
    from jaxlens import HookedTransformer

    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(HookedTransformer, "from_pretrained", small_smollm2_shaped_model)
    ns: dict = {}
    exec(compile(code, "README.md tour", "exec"), ns)  # noqa: S102 - our own README
    model, tokens, clean, corrupted = ns["model"], ns["tokens"], ns["clean"], ns["corrupted"]
    cfg = model.cfg

    # Zeroing head 2's z in layer 5 removes exactly that head's term z @ W_O from the attention output.
    ablated = np.asarray(ns["cache"]["blocks.5.hook_attn_out"])
    _, plain = model.run_with_cache(tokens, names_filter=["blocks.5.attn.hook_z", "blocks.5.hook_attn_out"])
    attn_out = np.asarray(plain["blocks.5.hook_attn_out"])
    assert not np.allclose(ablated, attn_out, atol=1e-4)
    w_o = np.asarray(model.W_O[5, 2])  # [d_head d_model]
    removed = np.einsum("bpe,ed->bpd", np.asarray(plain["blocks.5.attn.hook_z"])[:, :, 2], w_o)
    np.testing.assert_allclose(ablated, attn_out - removed, atol=1e-4)

    # The TL-named grid and the general sweep have TL's shapes and agree where they overlap: patching the
    # whole residual stream at layer 0 and every position restores the clean metric.
    P = clean.shape[1]
    assert np.asarray(ns["grid"]).shape == (cfg.n_layers, P)
    res = ns["result"]
    assert res.values.shape == (cfg.n_layers, cfg.n_heads) and res.axes == ("layer", "head")
    best = res.rank()[:5]
    assert abs(best[0][0]) == pytest.approx(np.abs(res.values).max())
    assert sorted(p.name for p in (tmp_path / "sweep_ckpt").iterdir()), "the sweep's checkpoint was written"
    clean_metric = float(ns["metric"](model(clean)))
    corrupted_metric = float(ns["metric"](model(corrupted)))
    assert clean_metric != pytest.approx(corrupted_metric, abs=1e-3)
    # The differing name token is the only position whose layer-0 patch can matter.
    diff = int(np.flatnonzero(np.asarray(clean[0]) != np.asarray(corrupted[0]))[0])
    assert float(np.asarray(ns["grid"])[0, diff]) == pytest.approx(clean_metric, abs=1e-3)
