"""Feature dashboards against a hand computation on a tiny model with a hand-built ReLU dictionary, and the
HTML page rendered by a real headless Chromium."""

import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlens import testing
from jaxlens.dictionaries.dashboard import (
    dashboard_html,
    feature_activations,
    feature_dashboards,
    logit_effects,
    plot_feature_dashboard,
    save_dashboard_html,
)
from jaxlens.errors import InputError
from jaxlens.model.forward import forward
from jaxlens.params import param_shapes

CFG = testing.tiny_config()
HOOK = "blocks.1.hook_resid_post"
D_SAE = 12
HIGHLIGHT = (232, 89, 12)


class ToySAE(nnx.Module):
    """ReLU(x W_enc + b_enc), decoder rows W_dec [d_sae d_in]: the interface dashboards need, nothing else."""

    def __init__(self, W_enc, b_enc, W_dec):
        self.W_enc, self.b_enc, self.W_dec = nnx.Param(W_enc), nnx.Param(b_enc), nnx.Param(W_dec)

    def encode(self, x):
        return jax.nn.relu(x @ self.W_enc[...] + self.b_enc[...])


class PlainSAE:
    """The same, as a plain object holding numpy arrays (closed over, not split)."""

    def __init__(self, W_enc, b_enc, W_dec):
        self.W_enc, self.b_enc, self.W_dec = W_enc, b_enc, W_dec

    def encode(self, x):
        return jax.nn.relu(x @ jnp.asarray(self.W_enc) + jnp.asarray(self.b_enc))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.RandomState(0)
    is_entry = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
    paths, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(CFG), is_leaf=is_entry)
    params = jax.tree_util.tree_unflatten(treedef, [
        jnp.asarray(0.3 * rng.randn(*shape) + jax.tree_util.keystr(p).endswith("['w']"), jnp.float32)
        for p, (_, shape) in paths])
    W_enc = rng.randn(CFG.d_model, D_SAE).astype(np.float32) * 0.3
    b_enc = np.full(D_SAE, -1.5, np.float32)  # sparse: most tokens leave most features off
    W_dec = rng.randn(D_SAE, CFG.d_model).astype(np.float32)
    tokens = jnp.asarray(rng.randint(0, CFG.d_vocab, (20, 16)), jnp.int32)
    _, cache = forward(params, CFG, tokens, cache_names=(HOOK,))
    acts = np.maximum(np.asarray(cache[HOOK], np.float64) @ W_enc + b_enc, 0.0)  # [seq pos d_sae], by hand
    return params, tokens, ToySAE(W_enc, b_enc, W_dec), PlainSAE(W_enc, b_enc, W_dec), acts


def test_activations_equal_a_hand_computation(setup):
    params, tokens, sae, plain, acts = setup
    got = feature_activations(sae, params, CFG, tokens, HOOK, [3, 7], batch_size=6)  # 20 = 6+6+6+2 (padded)
    np.testing.assert_allclose(got, acts[..., [3, 7]], rtol=1e-4, atol=1e-5)
    got = feature_activations(plain, params, CFG, tokens, HOOK)
    np.testing.assert_allclose(got, acts, rtol=1e-4, atol=1e-5)


def test_a_jaxlens_sae_plugs_in(setup):
    from jaxlens.dictionaries import DictionaryConfig, init_dictionary

    params, tokens, _, _, _ = setup
    sae = init_dictionary(DictionaryConfig(architecture="topk", d_in=CFG.d_model, d_sae=D_SAE, k=3,
                                           hook_name=HOOK), jax.random.key(2))
    _, cache = forward(params, CFG, tokens, cache_names=(HOOK,))
    want = np.asarray(sae.encode(cache[HOOK]))
    got = feature_activations(sae, params, CFG, tokens, HOOK)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    board = feature_dashboards(sae, params, CFG, tokens, HOOK, [int(want.sum((0, 1)).argmax())])[0]
    assert board.frequency == pytest.approx(np.mean(want[..., board.feature] > 0))


