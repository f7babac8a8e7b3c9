"""Reference environments for the dictionary tests: SAELens 6.x (needs TransformerLens < 4) and circuit-tracer
0.5 (needs transformers <= 4.57.3), each in its own cached venv (`tests/ref_envs.py`)."""

import ref_envs

# sae-lens 6.54.12 beside TransformerLens 3.9, transformers 5.24 and torch 2.13.0 CPU; circuit-tracer 0.5.0
# with transformers 4.57.3 (pip chose transformer-lens 3.2.1, nnsight 0.8.1): full sets in tests/ref_locks/.
SAELENS_STEPS = ref_envs.locked("saelens", ref_envs.TORCH_CPU)
CIRCUIT_TRACER_STEPS = ref_envs.locked("circuit-tracer", ref_envs.TORCH_CPU)


def saelens_python():
    """The SAELens venv's interpreter (built on first use)."""
    return ref_envs.ensure_env("saelens", SAELENS_STEPS)


def circuit_tracer_python():
    """The circuit-tracer venv's interpreter (built on first use)."""
    return ref_envs.ensure_env("circuit-tracer", CIRCUIT_TRACER_STEPS)


#: Run in the SAELens venv: `script WORKDIR`. Builds one SAE of every case below with random weights
#: (torch seed 0), saves it to WORKDIR/saelens/<case> and its outputs on WORKDIR/x.npy to
#: WORKDIR/saelens_<case>.npz; then loads every folder under WORKDIR/jaxlens with `SAE.load_from_disk` and
#: writes its outputs to WORKDIR/jaxlens_<case>.npz (keys: encode, forward, architecture).
SAELENS_CASES = (
    "standard",
    "topk",
    "topk_rescale",
    "jumprelu",
    "batchtopk",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)

SAELENS_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
import torch
from sae_lens import SAE
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.transcoder import (Transcoder, TranscoderConfig, SkipTranscoder, SkipTranscoderConfig,
    JumpReLUTranscoder, JumpReLUTranscoderConfig, JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)

work = Path(sys.argv[1])
meta = json.loads((work / "meta.json").read_text())
d_in, d_sae, d_out, k = meta["d_in"], meta["d_sae"], meta["d_out"], meta["k"]
x = torch.tensor(np.load(work / "x.npy"))
common = dict(d_in=d_in, d_sae=d_sae)
tc = dict(d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False)
cases = {
    "standard": lambda: StandardSAE(StandardSAEConfig(**common)),
    "topk": lambda: TopKSAE(TopKSAEConfig(k=k, **common)),
    "topk_rescale": lambda: TopKSAE(TopKSAEConfig(k=k, rescale_acts_by_decoder_norm=True, **common)),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**common)),
    "batchtopk": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **common)),
    "transcoder": lambda: Transcoder(TranscoderConfig(**tc)),
    "skip_transcoder": lambda: SkipTranscoder(SkipTranscoderConfig(**tc)),
    "jumprelu_transcoder": lambda: JumpReLUTranscoder(JumpReLUTranscoderConfig(**tc)),
    "jumprelu_skip_transcoder": lambda: JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(**tc)),
}

def outputs(sae):
    with torch.no_grad():
        return {"encode": sae.encode(x).numpy(), "forward": sae(x).numpy(),
                "architecture": np.array(sae.cfg.architecture())}

torch.manual_seed(0)
for name, make in cases.items():
    sae = make()
    with torch.no_grad():
        for pname, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.4)
            if "threshold" in pname:
                p.abs_().mul_(0.5)
        if name == "batchtopk":
            sae.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    out = work / "saelens" / name
    if name == "batchtopk":
        sae.save_inference_model(out)
        sae = SAE.load_from_disk(out)  # the saved form (JumpReLU) is what is compared
    else:
        sae.save_model(out)
    np.savez(work / f"saelens_{name}.npz", **outputs(sae))
for folder in sorted((work / "jaxlens").iterdir()):
    np.savez(work / f"jaxlens_{folder.name}.npz", **outputs(SAE.load_from_disk(folder)))
print("ok")
"""


#: Run in the circuit-tracer venv: `script WORKDIR`. Writes random circuit-tracer transcoders with its own
#: `to_safetensors` (a skip JumpReLU per-layer file, a ReLU set, a JumpReLU CLT) under WORKDIR/ct and their
#: outputs on WORKDIR/x.npy ([n d]) and WORKDIR/xs.npy ([layer n d]) to WORKDIR/ct_<name>.npz; loads what
#: jaxlens wrote (WORKDIR/jaxlens/set, WORKDIR/jaxlens/clt) with its loaders;
#: outputs to WORKDIR/jl_<name>.npz.
CIRCUIT_TRACER_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
import torch
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, load_transcoder_set
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt

work = Path(sys.argv[1])
meta = json.loads((work / "meta.json").read_text())
d, f, L = meta["d_in"], meta["d_sae"], meta["n_layers"]
x, xs = torch.tensor(np.load(work / "x.npy")), torch.tensor(np.load(work / "xs.npy"))
cpu, f32 = torch.device("cpu"), torch.float32
torch.manual_seed(0)

def randomise(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.4)
            if "threshold" in name:
                p.abs_().mul_(0.5)
    return m

def plt_out(t):
    with torch.no_grad():
        return {"encode": t.encode(x).numpy(), "forward": t(x).numpy()}

def clt_out(c):
    with torch.no_grad():
        return {"encode": c.encode(xs).numpy(), "forward": c(xs).numpy()}

(work / "ct" / "set").mkdir(parents=True)
skip = randomise(SingleLayerTranscoder(d, f, JumpReLU(torch.zeros(f), 0.1), 2, skip_connection=True,
                                       device=cpu, dtype=f32))
skip.to_safetensors(str(work / "ct" / "plt_skip.safetensors"))
np.savez(work / "ct_plt_skip.npz", **plt_out(skip))
for i in range(L):
    t = randomise(SingleLayerTranscoder(d, f, torch.nn.functional.relu, i, device=cpu, dtype=f32))
    t.to_safetensors(str(work / "ct" / "set" / f"layer_{i}.safetensors"))
    np.savez(work / f"ct_set_{i}.npz", **plt_out(t))
clt = randomise(CrossLayerTranscoder(L, f, d, "jump_relu", lazy_decoder=False, lazy_encoder=False, device=cpu,
                                     dtype=f32))
clt.to_safetensors(str(work / "ct" / "clt"))
np.savez(work / "ct_clt.npz", **clt_out(clt))

mine = work / "jaxlens"
tset = load_transcoder_set({i: str(mine / "set" / f"layer_{i}.safetensors") for i in range(L)}, scan="x",
                           feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out",
                           device=cpu, dtype=f32, lazy_encoder=False, lazy_decoder=False)
for i in range(L):
    np.savez(work / f"jl_set_{i}.npz", **plt_out(tset.transcoders[i]))
np.savez(work / "jl_clt.npz", **clt_out(load_clt(str(mine / "clt"), device=cpu, dtype=f32, lazy_decoder=False,
                                                 lazy_encoder=False)))
print("ok")
"""
