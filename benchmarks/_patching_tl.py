"""TransformerLens baselines of `bench_patching.py`: TL 4.3's own head x position sweep, a savvy user's
hand-batched loop (many patches per forward, through hooks), and the real SmolLM2 loaded into TL.

The hand-batched loop is what a TransformerLens user writes to beat `get_act_patch_attn_head_out_by_pos`:
the corrupted prompt repeated `batch` times, one forward per `batch` cells, a hook on `blocks.<l>.attn.hook_z`
that writes the clean value of row i's (position, head) into row i, and the metric read per row:

    for cells in batches_of_64(grid):           # cells of one layer (192 per layer: 3 forwards)
        logits = model.run_with_hooks(corrupted.repeat(64, 1), fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])
        values = logits[:, -1, answer] - logits[:, -1, wrong]
"""

import numpy as np
from _sweep_analysis import ANSWER, WRONG, timed


class _Stop(Exception):
    pass


def tl_sweep_cells(br, corrupted, clean_cache, n_cells: int, answer: int = ANSWER, wrong: int = WRONG):
    """Run TL's get_act_patch_attn_head_out_by_pos until n_cells cells are done: (values, wall s, CPU s)."""
    import torch
    from transformer_lens import patching as tlp

    vals = []

    def tl_metric(logits):
        v = (logits[:, -1, answer] - logits[:, -1, wrong]).mean()
        vals.append(float(v.detach()))
        if len(vals) >= n_cells:
            raise _Stop
        return v

    toks = torch.as_tensor(np.asarray(corrupted), dtype=torch.long)

    def go():
        try:
            with torch.no_grad():
                tlp.get_act_patch_attn_head_out_by_pos(br, toks, clean_cache, tl_metric)
        except _Stop:
            pass

    _, w, c = timed(go)
    if len(vals) != n_cells:
        raise RuntimeError(f"TL ran {len(vals)} cells, expected {n_cells}")
    return np.asarray(vals), w, c


def tl_hand_batched(br, corrupted, clean_cache, n_forwards: int, batch: int = 64, answer: int = ANSWER,
                    wrong: int = WRONG):
    """The first `n_forwards` forwards of the hand-batched loop (row-major cells: layer, pos, head), each
    patching `batch` cells of one layer at once: (values [n_forwards * batch], wall s, CPU s)."""
    import torch

    L, H = br.cfg.n_layers, br.cfg.n_heads
    toks = torch.as_tensor(np.asarray(corrupted), dtype=torch.long)
    P = toks.shape[1]
    cells = [(l, p, h) for l in range(L) for p in range(P) for h in range(H)][: n_forwards * batch]
    rows = toks.repeat(batch, 1)

    def hook_for(items, clean_z):
        i, p, h = (torch.tensor(col) for col in zip(*items, strict=True))

        def hook(z, hook):
            z = z.clone()
            z[i, p, h] = clean_z[0, p, h].to(z.dtype)
            return z
        return hook

    vals = []

    def go():
        with torch.no_grad():
            for s in range(0, len(cells), batch):
                chunk = cells[s:s + batch]
                by_layer = {}
                for i, (l, p, h) in enumerate(chunk):
                    by_layer.setdefault(l, []).append((i, p, h))
                hooks = [(f"blocks.{l}.attn.hook_z", hook_for(items, clean_cache[f"blocks.{l}.attn.hook_z"]))
                         for l, items in by_layer.items()]
                logits = br.run_with_hooks(rows[: len(chunk)], fwd_hooks=hooks)
                vals.append((logits[:, -1, answer] - logits[:, -1, wrong]).float().numpy())

    _, w, c = timed(go)
    return np.concatenate(vals), w, c


def smollm2_bridge(threads: int):
    """(TL bridge on the real SmolLM2-135M weights, HF folder) or (None, reason): the packaged GGUF as the
    Hugging Face Llama folder `bench_graphs.hf_folder` caches (built by `bench_graphs.HF_FOLDER`)."""
    import torch
    from bench_graphs import hf_folder
    from transformer_lens.model_bridge import TransformerBridge

    from jaxlens import hub

    torch.set_num_threads(threads)
    folder = hf_folder(hub.resolve("smollm2-135m"))
    if not (folder / "config.json").is_file():
        return None, f"no Hugging Face folder of SmolLM2 at {folder} (run bench_graphs.py once to build it)"
    br = TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)
    br.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    br.eval()
    return br, str(folder)
