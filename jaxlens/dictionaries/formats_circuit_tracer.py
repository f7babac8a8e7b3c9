"""circuit-tracer transcoder files (circuit-tracer 0.5: `transcoder/single_layer_transcoder.py`,
`cross_layer_transcoder.py`, `utils/hf_utils.py`), read and written with numpy; see
../shared/RESEARCH.md 1.10.

    tcs = load_circuit_tracer("transcoders/")   # {layer: Transcoder} or a CrossLayerTranscoder
    tc = load_circuit_tracer("layer_3.safetensors", layer=3)
    save_circuit_tracer(tcs, "copy/")

Formats. A per-layer transcoder is one safetensors file: `W_enc [d_sae d_model]` (transposed against
SAELens and jaxlens: circuit-tracer encodes with `F.linear`), `b_enc`, `W_dec [d_sae d_model]`, `b_dec`,
optional `activation_function.threshold` (JumpReLU, else ReLU) and `W_skip [d_model d_model]` (skip
x @ W_skip.T). A set is a folder of `layer_{i}.safetensors`, optionally with `config.yaml` (`model_kind:
transcoder_set`, `feature_input_hook`, `feature_output_hook`, `transcoders: [paths]`). A cross-layer
transcoder is a folder of `W_enc_{i}.safetensors` (`W_enc_{i} [d_sae d_model]`, `b_enc_{i}`, `b_dec_{i}`,
optional `threshold_{i}`) and `W_dec_{i}.safetensors` (`W_dec_{i} [d_sae n_layers-i d_model]`).

circuit-tracer's JumpReLU is h * 1[h > threshold] without the ReLU; it equals jaxlens's whenever the
threshold is >= 0 (always after SAELens or circuit-tracer training); a file with a negative threshold is
refused. Hook names are TransformerLens's relative block names (`hook_resid_mid`, `ln2.hook_normalized`,
`hook_mlp_out`; circuit-tracer's `mlp.hook_out` is read as `hook_mlp_out`), placed at `blocks.{layer}.`.
circuit-tracer's `mlp.hook_in` (the MLP's input, after ln2's weights: not `ln2.hook_normalized`, which is
before them) stays `mlp.hook_in`; jaxlens has no such hook, and the attribution-graph replacement model reads
it by applying ln2's weights (`jaxlens.graphs.replacement`).
"""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from jaxlens import _atomic
from jaxlens.converters._checkpoint import read_safetensors, write_safetensors
from jaxlens.dictionaries.base import DictionaryConfig, DictionaryError, init_dictionary
from jaxlens.dictionaries.transcoder import CrossLayerTranscoder, Transcoder

_HOOK_ALIASES = {"mlp.hook_out": "hook_mlp_out"}
_CONFIG_KEYS = frozenset(
    {
        "model_kind",
        "feature_input_hook",
        "feature_output_hook",
        "model_name",
        "transcoders",
        "scan",
        "repo_id",
        "revision",
        "subfolder",
    }
)


