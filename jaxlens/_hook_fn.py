"""Hook functions as pytrees: a hook's code is the jit cache key, the arrays and numbers it reads are data.

TransformerLens's loop idiom makes a new hook function on every call:

    for pos in range(n_pos):
        model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x.at[:, pos].set(clean[:, pos]))])

A function object as static jit metadata would compile the whole model once per call. Here `flatten(fn)` walks
what the function reads: its closure cells, defaults and the module globals its code loads; recursively the
closures and same-module functions it calls, `functools.partial` arguments, a bound method's function and the
attributes of its object (a plain class of the hook's module). Arrays and numbers found there are leaves
(traced arguments); lists, tuples, dicts and registered pytrees are walked; anything else is static (str,
None, bool, types and modules by value; other objects by identity, with their attributes' values, one level
deep, in the key). `build(spec, leaves)` rebuilds an equivalent function over the leaves with
`types.FunctionType`, so the loop above compiles once.

Tracing a number is not always possible (`x[:, :pos]`, `range(n)`, `if pos > 0`). Each code object has a mode,
raised (never lowered) when a trace fails: TRACED (arrays and numbers traced), NUMBERS (numbers static, by
value: one compile per distinct value), OPAQUE (the function object itself is the key: one compile per new
function, as any callable that is not a plain Python function). The failing trace falls back at once, with the
concrete values, so no call gives a wrong result; later calls flatten in the new mode. A hook that changes a
list, dict or object it reads (without storing an activation) runs as the user's own function (OPAQUE), so
the change lands where the user looks.

Limits: what a hook reads only through library code (a function or class of another module, a module
attribute `config.pos`) is static as of the trace; a traced index out of range is clamped (reads) or dropped
(writes), as JAX does for data indices, where a Python int would raise.
"""
import dis
import functools
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxlens.errors import InterventionError

TRACED, NUMBERS, OPAQUE = 0, 1, 2
_MODES: dict[types.CodeType, int] = {}  # the mode each hook's code object has reached
_MAX_DEPTH = 8
_INT32 = (-(2**31), 2**31 - 1)
_BY_VALUE = (str, bytes, bool, int, np.number, np.bool_, type(None), type(Ellipsis), complex, type,
             types.ModuleType, types.CodeType, types.BuiltinFunctionType, range, slice, frozenset)


class Static:
    """A static value in a spec: compared by (type, value) for plain immutable values, else by identity."""

    __slots__ = ("value", "_key")

    def __init__(self, value):
        self.value = value
        try:
            key = _value_key(value)
            hash(key)
        except TypeError:  # an unhashable slice or frozenset element
            key = None
        self._key = key

    def __eq__(self, other):
        if not isinstance(other, Static):
            return NotImplemented
        return self.value is other.value if self._key is None else self._key == other._key

    def __hash__(self):
        return hash(id(self.value) if self._key is None else self._key)


def _value_key(value):
    """A hashable key that equal plain values share (floats by repr: -0.0 != 0.0), or None: by identity."""
    if isinstance(value, float):
        return (float, repr(value))
    if isinstance(value, _BY_VALUE):
        return (type(value), value)
    if type(value) is tuple:
        keys = tuple(_value_key(v) for v in value)
        return None if None in keys else (tuple, keys)
    return None


class FnAux:
    """The static half of a flattened `Fn`: (spec, leaf kinds, mode) are its identity; the user's function and
    the concrete leaves ride along (ignored by ==) so that a trace that cannot use traced numbers can fall
    back to them."""

    __slots__ = ("spec", "kinds", "mode", "original", "concrete", "_hash")

    def __init__(self, spec, kinds, mode, original, concrete):
        self.spec, self.kinds, self.mode, self.original, self.concrete = spec, kinds, mode, original, concrete
        self._hash = hash((spec, kinds, mode))

    def __eq__(self, other):
        return (isinstance(other, FnAux) and self._hash == other._hash
                and (self.spec, self.kinds, self.mode) == (other.spec, other.kinds, other.mode))

    def __hash__(self):
        return self._hash


