"""Interpretability for any Flax model, with no edits to its code: hook points, caches, interventions, sweeps.

    hf = jaxlens.flax.HookedFlax(model.module.apply, {"params": model.params})   # linen (or a Module)
    hf = jaxlens.flax.HookedFlax(nnx_model)                                      # NNX
    logits, cache = hf.run_with_cache(tokens, names_filter=lambda n: n.endswith("ln_1.__call__"))
    out = hf.forward(tokens, interventions={"transformer.h.0.attn.__call__[0]": Scale(0.0)})
    grid = hf.sweep(corrupted, hook=name, source=cache[name], metric=metric, axes={"pos": 1})

Hook names. Every call of a submodule method is a hook point named `<module path>.<method>`: the module path
joins the attribute names from the root with dots (linen: `module.path`, e.g. `transformer.h.0.attn`; NNX:
the `nnx.iter_modules` path, list indices included, e.g. `blocks.3.mlp`), the method is the one called
(`__call__`, `attend`, linen private helpers such as `_split_heads` too; never `setup`). Calls of the root
module have no path (`__call__`). A method called again on the same module gets `#1`, `#2`, ... in call order
(`transformer.h.0.attn._split_heads#1` is the second call: the keys). When the output is a pytree (a tuple, a
dict, a dataclass of arrays), each array leaf is its own hook point, suffixed with its pytree key
(`transformer.h.0.__call__[0]`, `__call__.logits`); non-array leaves are not hooks. `hook_map` renames hook
points to TransformerLens names (patterns with `{i}` placeholders) so the TL vocabulary applies.

Interventions are jaxlens's (Patch, Add, Scale, Fn, masks: `jaxlens.interventions`), applied to the hook's
output before anything reads it; caches record values after the interventions. Everything runs under jit
with the variables and interventions as arguments, so gradients flow to them (`hook_grads` is `jax.grad`
through a zero `Add`) and a sweep is one vmapped program.

Linen is instrumented with `flax.linen.intercept_methods`; NNX, which has no interceptor, by wrapping the
methods `nnx.capture(method_outputs=...)` would sow, for the duration of the trace (see `_instrument`).
Not supported (and not tested): hook points inside lifted transforms (`nn.scan` / `nnx.scan` over stacked
layers, `remat`), whose values belong to the inner trace; use the transform's own output as the hook point.
"""

from jaxlens.flax._hooked import HookedFlax as HookedFlax
from jaxlens.flax._instrument import LayoutError as LayoutError
from jaxlens.flax._instrument import UnknownFlaxHookError as UnknownFlaxHookError
from jaxlens.flax.gemma_lib import from_gemma as from_gemma
from jaxlens.flax.gemma_lib import to_gemma as to_gemma
