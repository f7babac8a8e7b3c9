"""Activation patching as one compiled computation: general sweeps, TransformerLens's functions, attribution.

    from jaxlens import patching
    grid = patching.get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric)
    kw = dict(hook="attn.hook_z", axes=("layer", "pos", "head"))
    print(patching.plan_sweep(model.params, model.cfg, corrupted_tokens, clean_cache, metric, **kw))
    res = patching.sweep(model.params, model.cfg, corrupted_tokens, clean_cache, metric, **kw)   # PatchResult
    est = patching.attribution_patch(model, corrupted_tokens, clean_cache, metric, "attn_head_out_by_pos")

Modules: `sweeping` (sweep, plan_sweep), `activation` (TransformerLens's names), `attribution`, `result`
(PatchResult), `plan` (cells, windows, chunks, CellStatus), `prepare`, `compute`, `cost`, `logit_reads`.
"""

from jaxlens.patching.activation import generic_activation_patch as generic_activation_patch
from jaxlens.patching.activation import (
    get_act_patch_attn_head_all_pos_every as get_act_patch_attn_head_all_pos_every,
)
from jaxlens.patching.activation import (
    get_act_patch_attn_head_by_pos_every as get_act_patch_attn_head_by_pos_every,
)
from jaxlens.patching.activation import get_act_patch_attn_head_k_all_pos as get_act_patch_attn_head_k_all_pos
from jaxlens.patching.activation import get_act_patch_attn_head_k_by_pos as get_act_patch_attn_head_k_by_pos
from jaxlens.patching.activation import (
    get_act_patch_attn_head_out_all_pos as get_act_patch_attn_head_out_all_pos,
)
from jaxlens.patching.activation import (
    get_act_patch_attn_head_out_by_pos as get_act_patch_attn_head_out_by_pos,
)
from jaxlens.patching.activation import (
    get_act_patch_attn_head_pattern_all_pos as get_act_patch_attn_head_pattern_all_pos,
)
from jaxlens.patching.activation import (
    get_act_patch_attn_head_pattern_by_pos as get_act_patch_attn_head_pattern_by_pos,
)
from jaxlens.patching.activation import (
    get_act_patch_attn_head_pattern_dest_src_pos as get_act_patch_attn_head_pattern_dest_src_pos,
)
from jaxlens.patching.activation import get_act_patch_attn_head_q_all_pos as get_act_patch_attn_head_q_all_pos
from jaxlens.patching.activation import get_act_patch_attn_head_q_by_pos as get_act_patch_attn_head_q_by_pos
from jaxlens.patching.activation import get_act_patch_attn_head_v_all_pos as get_act_patch_attn_head_v_all_pos
from jaxlens.patching.activation import get_act_patch_attn_head_v_by_pos as get_act_patch_attn_head_v_by_pos
from jaxlens.patching.activation import get_act_patch_attn_out as get_act_patch_attn_out
from jaxlens.patching.activation import get_act_patch_block_every as get_act_patch_block_every
from jaxlens.patching.activation import get_act_patch_direct_path as get_act_patch_direct_path
from jaxlens.patching.activation import (
    get_act_patch_direct_path_all_sources as get_act_patch_direct_path_all_sources,
)
from jaxlens.patching.activation import get_act_patch_mlp_out as get_act_patch_mlp_out
from jaxlens.patching.activation import get_act_patch_resid_mid as get_act_patch_resid_mid
from jaxlens.patching.activation import get_act_patch_resid_pre as get_act_patch_resid_pre
from jaxlens.patching.activation import tl_sweep as tl_sweep
from jaxlens.patching.attribution import AttributionReport as AttributionReport
from jaxlens.patching.attribution import attribution_patch as attribution_patch
from jaxlens.patching.attribution import attribution_sweep as attribution_sweep
from jaxlens.patching.attribution import attribution_sweeps as attribution_sweeps
from jaxlens.patching.attribution import compare as compare
from jaxlens.patching.plan import CellStatus as CellStatus
from jaxlens.patching.result import PatchingResult as PatchingResult
from jaxlens.patching.result import PatchResult as PatchResult
from jaxlens.patching.sweeping import Program as Program
from jaxlens.patching.sweeping import SweepPlan as SweepPlan
from jaxlens.patching.sweeping import plan_sweep as plan_sweep
from jaxlens.patching.sweeping import sweep as sweep
