"""What the TransformerLens comparisons share: booting TL 4.3 offline on a saved model, its legacy hook names,
and the fp32 comparison (TL's own policy: differences from 1e-4 up are suspect). Import after
`pytest.importorskip("torch")` and `pytest.importorskip("transformer_lens.model_bridge")`."""

import re

import numpy as np
import torch
from transformer_lens.model_bridge import TransformerBridge

ATOL = 1e-4
#: Bridge-only hook points, with no HookedTransformer (or jaxlens default) counterpart.
BRIDGE_ONLY = re.compile(
    r"(^|\.)(hook_in|hook_out|hook_hidden_states|hook_unembed)$"  # bridge component boundaries
    r"|\.(q|k|v|o|in|out)\.hook_"  # hooks on the bridge's sub-modules (attn.q.hook_out, mlp.in.hook_in, ...)
)


def legacy(names) -> list[str]:
    """The TransformerLens (HookedTransformer) names among a bridge cache's names, in its order."""
    return [n for n in names if not BRIDGE_ONLY.search(n)]


def np_(x) -> np.ndarray:
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def close(got, want, what: str = "", atol: float = ATOL) -> None:
    got, want = np_(got), np_(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != TransformerLens {want.shape}"
    np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=what)


def boot(path, **compat) -> TransformerBridge:
    """TransformerLens 4.3 on a saved HF directory in compatibility mode (`no_processing=True` to skip TL's
    weight processing)."""
    br = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    br.enable_compatibility_mode(disable_warnings=True, **compat)
    return br


def shared_hooks(path, tokens):
    """TransformerLens 4.3 (no processing) and jaxlens (`from_pretrained_no_processing`) on the same saved
    model and tokens, logits compared: (jaxlens cache, TL cache, the legacy TL names jaxlens also caches)."""
    from jaxlens import HookedTransformer

    br = boot(path, no_processing=True)
    with torch.no_grad():
        tl_logits, tc = br.run_with_cache(torch.as_tensor(np.asarray(tokens)))
    logits, jc = HookedTransformer.from_pretrained_no_processing(path).run_with_cache(tokens)
    close(logits, tl_logits, "logits")
    return jc, tc, [n for n in legacy(tc.keys()) if n in jc]
