"""Multi-process sharded loading and circuits: 2 processes x 4 simulated CPU devices on localhost.

One launch of tests/scale/multihost_worker.py (modes "load" and "edges"). "load" runs
`HookedTransformer.from_pretrained(path, mesh=...)` in both processes: from a `jaxlens convert` checkpoint
each process reads only the slices its own devices hold, each once; from a Hugging Face folder it reads each
tensor whole, once; the gathered logits equal the unsharded single-process model's. "edges": exact
`attribute_edges` splits its items over the global mesh by default and gives the single-process scores.
`record_reads` itself is checked in this process, on the 8 devices of tests/conftest.py.
"""

import json
import math

import jax
import multihost_worker as worker
import numpy as np
import pytest
from safetensors import safe_open

from jaxlens import HookedTransformer, converters, testing
from jaxlens.circuits import attribute_edges
from jaxlens.scale import load_sharded, make_mesh, record_reads

# tiny random models: gpt2 split 8 ways over `model`; llama (GQA) 4 ways over `model`, FSDP over `data`
HF = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=97, n_embd=32, n_layer=2, n_head=8, n_positions=32)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, intermediate_size=40, max_position_embeddings=32)),
}
# by hand, from the rule table and the meshes of worker.LOAD_CASES: the tensors split between the two
# processes, and the axis split. Process p holds global devices 4p .. 4p+3: gpt2 (mesh 1 x 8) `model`
# positions 4p .. 4p+3, so heads and MLP width are halved; llama (mesh 2 x 4) `data` row p, so d_model of
# every matrix is halved.
# Every other tensor (norms, biases outside a split axis, vectors under FSDP) is read whole by each process.
HALVED = {
    "gpt2": {"blocks.attn.W_Q": 1, "blocks.attn.W_K": 1, "blocks.attn.W_V": 1, "blocks.attn.W_O": 1,
             "blocks.attn.b_Q": 1, "blocks.attn.b_K": 1, "blocks.attn.b_V": 1, "blocks.mlp.W_in": 2,
             "blocks.mlp.b_in": 1, "blocks.mlp.W_out": 1},
    "llama": {"blocks.attn.W_Q": 2, "blocks.attn.W_K": 2, "blocks.attn.W_V": 2, "blocks.attn.W_O": 3,
              "blocks.mlp.W_in": 1, "blocks.mlp.W_gate": 1, "blocks.mlp.W_out": 2, "embed.W_E": 1,
              "unembed.W_U": 0},
}


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Per LOAD_CASES name: the HF folder `hf` and its `jaxlens convert` copy `converted`."""
    root = tmp_path_factory.mktemp("ckpt")
    for name, (config_cls, model_cls, kw) in HF.items():
        testing.saved_random_hf_model(root / name / "hf", config_cls, model_cls, 0, 6, **kw)
        cfg, params = converters.load(root / name / "hf")
        converters.save_converted(root / name / "converted", cfg, params)
    return root


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, jax_cache, ckpt):
    """Both processes' outputs: modes "load" and "edges" in one launch."""
    outs = worker.launch(tmp_path_factory.mktemp("load"), jax_cache,
                         ["--mode", "load", "--mode", "edges", "--ckpt", str(ckpt)])
    for out in outs:
        assert int(out["process_count"]) == 2 and int(out["device_count"]) == 8
    return outs


