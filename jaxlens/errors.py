"""Errors jaxlens raises on purpose. Each message says what was wrong, what was found, and how to fix it."""

import difflib
from collections.abc import Sequence


class JaxlensError(Exception):
    """Base class of every error jaxlens raises on purpose."""


class ConfigError(JaxlensError, ValueError):
    """An architecture configuration that jaxlens cannot honour."""


class UnknownHookError(JaxlensError, KeyError):
    """A hook name that the model does not have."""

    def __init__(self, name: str, known: Sequence[str]):
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        super().__init__(f"No hook point named {name!r}.{hint} "
                         "List them with `jaxlens.hook_names.all_names(cfg)`.")

    __str__ = Exception.__str__  # KeyError would wrap the message in quotes


class InputError(JaxlensError, ValueError):
    """Tokens, text or arguments that cannot be run (out-of-vocabulary ids, too long, wrong rank)."""


class InterventionError(JaxlensError, ValueError):
    """An intervention that does not fit the activation it is applied to."""


class CheckpointError(JaxlensError, ValueError):
    """A checkpoint that cannot be converted: unknown config keys, leftover or missing tensors, bad files."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint, refused unless the caller allows pickle explicitly."""


# -- the built-in exceptions TransformerLens raises, kept catchable ----------------------------------------
# TransformerLens signals many bad inputs with `assert` (AssertionError) or IndexError. jaxlens raises its
# own clearer errors; these also derive from TL's built-in, so TL code's `except AssertionError` works.


class InputAssertionError(InputError, AssertionError):
    """An input TransformerLens rejects with an `assert` (a string that is not one token, a token that does
    not occur, tokens of the wrong rank, mismatched shapes)."""


class InputIndexError(InputError, IndexError):
    """An index out of range: a layer beyond n_layers, more indices than a FactoredMatrix has axes."""


class MissingWeightError(JaxlensError, AttributeError):
    """A weight this model does not have (`W_pos` on a rotary model, a norm's `w` after fold_ln). An
    AttributeError, so `hasattr(model, "W_pos")` is False, as in TransformerLens."""


class ReadOnlyError(JaxlensError, AttributeError):
    """An assignment to a read-only view of the params (`model.blocks[0].attn.W_O = ...`)."""