def test_dashboard_statistics_equal_a_hand_computation(setup):
    params, tokens, sae, _, acts = setup
    feats = [3, 7, 0]
    boards = feature_dashboards(sae, params, CFG, tokens, HOOK, feats, tokenizer=lambda t: f"t{t}",
                                n_contexts=5, window=(3, 2), n_logits=4, bins=10)
    tok = np.asarray(tokens)
    W_U = np.asarray(params["unembed"]["W_U"], np.float64)
    for board, f in zip(boards, feats, strict=True):
        a = acts[..., f]
        assert board.feature == f
        np.testing.assert_allclose(board.frequency, np.mean(a > 0), atol=1e-9)
        np.testing.assert_allclose(board.max_act, a.max(), rtol=1e-4)
        np.testing.assert_allclose(board.mean_act, a[a > 0].mean(), rtol=1e-4)
        assert board.histogram[0].sum() == np.sum(a > 0) and len(board.histogram[0]) == 10
        best = np.argsort(-a.reshape(-1), kind="stable")[:5]
        assert [(c.seq, c.pos) for c in board.contexts] == [divmod(int(i), 16) for i in best]
        c = board.contexts[0]
        lo = max(0, c.pos - 3)
        assert c.tokens == tok[c.seq, lo:c.pos + 3].tolist() and c.strings == [f"t{t}" for t in c.tokens]
        np.testing.assert_allclose(c.acts, a[c.seq, lo:c.pos + 3], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(c.value, a.max(), rtol=1e-4)
        effect = np.asarray(sae.W_dec[...], np.float64)[f] @ W_U
        assert [p[0] for p in board.promoted] == np.argsort(-effect)[:4].tolist()
        assert [s[0] for s in board.suppressed] == np.argsort(effect)[:4].tolist()
        np.testing.assert_allclose([p[2] for p in board.promoted], np.sort(effect)[::-1][:4], rtol=1e-4)
    np.testing.assert_allclose(logit_effects(sae, params, CFG), np.asarray(sae.W_dec[...]) @ W_U, rtol=1e-4,
                               atol=1e-4)
    fig = plot_feature_dashboard(boards[0])
    bars = fig.axes[0].patches
    assert [int(round(b.get_height())) for b in bars] == boards[0].histogram[0].tolist()


def test_exclude_bos_leaves_out_position_0(setup):
    params, tokens, sae, _, acts = setup
    feats = [3, 7, 0]
    boards = feature_dashboards(sae, params, CFG, tokens, HOOK, feats, n_contexts=5, exclude_bos=True)
    for board, f in zip(boards, feats, strict=True):
        a = acts[..., f].copy()
        rest = a[:, 1:]  # by hand: the statistics of positions 1.., the top contexts with position 0 off
        np.testing.assert_allclose(board.frequency, np.mean(rest > 0), atol=1e-9)
        np.testing.assert_allclose(board.max_act, rest.max(), rtol=1e-4)
        np.testing.assert_allclose(board.mean_act, rest[rest > 0].mean(), rtol=1e-4)
        assert board.histogram[0].sum() == np.sum(rest > 0)
        a[:, 0] = 0.0
        best = np.argsort(-a.reshape(-1), kind="stable")[:5]
        assert [(c.seq, c.pos) for c in board.contexts] == [divmod(int(i), 16) for i in best]
        assert all(c.pos > 0 for c in board.contexts)
    top = [np.argsort(-acts[..., f].reshape(-1), kind="stable")[:5] for f in feats]
    assert any(int(i) % 16 == 0 for t in top for i in t)  # without exclude_bos, position 0 is a top context


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("The dashboard test renders the page in headless Chromium, which is not installed. Run "
                    "scripts/setup.sh (it runs `apt-get install -y chromium`), or install it yourself.")
    return path


def test_the_page_renders_in_a_real_browser(setup, tmp_path):
    params, tokens, sae, _, acts = setup
    shown = int(np.asarray(tokens)[divmod(int(np.argmax(acts[..., 3])), 16)])  # in the top context
    boards = feature_dashboards(sae, params, CFG, tokens, HOOK, [3, 7],
                                tokenizer=lambda t: "<&>" if t == shown else f"tok{t}")
    path = save_dashboard_html(boards, tmp_path / "features.html", title="toy features")
    text = path.read_text()
    assert text == dashboard_html(boards, title="toy features")
    assert not re.search(r"https?://|src=|<link", text), "the page must fetch nothing"
    exe = chromium()
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(common + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    section = re.search(r'<section class="feature" id="f-3".*?</section>', dom, re.S).group(0)
    first = re.search(r'<div class="ctx".*?</div>', section, re.S).group(0)
    spans = re.findall(r'<span class="tok( top)?" data-act="([^"]+)"[^>]*style="background-color: ([^"]+);"',
                       first)
    assert len(spans) == len(boards[0].contexts[0].acts), "the script shaded every token"
    top = [s for s in spans if s[0]]
    assert len(top) == 1 and top[0][2] == "rgb({}, {}, {})".format(*HIGHLIGHT)  # alpha 1: the maximum
    a3 = acts[..., 3]
    for _, act, colour in spans:
        m = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", colour)
        assert tuple(int(v) for v in m.groups()[:3]) == HIGHLIGHT
        alpha = 1.0 if m.group(4) is None else float(m.group(4))
        np.testing.assert_allclose(alpha, max(float(act), 0.0) / a3.max(), atol=0.01)
    assert "<&>" not in text and "&lt;&amp;&gt;" in text  # token text is escaped, not markup

    shot = tmp_path / "shot.png"
    subprocess.run(common + ["--hide-scrollbars", "--window-size=1200,900", f"--screenshot={shot}",
                             path.as_uri()], capture_output=True, timeout=120, check=True)
    import matplotlib.image

    img = (matplotlib.image.imread(shot)[..., :3] * 255).round()
    assert img.std() > 10, "the screenshot is blank"
    near = np.abs(img - np.array(HIGHLIGHT)).max(-1) < 12  # the fully shaded top tokens (and histogram bars)
    assert near.sum() > 200


def test_bad_input_is_a_clear_error(setup):
    params, tokens, sae, _, _ = setup
    with pytest.raises(InputError, match=r"features must be indices in \[0, d_sae=12\); found \[12\]"):
        feature_dashboards(sae, params, CFG, tokens, HOOK, [12])
    with pytest.raises(InputError, match="needs a dictionary with encode.*without W_dec"):
        feature_activations(object(), params, CFG, tokens, HOOK)
    wide = ToySAE(np.zeros((CFG.d_mlp, 4), np.float32), np.zeros(4, np.float32),
                  np.zeros((4, CFG.d_mlp), np.float32))
    with pytest.raises(InputError, match=r"reads d_in=72, but 'blocks.1.hook_resid_post' has shape"):
        feature_activations(wide, params, CFG, tokens, HOOK)
    with pytest.raises(InputError, match="width 72; the unembedding reads d_model=40"):
        logit_effects(wide, params, CFG)
    with pytest.raises(InputError, match="addresses every layer"):
        feature_activations(sae, params, CFG, tokens, "blocks.hook_resid_post")
    with pytest.raises(InputError, match=r"at least one sequence; found shape \(0, 16\)"):
        feature_activations(sae, params, CFG, tokens[:0], HOOK)
    with pytest.raises(InputError, match=r"rows need at least 2 tokens; found shape \(20, 1\)"):
        feature_dashboards(sae, params, CFG, tokens[:, :1], HOOK, [3], exclude_bos=True)
