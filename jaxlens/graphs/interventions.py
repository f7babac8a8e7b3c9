"""Feature interventions in the real model, and the check of a graph against them (Ameisen et al. 2025,
"Circuit Tracing", section "Validating the graph: interventions"; circuit-tracer 0.5
`ReplacementModel.feature_intervention`).

Every MLP is replaced by its transcoder plus the error term, recomputed at each forward: the MLP output
becomes mlp(x) + (a' - a(x)) W_dec, a(x) the features of the current input and a' the edited ones, so with
no edit the model computes exactly what it computes without transcoders, and an edit changes only the
features it names (a cross-layer feature writes every later layer). With `freeze=True` (circuit-tracer's
constrained mode) attention patterns, norm scales, the error terms and every other feature are held at their
clean values; the model is then the graph's frozen, linear model, and setting a feature from a to a' changes
every later pre-activation and demeaned logit by (a' - a) / a times the graph's column of that feature.

    out = intervene(model, transcoders, "The capital of France is", [FeatureEdit(3, 5, 1234, 0.0)])
    out.logits, out.activations, out.pre_activations       # [1 pos d_vocab], [layer pos d_sae] x2
    check = check_graph(model, transcoders, graph, top=10)  # ablate the 10 most influential features
    print(check.table())                                    # predicted vs measured change of the top logit

It is the block runner (`jaxlens.model.runner.run_blocks_carried`) with interventions at the transcoders'
input and output hooks, the decoded change of the edited features carried from the first to the second (and,
for a cross-layer transcoder, to every later layer); the transcoder set and its hooks are the replacement
model's (`replacement.py`).
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.dictionaries.transcoder import activate
from jaxlens.errors import InputError
from jaxlens.graphs.attribute import prompt_tokens
from jaxlens.graphs.prune import compute_influence, logit_weights, normalize_matrix
from jaxlens.graphs.replacement import (
    TranscoderSet,
    _clt_decoder,
    _input_transform,
    _mlp_input,
    _norm_scales,
    embedding,
    encode,
    transcoder_set,
)
from jaxlens.interventions import HookPoint, Patch
from jaxlens.model import runner
from jaxlens.model.attention import Context
from jaxlens.model.forward import final_logits
from jaxlens.model.hooks import Hooks

# einsum letters: n=edit l=layer o=layer (output) p=pos i=d_in f=d_sae d=d_model k=ablation

OPS = ("set", "scale", "add")


@dataclasses.dataclass(frozen=True)
class FeatureEdit:
    """One feature edit: at (layer, pos, feature), set the activation to `value`, scale it by `value`, or
    add `value` to it (`op`). A negative `pos` counts from the end."""

    layer: int
    pos: int
    feature: int
    value: float
    op: str = "set"


class InterventionResult(NamedTuple):
    """What `intervene` returns (numpy): logits [1 pos d_vocab]; activations [layer pos d_sae], the features
    as the model used them (edited; frozen ones at their clean values); pre_activations [layer pos d_sae],
    every feature's encoder pre-activation from its input in this run."""

    logits: np.ndarray
    activations: np.ndarray
    pre_activations: np.ndarray


@dataclasses.dataclass
class GraphCheck:
    """What `check_graph` returns: for each of the graph's `top` most influential features, zero-ablated in
    the real model, the predicted and measured change of the top logit (demeaned, last position).

    Attributes:
        logit_token: the vocabulary id of the top logit node.
        nodes: [k] the features' node indices in the graph; features: [k 3] their (layer, pos, feature).
        activations: [k]; influence: [k] their influence on the logits (as pruning ranks nodes).
        predicted_direct: [k] minus the feature's edge to the logit (the direct effect).
        predicted: [k] the graph's total effect: the ablation propagated through the graph's feature nodes,
            each active feature answering linearly to its pre-activation (errors and tokens fixed).
        measured_frozen: [k] the change in the frozen model (`intervene(..., freeze=True)`): equals
            predicted_direct up to rounding.
        measured: [k] the change in the real model.
    """

    logit_token: int
    logit_string: str
    nodes: np.ndarray
    features: np.ndarray
    activations: np.ndarray
    influence: np.ndarray
    predicted_direct: np.ndarray
    predicted: np.ndarray
    measured_frozen: np.ndarray
    measured: np.ndarray

    def summary(self) -> dict[str, float]:
        """Sign agreement (the fraction of features whose predicted and measured changes have one sign) and
        Pearson correlation of measured against predicted, for the total and the direct prediction (nan for
        fewer than two features or a constant column)."""
        return {"sign_agreement": _sign_agreement(self.predicted, self.measured),
                "correlation": _correlation(self.predicted, self.measured),
                "sign_agreement_direct": _sign_agreement(self.predicted_direct, self.measured),
                "correlation_direct": _correlation(self.predicted_direct, self.measured)}

    def table(self) -> str:
        """The features and their changes as a text table, with the summary."""
        head = (f"ablating each feature, change of the top logit {self.logit_string!r} (demeaned):\n"
                f"{'layer':>5} {'pos':>4} {'feature':>8} {'act':>8} {'influence':>9} {'direct':>9} "
                f"{'graph':>9} {'frozen':>9} {'real':>9}")
        rows = [f"{l:>5} {p:>4} {f:>8} {a:>8.3f} {i:>9.4f} {d:>9.4f} {g:>9.4f} {z:>9.4f} {m:>9.4f}"
                for (l, p, f), a, i, d, g, z, m in zip(
                    self.features.tolist(), self.activations, self.influence, self.predicted_direct,
                    self.predicted, self.measured_frozen, self.measured, strict=True)]
        s = self.summary()
        tail = (f"sign agreement {s['sign_agreement']:.2f} (direct {s['sign_agreement_direct']:.2f}), "
                f"correlation {s['correlation']:.3f} (direct {s['correlation_direct']:.3f})")
        return "\n".join([head, *rows, tail])