def flatten(fn: Callable) -> tuple[list, FnAux]:
    """(leaves, aux) of a hook function in the mode its code has reached."""
    mode = mode_of(fn)
    if mode == OPAQUE:
        return [], FnAux(("const", Static(fn)), (), OPAQUE, fn, [])
    leaves, kinds = [], []
    root = fn
    while isinstance(root, (types.MethodType, functools.partial)):
        root = root.__func__ if isinstance(root, types.MethodType) else root.func
    spec = _Splitter(mode, leaves, kinds, root.__globals__).value(fn, 0, frozenset())
    return leaves, FnAux(spec, tuple(kinds), mode, fn, list(leaves))


def apply(aux: FnAux | None, fn: Callable, leaves, x: jax.Array, hook) -> Any:
    """Run a hook: rebuilt over `leaves` in its mode, or with concrete numbers, or as the user's own function,
    the first that traces. Raises an InterventionError naming the pure form for what cannot run under jit."""
    if aux is None:
        aux = FnAux(("const", Static(fn)), (), OPAQUE, fn, [])
    orig = aux.original
    writes = [w for code in {*_codes(aux.spec), root_code(orig)} - {None} for w in _writes(code)]
    if writes:
        raise InterventionError(
            f"The hook function {_name(orig)} at {hook.name!r} writes {', '.join(sorted(writes))}: state "
            "outside the call. A jaxlens hook runs while its program is traced (once per compile), not on "
            "every call, so a counter or flag it sets would be wrong. Count in Python around the call (each "
            "run_with_hooks call applies each hook once per hook point it names); read activations with "
            "run_with_cache.")
    now = max(aux.mode, mode_of(orig))
    tries = []
    if now == TRACED:
        tries.append((TRACED, list(leaves)))
    if now <= NUMBERS and len(aux.concrete) == len(aux.kinds):
        mixed = zip(leaves, aux.concrete, aux.kinds, strict=True)
        tries.append((NUMBERS, [c if k == "num" else l for l, c, k in mixed]))
    tries.append((OPAQUE, None))
    for mode, lv in tries:
        if mode == OPAQUE:
            f, boxes = orig, [(c, snapshot(c)) for c in user_containers(orig)]
        else:
            f, boxes = build(aux.spec, lv)
        try:
            out = f(x, hook)
        except InterventionError:
            raise
        except Exception as e:
            if mode == OPAQUE:
                _explain(e, orig, hook)
                raise
            continue
        mutated = [(c, s) for c, s in boxes if changed(c, s)]
        if any(has_tracer(c) for c, _ in mutated):
            for c, s in mutated:
                restore(c, s)
            raise InterventionError(
                f"The hook function {_name(orig)} at {hook.name!r} stores the activation in a list, dict, "
                "set or attribute outside the call (`acts.append(x)`, `store[k] = x`). Under jit what "
                "it stores is a tracer, not a value. Read activations with "
                "`model.run_with_cache(tokens, names_filter=...)`.")
        if mutated and mode != OPAQUE:  # run the user's own function so the change lands in its containers
            raise_mode(orig, OPAQUE)
            continue
        raise_mode(orig, mode)
        return out
    raise AssertionError("unreachable: the last try is the user's own function")


def mode_of(fn) -> int:
    """The mode `fn`'s code has reached (OPAQUE for callables that are not plain functions)."""
    code = root_code(fn)
    return OPAQUE if code is None else _MODES.get(code, TRACED)


def raise_mode(fn, mode: int) -> None:
    """Record that `fn`'s code needs at least `mode` (modes only go up)."""
    code = root_code(fn)
    if code is not None and mode > _MODES.get(code, TRACED):
        _MODES[code] = mode


