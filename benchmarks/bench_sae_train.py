"""SAE training on the real SmolLM2: activation-store throughput against the plain forward, trainer
throughput, and the issue's real result (a TopK SAE at blocks.15.hook_resid_post, d_sae 4608, k 32).

    python benchmarks/bench_sae_train.py --throughput          # store vs forward vs train step (minutes)
    python benchmarks/bench_sae_train.py --tokens 2000000 --out sae_l15    # the real run (train-sae)

Throughput: SmolLM2 (processed as `from_pretrained` does) on rows of 128 tokens of the training corpus
(Debian's `fortunes`), batch 8 rows:
- the plain forward (`model(tokens)`, all 30 layers and the unembedding), jitted;
- the store's forward (`store.activations`: blocks 0-15 only, the activations at the hook, BOS left out);
- one training step of the TopK SAE (4096 activations), jitted;
each the median of `--repeats` runs after a warm-up, as tokens (or activations) per second. The store is not
the bottleneck when its tokens/s is at least the plain forward's (it runs half the layers) and the trainer's
activations/s is well above it.

The real run calls `jaxlens.dictionaries.train_sae.train_sae` (the `jaxlens train-sae` pipeline): the result
(held-out explained variance, CE loss recovered, the spliced loss increase in nats, dead features) is printed
and lands in OUT/metrics.json; the run resumes from OUT/checkpoint when interrupted.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HOOK = "blocks.15.hook_resid_post"


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(repeats: int, rows: int = 8, ctx: int = 128) -> dict:
    from jaxlens.caching import run_jit
    from jaxlens.dictionaries import corpus, store, train
    from jaxlens.dictionaries.base import DictionaryConfig
    from jaxlens.hooked_transformer import HookedTransformer

    model = HookedTransformer.from_pretrained("smollm2-135m")
    text = corpus.load_corpus(corpus.TRAIN_SOURCE, model.tokenizer)
    tokens = jnp.asarray(text.sequences(ctx, np.arange(rows)))
    plain = _median_seconds(lambda: run_jit(model.params, model.cfg, tokens, {}, None)[0], repeats)
    st = store.ActivationStore(model.params, model.cfg, text, [HOOK], context_size=ctx, batch_size=4096,
                               buffer_sequences=64, forward_batch=rows)
    acts = _median_seconds(lambda: store.activations(model.params, model.cfg, tokens, (HOOK,),
                                                     st.stop_at_layer, True, jnp.float32), repeats)
    cfg = DictionaryConfig(architecture="topk", d_in=576, d_sae=4608, k=32, hook_name=HOOK)
    x = st.batch(0)[HOOK]
    stamps = []
    train.train_dictionaries(cfg, lambda s: {HOOK: x},
                             train.TrainConfig(steps=repeats + 1, n_batches_for_norm_estimate=1),
                             on_step=lambda step, m: stamps.append(time.perf_counter()))
    step = statistics.median(np.diff(stamps))  # between steps: the first one's compile left out
    n = rows * ctx
    return {"plain_forward_tokens_per_s": n / plain, "store_tokens_per_s": n / acts,
            "train_activations_per_s": 4096 / max(step, 1e-9), "rows": rows, "context_size": ctx,
            "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--throughput", action="store_true", help="measure throughput only")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--out", type=Path, default=Path("sae_smollm2_l15"))
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    platform = jax.devices()[0].platform
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {platform}")
    if args.throughput:
        print(json.dumps(throughput(args.repeats), indent=1))
        return 0
    from jaxlens.dictionaries.train_sae import TrainSaeSettings, train_sae

    settings = TrainSaeSettings(model="smollm2-135m", hook=HOOK, architecture="topk", d_sae=4608, k=32,
                                tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
                                lr_decay_steps=max(1, args.tokens // args.batch_size // 5),
                                eval_sequences=128)
    m = train_sae(settings, args.out)
    keys = ("explained_variance", "fvu", "l0", "ce_loss_clean", "ce_loss_with_dictionary",
            "ce_loss_increase", "ce_loss_recovered", "dead_fraction", "tokens", "seconds")
    print(json.dumps({k: m[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
