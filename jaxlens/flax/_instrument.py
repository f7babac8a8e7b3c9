"""Hook points inside a foreign Flax model: every submodule method's output, named by module path.

Two ways in, one recorder:
- linen: `flax.linen.intercept_methods` sees every wrapped method call (`context.module.path`,
  `context.method_name`), so the recorder edits or records its output;
- NNX has no interceptor: during the call, every `__call__` and public method defined in a submodule's class
  (the set `nnx.capture(method_outputs=...)` sows) is wrapped, class-wide and restored afterwards, the way
  `nnx.capture` wraps them; `self` is mapped to its path with `nnx.iter_modules`.

Either way this happens while the program is traced, so the compiled program holds only the edits asked for.
"""

import contextlib
import dataclasses
import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import linen, nnx

from jaxlens.errors import CheckpointError, UnknownHookError
from jaxlens.interventions import HookPoint, intervention_list


class UnknownFlaxHookError(UnknownHookError):
    """A hook path that the instrumented model does not have (the closest paths are named)."""

    def __init__(self, name: str, known):
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        KeyError.__init__(self, f"The model has no hook point {name!r}.{hint} Hook points are "
                                "'<module path>.<method>' (see `HookedFlax.hook_names(*args)`).")


class LayoutError(CheckpointError):
    """A parameter tree that does not match the layout the model expects."""


class AliasMap:
    """hook path -> TL name through the hook_map patterns; remembers which patterns matched."""

    def __init__(self, hook_map: Mapping[str, str]):
        self.keys = list(hook_map)
        self.patterns = [(pattern(k), v) for k, v in hook_map.items()]
        self.used, self.memo = set(), {}

    def get(self, name: str) -> str | None:
        if name not in self.memo:
            self.memo[name] = None
            for i, (regex, target) in enumerate(self.patterns):
                m = regex.fullmatch(name)
                if m:
                    self.memo[name] = target.format(**m.groupdict())
                    self.used.add(i)
                    break
        return self.memo[name]

    def values(self):
        return [v for v in self.memo.values() if v is not None]

    def check(self, seen) -> None:
        for n in seen:
            self.get(n)
        for i, key in enumerate(self.keys):
            if i not in self.used:
                raise UnknownFlaxHookError(key, seen)


def pattern(key: str) -> re.Pattern:
    """`{name}` placeholders match integers; the rest literally."""
    parts = re.split(r"\{(\w+)\}", key)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts)))


@dataclasses.dataclass
class Recorder:
    """Trace-time state of one run: interventions to apply, names to record, what was seen.

    `cache_names` None records every hook point."""

    interventions: Mapping[str, Any]
    cache_names: frozenset[str] | None
    aliases: AliasMap  # hook path -> TL name (hook_map)
    cache: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    seen: dict[str, tuple] = dataclasses.field(default_factory=dict)  # name -> shape, in call order
    calls: dict[str, int] = dataclasses.field(default_factory=dict)

    def enter(self, path: str, method: str) -> str:
        """The base name of this call: `path.method`, then `path.method#1`, ... for later calls."""
        base = f"{path}.{method}" if path else method
        k = self.calls.get(base, 0)
        self.calls[base] = k + 1
        return base if k == 0 else f"{base}#{k}"

    def visit(self, base: str, out: Any) -> Any:
        """Apply interventions to and record each array leaf of a method's output."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(out)
        if not any(_is_array(x) for _, x in leaves):
            return out
        single = len(leaves) == 1 and not leaves[0][0]
        new = []
        for path, x in leaves:
            if not _is_array(x):
                new.append(x)
                continue
            name = base if single else base + jax.tree_util.keystr(path)
            new.append(self.hook(name, x))
        return jax.tree_util.tree_unflatten(treedef, new)

    def hook(self, name: str, x: jax.Array) -> jax.Array:
        self.seen[name] = tuple(np.shape(x))
        tl = self.aliases.get(name)
        for key in (name, tl):
            if key is not None and key in self.interventions:
                hook = HookPoint(key)
                for iv in intervention_list(self.interventions[key]):
                    x = iv(x, hook)
        if self.cache_names is None or name in self.cache_names or tl in self.cache_names:
            self.cache[tl or name] = x
        return x

    def check(self) -> None:
        """After the run: every addressed name was a hook point."""
        known = list(self.seen) + list(self.aliases.values())
        asked = list(self.interventions) + list(self.cache_names or ())
        for name in asked:
            if name not in self.seen and name not in self.aliases.values():
                raise UnknownFlaxHookError(name, known)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))  # tracers are jax.Arrays


# -- linen ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def linen_hooks(rec: Recorder) -> Iterator[None]:
    """Every linen method call inside the block goes through `rec` (setup excluded)."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "setup":
            return next_fun(*args, **kwargs)
        base = rec.enter(".".join(str(p) for p in context.module.path), context.method_name)
        return rec.visit(base, next_fun(*args, **kwargs))

    with linen.intercept_methods(interceptor):
        yield


# -- NNX -----------------------------------------------------------------------------------------------------
def _hookable(cls: type) -> list[tuple[str, Callable]]:
    """The methods `nnx.capture(method_outputs=...)` would sow: `__call__` and public functions defined in
    the class itself."""
    return [(n, f) for n, f in vars(cls).items()
            if inspect.isfunction(f) and (n == "__call__" or not n.startswith("_"))]


@contextlib.contextmanager
def nnx_hooks(root: nnx.Module, rec: Recorder) -> Iterator[None]:
    """While the block runs, the hookable methods of every module class under `root` go through `rec` when
    called on one of root's modules (other instances of the same classes are untouched)."""
    paths = {id(m): ".".join(str(p) for p in path) for path, m in nnx.iter_modules(root)}
    classes = {type(m) for _, m in nnx.iter_modules(root)}
    saved = []

    def wrap(fn, method):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            path = paths.get(id(self))
            if path is None:
                return fn(self, *args, **kwargs)
            base = rec.enter(path, method)
            return rec.visit(base, fn(self, *args, **kwargs))

        return wrapper

    try:
        for cls in classes:
            for name, fn in _hookable(cls):
                saved.append((cls, name, fn))
                setattr(cls, name, wrap(fn, name))
        yield
    finally:
        for cls, name, fn in reversed(saved):
            setattr(cls, name, fn)


# -- parameter layouts ---------------------------------------------------------------------------------------
def check_layout(expected: Any, given: Any, what: str) -> None:
    """Raise LayoutError naming the first path where `given` differs from `expected` (shapes or names)."""
    want = {_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(given)[0]}
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise LayoutError(f"{what} does not match the model's layout: {path!r} (shape {want[path]}) is "
                              f"missing. Expected paths like {_sample(want)}; found {_sample(have)}.")
        if path not in want:
            close = difflib.get_close_matches(path, list(want), n=1)
            hint = f" (closest expected: {close[0]!r})" if close else ""
            raise LayoutError(f"{what} does not match the model's layout: {path!r} is not a parameter of "
                              f"the model{hint}. Convert the tree to the model's own layout.")
        if want[path] != have[path]:
            raise LayoutError(f"{what} does not match the model's layout at {path!r}: the model expects "
                              f"shape {want[path]}, found {have[path]}. Check the config the model was built "
                              "with.")


def _path(p) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)


def _sample(d: Mapping) -> str:
    return ", ".join(map(repr, list(d)[:3])) + (" ..." if len(d) > 3 else "")