def intervene(model, transcoders, prompt, edits: Sequence, *,
              freeze: bool = False) -> InterventionResult:
    """Run `prompt` with the features `edits` names edited (see the module docstring).

    Args:
        model: a decoder HookedTransformer, loaded as the transcoders were trained.
        transcoders: {layer: Transcoder}, a CrossLayerTranscoder, or a circuit-tracer path (as `attribute`).
        prompt: a string or token ids, tokenised as `attribute` does (a special token prepended).
        edits: FeatureEdits, or (layer, pos, feature, value) tuples (set, as circuit-tracer's); at most one
            per (layer, pos, feature). Edits at one layer see the features that earlier edits produced.
        freeze: hold attention patterns, norm scales, error terms and the unedited features at their clean
            values (the graph's frozen model); False: the real model, every effect propagating.

    Returns:
        InterventionResult (logits, activations, pre_activations).

    Raises:
        TranscoderError: transcoders that do not fit the model.
        InputError: a bad prompt, or an edit outside the model (layer, position, feature), with an unknown
            op, a non-finite value, or twice at one feature.
    """
    cfg, params = model.cfg, model.params
    ts = transcoder_set(transcoders, cfg)
    tokens = jnp.asarray(prompt_tokens(model, prompt), jnp.int32)[None]
    arrays = edit_arrays(edits, cfg.n_layers, tokens.shape[1], ts.d_sae)
    logits, acts, pre = _intervene_jit(params, cfg, ts, tokens, arrays, freeze=bool(freeze))
    return InterventionResult(np.asarray(logits), np.asarray(acts), np.asarray(pre))


def check_graph(model, transcoders, graph, top: int = 10, *, batch_size: int = 8) -> GraphCheck:
    """Zero-ablate each of the graph's `top` most influential features in the real model and compare the
    change of the top logit with the graph's prediction (issue 11, item 5; see `GraphCheck`).

    Args:
        model, transcoders: those the graph was built with (`attribute`).
        graph: an AttributionGraph.
        top: how many features, most influential on the logits first.
        batch_size: ablations run together (vmapped).

    Returns:
        A GraphCheck.

    Raises:
        InputError: `top` outside [1, graph.n_features], or a graph of another model or transcoder set.
    """
    cfg, params = model.cfg, model.params
    ts = transcoder_set(transcoders, cfg)
    if not isinstance(top, int | np.integer) or not 1 <= top <= graph.n_features:
        raise InputError(f"top={top!r} must be an int in [1, {graph.n_features}] (the graph's feature "
                         "nodes).")
    if graph.n_layers != cfg.n_layers or graph.vocab_size != cfg.d_vocab:
        raise InputError(f"The graph has {graph.n_layers} layers and a vocabulary of {graph.vocab_size}; the "
                         f"model has {cfg.n_layers} and {cfg.d_vocab}. Check the graph against the model it "
                         "was built on.")
    feats = graph.active_features[graph.selected_features]
    if len(feats) and feats[:, 2].max() >= ts.d_sae:
        raise InputError(f"The graph has feature {int(feats[:, 2].max())}, but the transcoders have "
                         f"d_sae={ts.d_sae}. Check the graph against the transcoders it was built with.")
    A = np.asarray(graph.adjacency)
    influence = compute_influence(normalize_matrix(A), logit_weights(len(A), graph.logit_probabilities))
    nodes = np.argsort(-influence[:graph.n_features], kind="stable")[:top]
    acts = graph.activation_values[graph.selected_features][nodes]
    row = graph.logit_offset  # the top logit
    tokens = jnp.asarray(graph.tokens, jnp.int32)[None]
    tok = int(graph.logit_tokens[0])
    measured = {}
    for freeze in (True, False):
        out = []
        for i in range(0, top, batch_size):
            chunk = nodes[i:i + batch_size]
            pad = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])
            f = feats[pad]
            batch = EditArrays(*(jnp.asarray(a, jnp.int32)[:, None] for a in (f[:, 0], f[:, 1], f[:, 2])),
                               jnp.zeros((batch_size, 1), jnp.int32), jnp.zeros((batch_size, 1), jnp.float32))
            got = _ablation_jit(params, cfg, ts, tokens, batch, jnp.asarray(tok), freeze=freeze)
            out.append(np.asarray(got)[:len(chunk)])
        measured[freeze] = np.concatenate(out)
    return GraphCheck(
        logit_token=tok, logit_string=str(graph.logit_strings[0]), nodes=nodes, features=feats[nodes],
        activations=acts, influence=influence[nodes], predicted_direct=-A[row, nodes],
        predicted=ablation_effects(graph, nodes)[:, 0], measured_frozen=measured[True],
        measured=measured[False])