def file_tensors(path) -> dict[str, tuple[tuple[int, ...], int]]:
    """{name: (shape, bytes)} of every tensor in the safetensors files of `path` (read by safetensors)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118
                x = f.get_tensor(name)
                out[name] = (x.shape, x.nbytes)
    return out


def reads_of(out: dict, key: str) -> dict[str, list]:
    by = {}
    for name, region, nbytes in json.loads(str(out[key])):
        by.setdefault(name, []).append((tuple(map(tuple, region)), nbytes))
    return by


@pytest.mark.parametrize("name", sorted(worker.LOAD_CASES))
def test_sharded_logits_equal_the_unsharded_single_process_model(loaded, ckpt, name):
    want = np.asarray(HookedTransformer.from_pretrained(ckpt / name / "hf")(worker.LOAD_TOKENS), np.float64)
    assert want.shape == (2, 6, 97)
    for kind in ("hf", "converted"):
        for p, out in enumerate(loaded):
            got = out[f"{name}_{kind}_logits"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"{name} {kind}, process {p}")


@pytest.mark.parametrize("name", sorted(worker.LOAD_CASES))
def test_converted_each_process_reads_only_its_slices(loaded, ckpt, name):
    tensors = file_tensors(ckpt / name / "converted")
    assert set(HALVED[name]) <= set(tensors)
    for p, out in enumerate(loaded):
        reads = reads_of(out, f"{name}_converted_reads")
        assert sorted(reads) == sorted(tensors), f"process {p}"
        for tensor, (shape, nbytes) in tensors.items():
            regions = [r for r, _ in reads[tensor]]
            assert len(set(regions)) == len(regions), f"process {p} read a slice of {tensor} twice"
            got = sum(n for _, n in reads[tensor])
            if tensor not in HALVED[name]:
                assert got == nbytes, f"process {p}, {tensor}: {got} of {nbytes} bytes"
                continue
            assert got == nbytes // 2, f"process {p}, {tensor}: {got} of {nbytes} bytes, not half"
            axis, half = HALVED[name][tensor], shape[HALVED[name][tensor]] // 2
            for region in regions:  # inside this process's half of the split axis
                start, stop = region[axis]
                assert p * half <= start < stop <= (p + 1) * half, (p, tensor, region)
    total = sum(n for _, n in tensors.values())
    halved = sum(tensors[t][1] for t in HALVED[name])
    for out in loaded:  # what one process read in all: the halved tensors count half
        read = sum(n for entries in reads_of(out, f"{name}_converted_reads").values() for _, n in entries)
        assert read == total - halved // 2 and halved > total / 2


@pytest.mark.parametrize("name", sorted(worker.LOAD_CASES))
def test_hf_folder_each_process_reads_each_tensor_whole_once(loaded, ckpt, name):
    """The family converters need whole tensors: each process reads every tensor once (and keeps its
    slices; the logits test checks what they hold)."""
    tensors = file_tensors(ckpt / name / "hf")
    for p, out in enumerate(loaded):
        reads = reads_of(out, f"{name}_hf_reads")
        assert sorted(reads) == sorted(tensors), f"process {p}"
        for tensor, (shape, nbytes) in tensors.items():
            assert reads[tensor] == [(tuple((0, d) for d in shape), nbytes)], (p, tensor)


def test_attribute_edges_default_mesh_spans_both_processes(loaded):
    model, clean, corrupted = worker.edges_problem()
    totals = []
    graph = attribute_edges(model, clean, corrupted, worker.metric, method="exact",
                            chunk_size=worker.EDGE_CHUNK, on_chunk=lambda done, total: totals.append(total))
    want = graph.scores
    n_items = len(want) + 1  # every edge and the unpatched baseline
    assert totals[-1] == math.ceil(n_items / 8) == 4  # chunks of 8: EDGE_CHUNK rounded up to the 8 devices
    assert np.ptp(want) > 1e-3 and np.isfinite(want).all()
    for p, out in enumerate(loaded):
        # split over the 4 local devices instead, the chunks would hold 4 items: 8 chunks
        assert int(out["exact_chunks"]) == totals[-1], f"process {p} split the items over its own devices"
        np.testing.assert_allclose(out["exact"], want, rtol=1e-5, atol=1e-6 * np.abs(want).max(),
                                   err_msg=f"process {p}")


# -- record_reads in one process -----------------------------------------------------------------------------
def test_record_reads_one_read_per_distinct_slice(ckpt):
    """Mesh 2 x 4 without FSDP: each W_Q slice (a quarter of the heads) sits on two devices, read once."""
    path = ckpt / "gpt2" / "converted"
    with record_reads() as log:
        cfg, params = load_sharded(path, make_mesh(data=2, model=4))
    W_Q = [(region, n) for name, region, n in log.entries if name == "blocks.attn.W_Q"]
    shape = params["blocks"]["attn"]["W_Q"].shape  # [layer head d_model d_head], 8 heads
    assert sorted(r[1] for r, _ in W_Q) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert {n for _, n in W_Q} == {math.prod(shape) * 4 // 4}  # a quarter of the float32 tensor
    assert log.by_tensor()["blocks.ln1.w"] == cfg.n_layers * cfg.d_model * 4  # replicated: read once
    assert log.bytes == sum(n for _, _, n in log.entries)
    n = len(log.entries)
    load_sharded(path, make_mesh(model=8))
    assert len(log.entries) == n  # nothing is recorded after the `with record_reads()` block


def test_record_reads_in_memory_model_counts_whole_leaves():
    hf = testing.random_hf_model(*HF["gpt2"][:2], seed=0, **HF["gpt2"][2])
    with record_reads() as log:
        _, params = load_sharded(hf, make_mesh(model=8))
    leaves = {".".join(str(k.key) for k in path): x.size * 4
              for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert log.by_tensor() == leaves  # converted whole on the host: every leaf, whole, once
