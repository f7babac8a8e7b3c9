"""`with model.hooks(fwd_hooks=[...]):` as TransformerLens has it, keeping no state past the block.

    with model.hooks(fwd_hooks=[("blocks.3.attn.hook_z", lambda z, hook: z.at[:, :, 7].set(0.0))]):
        logits = model(tokens)                      # head 3.7 ablated
        _, cache = model.run_with_cache(tokens)     # here too
    logits = model(tokens)                          # the clean model again: nothing was registered

The block's hooks live in a context variable (so nested blocks compose, and threads or async tasks do not see
each other's), set on entry and reset in `finally`; forward and run_with_cache of the model that opened the
block apply them before their own interventions (`active_hooks`). Nothing is stored on the model.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from jaxlens.errors import JaxlensError
from jaxlens.interventions import Fn

_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("jaxlens_hooks", default=())


class HookContext:
    """Mixin: `model.hooks(...)`, TransformerLens's context manager for temporary hooks."""

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
              bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator:
        """Apply `fwd_hooks` [(hook name or name filter, fn(activation, hook) -> new activation)] to every
        forward and run_with_cache of this model inside the block; nothing remains after it.

        `clear_contexts` is accepted for TL compatibility and does nothing (jaxlens hooks have no context).

        Raises:
            JaxlensError: bwd_hooks (take gradients with run_with_cache(incl_bwd=True)), or
                reset_hooks_end=False (hooks never outlive the block).
        """
        if bwd_hooks:
            raise JaxlensError("bwd_hooks are not supported: take gradients with "
                               "run_with_cache(incl_bwd=True) or jax.grad with respect to a zero `Add` "
                               "intervention.")
        if not reset_hooks_end:
            raise JaxlensError("reset_hooks_end=False would keep the hooks on the model after the block; "
                               "jaxlens models hold no hooks. Keep the calls inside the `with` block, or "
                               "pass interventions= to each call.")
        token = _ACTIVE.set(_ACTIVE.get() + ((self, fwd_hook_interventions(self, fwd_hooks)),))
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def fwd_hook_interventions(model, fwd_hooks) -> dict[str, list]:
    """TL's fwd_hooks as interventions {hook name: [Fn]}: a name filter selects hook points as the
    names_filter of run_with_cache does.

    Raises:
        UnknownHookError: a name that is not a hook point.
    """
    table, out = model.hook_table(), {}
    for name, fn in fwd_hooks:
        chosen = [name] if isinstance(name, str) else table.select(name, enabled=model.enabled_hooks)
        for n in chosen:
            table.parse(n)
            out.setdefault(n, []).append(Fn(fn))
    return out


def active_hooks(model, interventions: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """`interventions` preceded by the hooks of the `model.hooks(...)` blocks open around this call (outer
    blocks first, as TransformerLens runs hooks in the order they were added)."""
    blocks = [ivs for m, ivs in _ACTIVE.get() if m is model]
    if not blocks:
        return interventions
    merged: dict[str, list] = {}
    for ivs in [*blocks, interventions or {}]:
        for name, iv in ivs.items():
            merged.setdefault(name, []).extend(iv if isinstance(iv, (list, tuple)) else [iv])
    return merged