def ablation_effects(graph, nodes: np.ndarray) -> np.ndarray:
    """[len(nodes) n_logits] the graph's predicted change of every logit node when each feature node in
    `nodes` is zero-ablated, propagated through the feature nodes: a change d of a source's activation
    (relative d / a_s of its vector) moves a target's pre-activation by A[t, s] d / a_s, and an active feature
    moves its activation by the same amount (slope 1); error and token nodes stay fixed. Solved exactly in
    float64 (the feature block is acyclic, so I - M is invertible)."""
    A = np.asarray(graph.adjacency, np.float64)
    nf = graph.n_features
    a = np.asarray(graph.activation_values, np.float64)[graph.selected_features]
    M = A[:nf, :nf] / np.where(a == 0, 1.0, a)[:, None]
    rhs = np.zeros((nf, len(nodes)))
    rhs[np.asarray(nodes), np.arange(len(nodes))] = -1.0
    rel = np.linalg.solve(np.eye(nf) - M, rhs)  # relative changes of every feature's vector
    return (A[graph.logit_offset:, :nf] @ rel).T


# -- edits as data -------------------------------------------------------------------------------------------
class EditArrays(NamedTuple):
    """Edits as arrays [n]: layer, pos, feature, op (index into OPS), value."""

    layer: jax.Array
    pos: jax.Array
    feature: jax.Array
    op: jax.Array
    value: jax.Array


def edit_arrays(edits: Sequence, n_layers: int, n_pos: int, d_sae: int) -> EditArrays:
    """`edits` checked against the model and prompt, as EditArrays.

    Raises:
        InputError: see `intervene`.
    """
    rows = []
    for e in edits:
        if isinstance(e, tuple) and len(e) == 4:
            e = FeatureEdit(*e)
        if not isinstance(e, FeatureEdit):
            raise InputError(f"An edit must be a FeatureEdit or a (layer, pos, feature, value) tuple; found "
                             f"{e!r}.")
        where = f"The edit {e}"
        for name, n in (("layer", n_layers), ("feature", d_sae)):
            v = getattr(e, name)
            if not isinstance(v, int | np.integer) or not 0 <= v < n:
                raise InputError(f"{where} has {name}={v!r}; it must be an int in [0, {n}).")
        if not isinstance(e.pos, int | np.integer) or not -n_pos <= e.pos < n_pos:
            raise InputError(f"{where} has pos={e.pos!r}; the prompt has {n_pos} tokens (the special token "
                             f"first), so pos must be an int in [-{n_pos}, {n_pos}).")
        if e.op not in OPS:
            raise InputError(f"{where} has op={e.op!r}; it must be one of {', '.join(OPS)}.")
        if not np.isfinite(float(e.value)):
            raise InputError(f"{where} has a non-finite value {e.value!r}; give a finite number.")
        rows.append((int(e.layer), int(e.pos) % n_pos, int(e.feature), OPS.index(e.op), float(e.value)))
    keys = [r[:3] for r in rows]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise InputError(f"Two edits of feature {dup[2]} at layer {dup[0]}, position {dup[1]}; give one edit "
                         "per feature (combine a scale and an add into a set).")
    # padded to a power of two (at least 8) with edits at layer n_layers, which no layer applies: one
    # compiled program serves every number of edits up to that size
    rows += [(n_layers, 0, 0, 0, 0.0)] * (max(8, 1 << (len(rows) - 1).bit_length()) - len(rows))
    cols = list(zip(*rows, strict=True))
    ints = [jnp.asarray(np.asarray(c, np.int64), jnp.int32) for c in cols[:4]]
    return EditArrays(*ints, jnp.asarray(np.asarray(cols[4], np.float64), jnp.float32))