def root_code(fn) -> types.CodeType | None:
    """The code object that identifies a hook: a function's, a bound method's or a partial's function's."""
    for _ in range(_MAX_DEPTH):
        if isinstance(fn, types.FunctionType):
            return fn.__code__
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        else:
            return None
    return None


def build(spec: tuple, leaves) -> tuple[Any, list]:
    """(the value `spec` describes over `leaves`, [(container, snapshot)] of the containers it built)."""
    b = _Builder(list(leaves))
    return b.value(spec), b.containers


# -- splitting ------------------------------------------------------------------------------------------


class _Splitter:
    def __init__(self, mode: int, leaves: list, kinds: list, root_globals: dict):
        self.mode, self.leaves, self.kinds, self.root_globals = mode, leaves, kinds, root_globals

    def leaf(self, v, kind: str) -> tuple:
        self.leaves.append(v)
        self.kinds.append(kind)
        return ("leaf",)

    def value(self, v, depth: int, active: frozenset) -> tuple:
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            if self.mode == NUMBERS or (isinstance(v, int) and not _INT32[0] <= v <= _INT32[1]):
                return ("const", Static(v))
            return self.leaf(v, "num")
        if isinstance(v, _BY_VALUE):
            return ("const", Static(v))
        if isinstance(v, jax.Array) or (isinstance(v, np.ndarray) and v.dtype.kind in "biufc"):
            return self.leaf(v, "arr")
        if depth > _MAX_DEPTH or id(v) in active:
            return ("const", Static(v))
        inner = active | {id(v)}
        sub = lambda x: self.value(x, depth + 1, inner)
        if isinstance(v, types.FunctionType):
            # user code (the hook's module, or nested in it) is walked; library functions are static
            user = depth == 0 or v.__globals__ is self.root_globals
            return self.function(v, sub) if user else ("const", Static(v))
        if isinstance(v, types.MethodType):
            return ("method", sub(v.__func__), sub(v.__self__))
        if isinstance(v, functools.partial):
            return ("partial", sub(v.func), sub(v.args), sub(v.keywords))
        if type(v) in (tuple, list):
            return (type(v).__name__, tuple(sub(x) for x in v))
        if type(v) is set:  # elements are hashable, never traced
            return ("set", tuple(Static(x) for x in v))
        if type(v) is dict:
            return ("dict", tuple(Static(k) for k in v), tuple(sub(x) for x in v.values()))
        children, treedef = jax.tree_util.tree_flatten(v, is_leaf=lambda x: x is not v)
        if len(children) == 1 and children[0] is v:  # not a registered pytree
            if _plain_user_object(v, self.root_globals):  # a hook object's attributes (`self.pos`) are data
                return ("object", Static(type(v)), sub(vars(v)))
            return _opaque(v)
        try:
            hash(treedef)
        except TypeError:
            return _opaque(v)
        return ("tree", treedef, tuple(sub(c) for c in children))

    def function(self, fn: types.FunctionType, sub) -> tuple:
        code, g = fn.__code__, fn.__globals__
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(sub(cell.cell_contents))
            except ValueError:  # a cell not yet assigned
                cells.append(("empty",))
        names = tuple(n for n in _global_loads(code) if n in g)
        library = lambda v: isinstance(v, types.FunctionType) and v.__globals__ is not g
        glob = tuple(("const", Static(g[n])) if library(g[n]) else sub(g[n]) for n in names)
        return ("func", code, Static(g), fn.__name__, fn.__qualname__, tuple(cells), names, glob,
                sub(fn.__defaults__), sub(fn.__kwdefaults__))


