"""Every module under jaxlens.patching is importable by its own name and is not shadowed by a re-export (the
function `jaxlens.patching.sweep` lives in the module `jaxlens.patching.sweeping`)."""

import importlib
import pkgutil
import sys
import types

import jaxlens.patching


def test_every_patching_module_is_a_module_under_its_name():
    names = [m.name for m in pkgutil.iter_modules(jaxlens.patching.__path__)]
    assert {"sweeping", "activation", "result", "plan", "compute", "cost"} <= set(names)
    for name in names:
        full = f"jaxlens.patching.{name}"
        module = importlib.import_module(full)
        assert isinstance(module, types.ModuleType) and module is sys.modules[full]
        assert getattr(jaxlens.patching, name) is module, f"jaxlens.patching.{name} is shadowed"
    import jaxlens.patching.sweeping as sweeping

    assert isinstance(sweeping, types.ModuleType) and jaxlens.patching.sweep is sweeping.sweep
    assert jaxlens.patching.plan_sweep is sweeping.plan_sweep