# -- the edited forward --------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EditFeatures:
    """At a transcoder's input hook: encode the input (or, frozen, take the clean features), apply the edits
    of this layer, and add the decoded change (plus, frozen, the change of the skip term) to the carried
    [layer 1 pos d_model] output changes. The activation is unchanged."""

    edits: EditArrays
    clean_values: jax.Array  # [n] the edited features' clean activations
    W_enc: jax.Array
    b_enc: jax.Array
    threshold: jax.Array | None
    W_dec: jax.Array  # [d_sae d_model] or, cross-layer, [d_sae layer d_model]
    W_skip: jax.Array | None
    scale: jax.Array
    shift: jax.Array
    clean_input: jax.Array | None  # [1 pos d_model] frozen: the clean transcoder input
    dcfg: Any = dataclasses.field(metadata=dict(static=True))
    is_intervention: ClassVar[bool] = True
    uses_carry: ClassVar[bool] = True

    def __call__(self, x: jax.Array, hook: HookPoint, carry: jax.Array) -> tuple[jax.Array, jax.Array]:
        e, layer = self.edits, hook.layer()
        x_in = _mlp_input(x, self.scale, self.shift).astype(jnp.float32)
        if self.clean_input is None:
            h = jnp.einsum("bpi,if->bpf", x_in, self.W_enc) + self.b_enc
            cur = activate(self.dcfg, h, self.threshold)[0, e.pos, e.feature]
        else:
            cur = self.clean_values
        d = jnp.where(e.layer == layer, _apply(e, cur) - cur, 0.0)
        n_pos = x.shape[1]
        if self.W_dec.ndim == 2:
            own = jnp.zeros((n_pos, x.shape[2]), jnp.float32).at[e.pos].add(
                d[:, None] * self.W_dec[e.feature])
            carry = carry.at[layer].add(own[None])
        else:
            later = (jnp.arange(self.W_dec.shape[1]) >= layer).astype(jnp.float32)
            rows = jnp.einsum("n,nod,o->ond", d, self.W_dec[e.feature], later)
            carry = carry + jnp.zeros(carry.shape[:1] + (n_pos, x.shape[2]), jnp.float32).at[:, e.pos].add(
                rows)[:, None]
        if self.clean_input is not None and self.W_skip is not None:
            skip = jnp.einsum("bpi,di->bpd", x_in - self.clean_input, self.W_skip)
            carry = carry.at[layer].add(skip)
        return x, carry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AddCarried:
    """At the MLP output: this layer's carried change added to the output (frozen: to the clean output)."""

    clean: jax.Array | None
    is_intervention: ClassVar[bool] = True
    uses_carry: ClassVar[bool] = True

    def __call__(self, x: jax.Array, hook: HookPoint, carry: jax.Array) -> tuple[jax.Array, jax.Array]:
        base = x if self.clean is None else self.clean.astype(x.dtype)
        return base + carry[hook.layer()].astype(x.dtype), carry