# -- building -------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, leaves: list):
        self.leaves, self.i = leaves, 0
        self.containers: list = []
        self.globals: dict[int, dict] = {}

    def value(self, s: tuple):
        kind = s[0]
        if kind in ("const", "opaque"):
            return s[1].value
        if kind == "leaf":
            self.i += 1
            return self.leaves[self.i - 1]
        if kind == "tuple":
            return tuple(self.value(c) for c in s[1])
        if kind in ("list", "set", "dict"):
            if kind == "dict":
                out = {k.value: self.value(c) for k, c in zip(s[1], s[2], strict=True)}
            else:
                out = [self.value(c) for c in s[1]] if kind == "list" else {e.value for e in s[1]}
            self.containers.append((out, snapshot(out)))
            return out
        if kind == "tree":
            return jax.tree_util.tree_unflatten(s[1], [self.value(c) for c in s[2]])
        if kind == "object":
            out = object.__new__(s[1].value)
            vars(out).update(self.value(s[2]))
            self.containers.append((vars(out), snapshot(vars(out))))
            return out
        if kind == "method":
            func = self.value(s[1])
            return types.MethodType(func, self.value(s[2]))
        if kind == "partial":
            func = self.value(s[1])
            return functools.partial(func, *self.value(s[2]), **self.value(s[3]))
        return self.function(s)

    def function(self, s: tuple) -> types.FunctionType:
        _, code, g_static, name, qualname, cells, names, glob, defaults, kwdefaults = s
        g = g_static.value
        if any(spec[0] != "const" for spec in glob):  # a copy of the module's globals, with the traced values
            g = self.globals.setdefault(id(g), dict(g))
        closure = tuple(types.CellType() for _ in cells)
        fn = types.FunctionType(code, g, name, None, closure or None)
        fn.__qualname__ = qualname
        for cell, c in zip(closure, cells, strict=True):  # filled after: a cell may hold a helper of fn
            if c != ("empty",):
                cell.cell_contents = self.value(c)
        for n, spec in zip(names, glob, strict=True):
            if spec[0] != "const":
                g[n] = self.value(spec)
        fn.__defaults__ = self.value(defaults)
        fn.__kwdefaults__ = self.value(kwdefaults)
        return fn


# -- side effects -----------------------------------------------------------------------------------------


def snapshot(obj):
    """A shallow copy of a list, dict or set, to tell later whether the hook changed it."""
    return list(obj.items()) if isinstance(obj, dict) else list(obj) if isinstance(obj, list) else set(obj)


def changed(obj, snap) -> bool:
    if isinstance(obj, set):
        return obj != snap
    now = list(obj.items()) if isinstance(obj, dict) else list(obj)
    if isinstance(obj, dict):
        now, snap = [v for kv in now for v in kv], [v for kv in snap for v in kv]
    return len(now) != len(snap) or any(a is not b for a, b in zip(now, snap, strict=True))


def restore(obj, snap) -> None:
    obj.clear()
    obj.update(snap) if isinstance(obj, (dict, set)) else obj.extend(snap)


def has_tracer(box) -> bool:
    """A list, dict or set holding a tracer, at any depth."""
    values = list(box.values() if isinstance(box, dict) else box)
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(values))


