"""SmolLM2's outlier positions and a TopK SAE at layer 15: trained and evaluated with and without leaving out
the special-token and huge-norm positions, same seed, same data order, same activations.

    nice -n 5 python benchmarks/bench_sae_outliers.py --tokens 49152 --eval-rows 32

Two `train_sae` runs (the `jaxlens train-sae` pipeline, the notebook's full shape: d_sae 4608, k 32, context
128, batch 1024, lr 1e-3 with 10 warm-up steps, SAELens 6's TopK decoder handling): one leaving out only the
BOS position of each row, one also leaving out the special tokens (`exclude_special_tokens`: SmolLM2's BOS/EOS
id, which also separates documents inside rows) and positions above `--norm-ratio` times the buffer's median
norm. Both use the same explicit shuffle buffer, so their buffers hold the same rows and the model's forward
of each buffer is computed once and shared (a memo around `store.activations`; the exclusions then filter it).
Each SAE is evaluated on held-out text (the Jargon File, rows spread over the whole file) twice: leaving out
only BOS positions, and leaving out the same kinds of positions as the excluding run. A norm survey of the
training activations (median, quantiles, the largest norms and their tokens) comes first.

Writes benchmarks/results/sae_outliers.json. With `--compare decoder` the two runs both leave the positions
out and differ only in the TopK decoder handling: SAELens 6's (pre-activations rescaled by the decoder norms,
rows left free, norms folded in at save; the default) against unit-norm rows renormalised after every step
(`normalise_decoder=True, rescale_acts_by_decoder_norm=False`, jaxlens's recipe before 2026-12-02); written
to benchmarks/results/sae_decoder_ab.json.

    nice -n 5 python benchmarks/bench_sae_outliers.py --compare decoder --tokens 65536 --eval-rows 16
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HOOK = "blocks.15.hook_resid_post"
RESULTS = Path(__file__).parent / "results" / "sae_outliers.json"
KEYS = ("explained_variance", "fvu", "mse", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_with_dictionary",
        "ce_loss_zero_ablation", "ce_loss_recovered", "ce_loss_increase", "kl_div_score", "tokens",
        "excluded_bos_position", "excluded_special_tokens", "excluded_high_norm")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=49_152)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--norm-ratio", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sae_outliers")
    p.add_argument("--results", type=Path, default=None, help="default: results/sae_outliers.json "
                   "(sae_decoder_ab.json with --compare decoder)")
    p.add_argument("--compare", choices=("exclusions", "decoder"), default="exclusions")
    a = p.parse_args()
    a.results = a.results or RESULTS.with_name("sae_decoder_ab.json" if a.compare == "decoder"
                                               else RESULTS.name)

    import jax

    from jaxlens import _atomic
    from jaxlens.dictionaries import store as store_mod
    from jaxlens.dictionaries.evals import evaluate
    from jaxlens.dictionaries.formats_saelens import load_saelens
    from jaxlens.dictionaries.train_sae import TrainSaeSettings, load_model_and_text, train_sae

    memo: dict[bytes, dict] = {}
    plain = store_mod.activations

    def shared(params, cfg, tokens, hooks, stop, exclude_bos, dtype):
        if isinstance(tokens, jax.core.Tracer):  # the store's shape probe
            return plain(params, cfg, tokens, hooks, stop, exclude_bos, dtype)
        key = np.asarray(tokens).tobytes() + repr((hooks, stop, exclude_bos)).encode()
        if key not in memo:
            memo[key] = plain(params, cfg, tokens, hooks, stop, exclude_bos, dtype)
        return memo[key]

    store_mod.activations = shared  # both runs read the same rows: one forward per row block
    t0 = time.perf_counter()
    base = dict(model="smollm2-135m", hook=HOOK, architecture="topk", d_sae=4608, k=32, tokens=a.tokens,
                context_size=128, batch_size=1024, buffer_sequences=24, lr=1e-3, lr_warm_up_steps=10,
                checkpoint_every=16, eval_sequences=a.eval_rows, seed=0)
    excluding = dict(base, exclude_special_tokens=True, exclude_norm_ratio=a.norm_ratio)
    if a.compare == "decoder":
        runs = {"excluded": TrainSaeSettings(**excluding),
                "excluded_unit_norm_decoder": TrainSaeSettings(**excluding, normalise_decoder=True,
                                                               rescale_acts_by_decoder_norm=False)}
    else:
        runs = {"bos_only": TrainSaeSettings(**base), "excluded": TrainSaeSettings(**excluding)}
    model, train_text, held_out = load_model_and_text(runs["bos_only"], "bench")
    ids = store_mod.special_token_ids(model.tokenizer)
    survey = _survey(model, train_text, store_mod)
    print("norm survey:", survey, flush=True)
    out: dict = {"machine": cpu_model(), "load_average_start": os.getloadavg(), "hook": HOOK,
                 "compare": a.compare,
                 "settings": {k: v for k, v in base.items()}, "norm_ratio": a.norm_ratio,
                 "special_token_ids": list(ids), "norm_survey": survey, "runs": {}}
    for name, s in runs.items():
        t = time.perf_counter()
        m = train_sae(s, a.out / name, progress=False)
        print(name, {k: m.get(k) for k in KEYS}, m["train_excluded"], f"{time.perf_counter() - t:.0f} s",
              flush=True)
        out["runs"][name] = {"train_excluded": m["train_excluded"], "train_seconds": m["seconds"],
                             "eval": {}}
        sae = load_saelens(a.out / name)
        for ev, kw in (("bos_only", {}), ("excluded", dict(exclude_token_ids=ids,
                                                            exclude_norm_ratio=a.norm_ratio))):
            mine = ev == name.split("_unit_norm")[0]
            em = m if mine else evaluate(sae, model.params, model.cfg, held_out, context_size=128,
                                         n_sequences=a.eval_rows, **kw)
            if mine:
                em = dict(em, tokens=em["eval_tokens"])
            out["runs"][name]["eval"][ev] = {k: em[k] for k in KEYS}
            print(f"  eval {ev}:", out["runs"][name]["eval"][ev], flush=True)
            _atomic.write_json(a.results, out)
    out["seconds"] = time.perf_counter() - t0
    out["load_average_end"] = os.getloadavg()
    _atomic.write_json(a.results, out)
    print("wrote", a.results)
    return 0


def _survey(model, corpus, store_mod, n_rows: int = 48) -> dict:
    """Norms at the hook over the first buffer's rows of the training text (BOS row starts left out)."""
    import jax.numpy as jnp

    rows = corpus.sequences(128, np.arange(n_rows))
    acts = store_mod.activations(model.params, model.cfg, jnp.asarray(rows), (HOOK,), 16, True, jnp.float32)
    norms = np.linalg.norm(np.asarray(acts[HOOK]), axis=-1)
    toks = rows[:, 1:].reshape(-1)
    top = np.argsort(-norms)[:8]
    median = float(np.median(norms))
    return {"positions": int(norms.size), "median": median,
            "quantiles": {q: float(np.quantile(norms, q)) for q in (0.5, 0.9, 0.99, 0.999)},
            "above_10x_median": int((norms > 10 * median).sum()),
            "bos_id_positions_in_rows": int((toks == corpus.bos).sum()),
            "largest": [(float(norms[i]), int(toks[i])) for i in top]}


if __name__ == "__main__":
    sys.exit(main())