def _forward(params, cfg, ts: TranscoderSet, tokens, edits: EditArrays, clean: dict | None):
    """(logits [1 pos d_vocab], {"recorded": {relative name: [layer 1 ...], "ln_final.hook_scale": ...},
    "inputs": the transcoder inputs [layer pos d_model]}): the model with `edits`, frozen at `clean` (what
    an unedited run returns) unless None."""
    L, n_pos = cfg.n_layers, tokens.shape[1]
    scale, shift = _input_transform(params, cfg, ts)
    read_at = "ln2.hook_normalized" if ts.input_hook == "mlp.hook_in" else ts.input_hook
    W_dec = _clt_decoder(ts) if ts.kind == "clt" else ts.W_dec
    if clean is None:
        clean_values, clean_input = jnp.zeros(edits.value.shape, jnp.float32), None
    else:
        acts = encode(ts, clean["inputs"])
        clean_values = acts.at[edits.layer, edits.pos, edits.feature].get(mode="clip")
        clean_input = clean["inputs"][:, None]
        clean = clean["recorded"]
    frozen = [] if clean is None else ["attn.hook_pattern", *_norm_scales(cfg)]
    stacked = {name: [Patch(clean[name])] for name in frozen}
    stack = lambda a: jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (L,) + jnp.shape(v)), a)  # noqa: E731
    edit = EditFeatures(stack(edits), stack(clean_values), ts.W_enc, ts.b_enc[:, None, None],
                        None if ts.threshold is None else ts.threshold[:, None, None], W_dec,
                        ts.W_skip, scale[:, None, None], shift[:, None, None], clean_input, dcfg=ts.dcfg)
    stacked[read_at] = stacked.get(read_at, []) + [edit]
    stacked["hook_mlp_out"] = [AddCarried(None if clean is None else clean["hook_mlp_out"])]
    ctx = Context(positions=jnp.arange(n_pos)[None], key_valid=None, offset=0)
    carry = jnp.zeros((L, 1, n_pos, cfg.d_model), jnp.float32)
    record = frozenset({read_at, "hook_mlp_out", "attn.hook_pattern", *_norm_scales(cfg)})
    resid, rec, _, _ = runner.run_blocks_carried(
        params["blocks"], cfg, embedding(params, cfg, tokens), ctx, runner.BlockInterventions(stacked, {}),
        start=0, stop=L, cache=record, carry=carry)
    top_name = "ln_final.hook_scale"
    here = {} if clean is None or top_name not in clean else {top_name: [Patch(clean[top_name])]}
    top = Hooks(here=here, names_to_cache=frozenset({top_name}))
    logits = final_logits(params, cfg, resid, top)
    inputs = _mlp_input(rec[read_at][:, 0], scale[:, None], shift[:, None]).astype(jnp.float32)
    return logits, {"recorded": {**rec, **top.cache}, "inputs": inputs}


def _clean(params, cfg, ts, tokens):
    no_edits = EditArrays(*(jnp.zeros((0,), jnp.int32) for _ in range(4)), jnp.zeros((0,), jnp.float32))
    return _forward(params, cfg, ts, tokens, no_edits, None)[1]


def _edited(params, cfg, ts, tokens, edits, freeze):
    clean = _clean(params, cfg, ts, tokens) if freeze else None
    logits, rec = _forward(params, cfg, ts, tokens, edits, clean)
    h = jnp.einsum("lpi,lif->lpf", rec["inputs"], ts.W_enc) + ts.b_enc[:, None]
    base = encode(ts, clean["inputs"]) if freeze else encode(ts, rec["inputs"])
    e = edits
    cur = base.at[e.layer, e.pos, e.feature].get(mode="clip")
    return logits, base.at[e.layer, e.pos, e.feature].set(_apply(e, cur), mode="drop"), h


@functools.partial(jax.jit, static_argnames=("cfg", "freeze"))
def _intervene_jit(params, cfg, ts, tokens, edits, *, freeze):
    return _edited(params, cfg, ts, tokens, edits, freeze)


@functools.partial(jax.jit, static_argnames=("cfg", "freeze"))
def _ablation_jit(params, cfg, ts, tokens, batch: EditArrays, token, *, freeze):
    """[k] the change of logit `token` (demeaned, last position) under each of the k edit sets."""
    def demeaned(logits):
        last = logits[0, -1]
        return last[token] - last.mean()

    clean = _clean(params, cfg, ts, tokens) if freeze else None
    base = demeaned(_forward(params, cfg, ts, tokens, jax.tree_util.tree_map(lambda a: a[0, :0], batch),
                             clean)[0])
    one = lambda edits: demeaned(_forward(params, cfg, ts, tokens, edits, clean)[0]) - base  # noqa: E731
    return jax.vmap(one)(batch)


def _apply(e: EditArrays, cur: jax.Array) -> jax.Array:
    """The edited values [n] of features whose current values are `cur` [n]."""
    return jnp.where(e.op == 0, e.value, jnp.where(e.op == 1, cur * e.value, cur + e.value))


def _sign_agreement(predicted: np.ndarray, measured: np.ndarray) -> float:
    return float(np.mean(np.sign(predicted) == np.sign(measured))) if len(measured) else float("nan")


def _correlation(predicted: np.ndarray, measured: np.ndarray) -> float:
    if len(measured) < 2 or np.std(predicted) == 0 or np.std(measured) == 0:
        return float("nan")
    return float(np.corrcoef(predicted, measured)[0, 1])