def load_circuit_tracer(
    path: str | Path,
    *,
    layer: int | None = None,
    feature_input_hook: str | None = None,
    feature_output_hook: str | None = None,
):
    """A circuit-tracer transcoder file or folder (see the module docstring).

    Args:
        path: a per-layer `.safetensors` file, a transcoder-set folder or a cross-layer-transcoder folder.
        layer: the layer of a single file (for its hook names).
        feature_input_hook, feature_output_hook: relative hook names (default: config.yaml's, else
            circuit-tracer's defaults `hook_resid_mid` -> `hook_mlp_out`).

    Returns:
        a Transcoder (one file), {layer: Transcoder} (a set) or a CrossLayerTranscoder.

    Raises:
        DictionaryError: no transcoder files, missing or mis-shaped tensors, a negative JumpReLU threshold.
        jaxlens.errors.CheckpointError: a corrupt safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise DictionaryError(f"No circuit-tracer transcoder at {path}.")
    conf = _read_config(path / "config.yaml") if path.is_dir() else {}
    hin = feature_input_hook or conf.get("feature_input_hook") or "hook_resid_mid"
    hout = feature_output_hook or conf.get("feature_output_hook") or "hook_mlp_out"
    if path.is_file():
        return _load_plt(path, layer, hin, hout)
    if (path / "W_enc_0.safetensors").is_file() or conf.get("model_kind") == "cross_layer_transcoder":
        return _load_clt(path, hin, hout)
    files = _set_files(path, conf)
    return {i: _load_plt(f, i, hin, hout) for i, f in files.items()}


def save_circuit_tracer(obj, path: str | Path, *, model_name: str | None = None) -> Path:
    """Write a Transcoder (to a `.safetensors` file), a {layer: Transcoder} set or a CrossLayerTranscoder
    (each to a folder with config.yaml) in circuit-tracer's format; files replaced atomically.

    Raises:
        DictionaryError: an object of another kind, a top-k transcoder (circuit-tracer 0.5 reads no
            top-k file).
    """
    path = Path(path)
    if isinstance(obj, Transcoder):
        _write(_plt_tensors(obj), path)
        return path
    if isinstance(obj, dict) and obj and all(isinstance(t, Transcoder) for t in obj.values()):
        first = obj[min(obj)]
        for i, tc in obj.items():
            _write(_plt_tensors(tc), path / f"layer_{i}.safetensors")
        conf = {"model_kind": "transcoder_set", **_hooks_of(first.cfg)}
        if sorted(obj) == list(range(len(obj))):  # a list is read by position: only for layers 0..n-1
            conf["transcoders"] = [f"layer_{i}.safetensors" for i in sorted(obj)]
    elif isinstance(obj, CrossLayerTranscoder):
        for i, (enc, dec) in enumerate(_clt_tensors(obj)):
            _write(enc, path / f"W_enc_{i}.safetensors")
            _write(dec, path / f"W_dec_{i}.safetensors")
        conf = {"model_kind": "cross_layer_transcoder", **_hooks_of(obj.cfg)}
    else:
        raise DictionaryError(
            f"save_circuit_tracer writes a Transcoder, a {{layer: Transcoder}} dict or a "
            f"CrossLayerTranscoder; found {type(obj).__name__}."
        )
    if model_name:
        conf["model_name"] = model_name
    _atomic.write_text(path / "config.yaml", yaml.safe_dump(conf, sort_keys=False))
    return path


# -- reading -------------------------------------------------------------------------------------------------
def _read_config(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        conf = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise DictionaryError(f"{p} is not valid YAML ({e}).") from None
    unknown = sorted(set(conf) - _CONFIG_KEYS)
    if unknown:
        raise DictionaryError(f"{p}: unknown circuit-tracer config key(s) {', '.join(map(repr, unknown))}.")
    return conf


def _set_files(path: Path, conf: dict) -> dict[int, Path]:
    listed = conf.get("transcoders")
    if listed:
        out = {}
        for i, entry in enumerate(listed):
            if isinstance(entry, dict):  # the old format: [{id, layer, filepath}]
                i, entry = int(entry["layer"]), entry["filepath"]
            if str(entry).startswith("hf://"):
                raise DictionaryError(
                    f"{path}/config.yaml lists {entry!r}, a Hugging Face address; jaxlens "
                    f"reads "
                    "local files only (download it and list the local path)."
                )
            p = Path(entry)
            out[i] = p if p.is_absolute() else path / p
        return out
    found = {
        int(m.group(1)): f for f in path.iterdir() if (m := re.fullmatch(r"layer_(\d+)\.safetensors", f.name))
    }
    if not found:
        raise DictionaryError(
            f"{path} holds no circuit-tracer transcoders (layer_<i>.safetensors, or "
            "W_enc_<i>.safetensors for a cross-layer transcoder)."
        )
    return dict(sorted(found.items()))


def _read(p: Path) -> dict[str, np.ndarray]:
    if not p.is_file():
        raise DictionaryError(f"Missing circuit-tracer file {p}.")
    return {k: read() for k, read in read_safetensors(p).items()}


def _take(t: dict, key: str, shape: tuple, where: Path) -> np.ndarray:
    if key not in t:
        raise DictionaryError(f"{where}: tensor {key!r} is missing (found {sorted(t)}).")
    arr = t.pop(key)
    if tuple(arr.shape) != shape:
        raise DictionaryError(f"{where}: tensor {key!r} has shape {tuple(arr.shape)}, expected {shape}.")
    return arr


def _threshold(arr: np.ndarray, where: Path) -> np.ndarray:
    if (arr < 0).any():
        raise DictionaryError(
            f"{where}: a JumpReLU threshold is negative ({arr.min()}); circuit-tracer's "
            "JumpReLU then differs from jaxlens's (which applies a ReLU)."
        )
    return arr


def _load_plt(p: Path, layer: int | None, hin: str, hout: str) -> Transcoder:
    t = _read(p)
    for key in ("b_enc", "b_dec"):
        if key not in t:
            raise DictionaryError(f"{p}: tensor {key!r} is missing; not a circuit-tracer transcoder file.")
    d_sae, d_out = t["b_enc"].shape[0], t["b_dec"].shape[0]
    d_in = t["W_enc"].shape[1] if "W_enc" in t and t["W_enc"].ndim == 2 else d_out
    jump = "activation_function.threshold" in t
    cfg = DictionaryConfig(
        architecture="skip_transcoder" if "W_skip" in t else "transcoder",
        d_in=int(d_in),
        d_sae=int(d_sae),
        d_out=int(d_out),
        activation="jumprelu" if jump else "relu",
        hook_name=_hook(layer, hin),
        hook_name_out=_hook(layer, hout),
    )
    tc = init_dictionary(cfg)
    tc.W_enc[...] = jnp.asarray(_take(t, "W_enc", (d_sae, d_in), p).T)
    tc.b_enc[...] = jnp.asarray(_take(t, "b_enc", (d_sae,), p))
    tc.W_dec[...] = jnp.asarray(_take(t, "W_dec", (d_sae, d_out), p))
    tc.b_dec[...] = jnp.asarray(_take(t, "b_dec", (d_out,), p))
    if jump:
        tc.threshold[...] = jnp.asarray(_threshold(_take(t, "activation_function.threshold", (d_sae,), p), p))
    if "W_skip" in t:
        tc.W_skip[...] = jnp.asarray(_take(t, "W_skip", (d_out, d_in), p))
    if t:
        raise DictionaryError(f"{p}: unexpected tensors {sorted(t)} in a circuit-tracer transcoder file.")
    return tc


def _load_clt(path: Path, hin: str, hout: str) -> CrossLayerTranscoder:
    n = 0
    while (path / f"W_enc_{n}.safetensors").is_file():
        n += 1
    if n == 0:
        raise DictionaryError(f"{path}: no W_enc_0.safetensors; not a circuit-tracer cross-layer transcoder.")
    enc = [_read(path / f"W_enc_{i}.safetensors") for i in range(n)]
    d_sae, d_in = enc[0][f"W_enc_{0}"].shape
    d_out = enc[0]["b_dec_0"].shape[0] if "b_dec_0" in enc[0] else d_in
    jump = "threshold_0" in enc[0]
    cfg = DictionaryConfig(
        architecture="clt",
        n_layers=n,
        d_in=int(d_in),
        d_sae=int(d_sae),
        d_out=int(d_out),
        activation="jumprelu" if jump else "relu",
        hook_name=_hook("{layer}", hin),
        hook_name_out=_hook("{layer}", hout),
    )
    W_enc, b_enc = np.zeros((n, d_in, d_sae), np.float32), np.zeros((n, d_sae), np.float32)
    W_dec, b_dec = np.zeros((n, d_sae, n, d_out), np.float32), np.zeros((n, d_out), np.float32)
    thr = np.zeros((n, d_sae), np.float32)
    for i, t in enumerate(enc):
        where = path / f"W_enc_{i}.safetensors"
        W_enc[i] = _take(t, f"W_enc_{i}", (d_sae, d_in), where).T
        b_enc[i] = _take(t, f"b_enc_{i}", (d_sae,), where)
        b_dec[i] = _take(t, f"b_dec_{i}", (d_out,), where)
        if jump:
            thr[i] = _threshold(_take(t, f"threshold_{i}", (d_sae,), where), where)
        if t:
            raise DictionaryError(f"{where}: unexpected tensors {sorted(t)}.")
        dec_path = path / f"W_dec_{i}.safetensors"
        dec = _read(dec_path)
        W_dec[i, :, i:] = _take(dec, f"W_dec_{i}", (d_sae, n - i, d_out), dec_path)
        if dec:
            raise DictionaryError(f"{dec_path}: unexpected tensors {sorted(dec)}.")
    clt = init_dictionary(cfg)
    clt.W_enc[...], clt.b_enc[...] = jnp.asarray(W_enc), jnp.asarray(b_enc)
    clt.W_dec[...], clt.b_dec[...] = jnp.asarray(W_dec), jnp.asarray(b_dec)
    if jump:
        clt.threshold[...] = jnp.asarray(thr)
    return clt


def _hook(layer, rel: str) -> str:
    rel = _HOOK_ALIASES.get(rel, rel)
    return rel if layer is None else f"blocks.{layer}.{rel}"


# -- writing -------------------------------------------------------------------------------------------------
def _plt_tensors(tc: Transcoder) -> dict[str, np.ndarray]:
    if tc.cfg.activation == "topk":
        raise DictionaryError(
            "circuit-tracer 0.5 reads no top-k transcoder file; save it with save_saelens "
            "or as jaxlens state."
        )
    out = {
        "W_enc": np.asarray(tc.W_enc[...]).T,
        "W_dec": np.asarray(tc.W_dec[...]),
        "b_enc": np.asarray(tc.b_enc[...]),
        "b_dec": np.asarray(tc.b_dec[...]),
    }
    if tc.cfg.activation == "jumprelu":
        out["activation_function.threshold"] = np.asarray(tc.threshold[...])
    if tc.cfg.activation == "batchtopk":  # stored as JumpReLU at its running threshold
        out["activation_function.threshold"] = np.full((tc.cfg.d_sae,), float(tc.topk_threshold[...]))
    if hasattr(tc, "W_skip"):
        out["W_skip"] = np.asarray(tc.W_skip[...])
    return out


def _clt_tensors(clt: CrossLayerTranscoder):
    if clt.cfg.activation == "topk":
        raise DictionaryError("circuit-tracer 0.5 reads no top-k cross-layer transcoder.")
    n = clt.cfg.n_layers
    W_enc, W_dec = np.asarray(clt.W_enc[...]), np.asarray(clt.W_dec[...])
    for i in range(n):
        enc = {
            f"W_enc_{i}": W_enc[i].T,
            f"b_enc_{i}": np.asarray(clt.b_enc[...][i]),
            f"b_dec_{i}": np.asarray(clt.b_dec[...][i]),
        }
        if clt.cfg.activation == "jumprelu":
            enc[f"threshold_{i}"] = np.asarray(clt.threshold[...][i])
        yield enc, {f"W_dec_{i}": W_dec[i, :, i:]}


def _hooks_of(cfg: DictionaryConfig) -> dict[str, str]:
    rel = lambda name: re.sub(r"^blocks\.(\d+|\{layer\})\.", "", name or "")
    return {"feature_input_hook": rel(cfg.hook_name), "feature_output_hook": rel(cfg.hook_name_out)}


def _write(tensors: dict[str, np.ndarray], p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    with _atomic.atomic_path(p) as tmp:
        write_safetensors({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, tmp)