def user_containers(fn, depth: int = 0) -> list:
    """The lists, dicts and sets a callable reads directly (closure, defaults, globals, partial arguments)."""
    if depth > 2:
        return []
    if isinstance(fn, types.MethodType):
        own = [vars(fn.__self__)] if hasattr(fn.__self__, "__dict__") else []
        return own + user_containers(fn.__func__, depth + 1)
    if isinstance(fn, functools.partial):
        vals = [*fn.args, *fn.keywords.values()]
        return [v for v in vals if isinstance(v, (list, dict, set))] + user_containers(fn.func, depth + 1)
    if not isinstance(fn, types.FunctionType):
        return []
    vals = [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    for cell in fn.__closure__ or ():
        try:
            vals.append(cell.cell_contents)
        except ValueError:
            pass
    g = fn.__globals__
    vals += [g[n] for n in _global_loads(fn.__code__) if n in g]
    out = [v for v in vals if type(v) in (list, dict, set)]
    return out + [u for v in vals if isinstance(v, types.FunctionType) and v is not fn and v.__globals__ is g
                  for u in user_containers(v, depth + 1)]


def _opaque(v) -> tuple:
    """An object static by identity, its attributes' values (one level) part of the key: an object changed
    between calls (`patcher.pos = 3`) gets a new program rather than a stale one."""
    attrs = getattr(v, "__dict__", None)
    if not isinstance(attrs, dict) or len(attrs) > 64:
        return ("const", Static(v))
    return ("opaque", Static(v), tuple((k, Static(a)) for k, a in attrs.items()))


def _plain_user_object(v, root_globals: dict) -> bool:
    """An instance of a plain class defined in the hook's own module (rebuilt with object.__new__)."""
    cls = type(v)
    return (cls.__module__ == root_globals.get("__name__") and type(cls) is type
            and cls.__new__ is object.__new__ and isinstance(getattr(v, "__dict__", None), dict)
            and not any("__slots__" in vars(c) for c in cls.__mro__) and "__getattr__" not in dir(cls))


def _explain(e: Exception, fn, hook) -> None:
    """Raise an InterventionError with the pure form for an error TL-style hooks hit under jit."""
    msg = str(e)
    if isinstance(e, TypeError) and "item assignment" in msg:
        raise InterventionError(
            f"The hook function {_name(fn)} at {hook.name!r} edits the activation in place "
            "(`x[:, :, h] = v`), but JAX arrays are immutable. Return the edited copy: "
            "`return x.at[:, :, h].set(v)` (or pass `Patch(value, mask)` as an intervention).") from e
    if isinstance(e, (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                      jax.errors.TracerIntegerConversionError)):
        raise InterventionError(
            f"The hook function {_name(fn)} at {hook.name!r} reads the activation's values in Python "
            "(`float(x)`, `x.item()`, `if x.sum() > 0`, `np.asarray(x)`), but under jit the activation is a "
            "tracer. Compute with jnp (`jnp.where(cond, a, b)`), or read activations with "
            f"`model.run_with_cache(tokens, names_filter=...)`. ({type(e).__name__})") from e
    if isinstance(e, AttributeError) and "_" in msg and msg.rstrip("'\" ").endswith("_"):
        raise InterventionError(
            f"The hook function {_name(fn)} at {hook.name!r} calls a torch in-place method ({msg}). Return "
            "a new array instead: `x * 0` for `x.zero_()`, `x.at[idx].set(v)` for `x[idx].copy_(v)`.") from e


def _name(fn) -> str:
    return repr(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


# -- bytecode facts, cached per code object ---------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _global_loads(code: types.CodeType) -> tuple[str, ...]:
    """Global names the code (and the code nested in it: lambdas, comprehensions) loads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.update(_global_loads(c))
    return tuple(sorted(names))


@functools.lru_cache(maxsize=4096)
def _writes(code: types.CodeType) -> tuple[str, ...]:
    """`nonlocal x` / `global x` writes: state outside the call that a traced hook would update only once."""
    out = []
    for i in dis.get_instructions(code):
        if i.opname in ("STORE_DEREF", "DELETE_DEREF") and i.argval in code.co_freevars:
            out.append(f"`nonlocal {i.argval}`")
        elif i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            out.append(f"`global {i.argval}`")
    return tuple(dict.fromkeys(out))


def _codes(spec: tuple):
    """Every function code object in a spec."""
    kind = spec[0]
    if kind == "func":
        yield spec[1]
        children = (*spec[5], *spec[7], spec[8], spec[9])
    elif kind in ("tuple", "list"):
        children = spec[1]
    elif kind in ("dict", "tree"):
        children = spec[2]
    elif kind in ("method", "partial"):
        children = spec[1:]
    elif kind == "object":
        children = (spec[2],)
    else:
        children = ()
    for c in children:
        yield from _codes(c)
