"""The one mesh of jaxlens: named axes `data` (sweep cells, tokens, batch) and `model` (heads, MLP width),
over every device of every process (`jax.devices()`, which spans all hosts after `jax.distributed`).

    mesh = make_mesh()                     # all devices on `data`
    mesh = make_mesh(model=4)              # data = n_devices / 4
    cells = NamedSharding(mesh, P("data"))
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlens.errors import InputError

AXES = ("data", "model")


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: every device of every process).

    Args:
        data: size of the `data` axis (default: the devices left after `model`).
        model: size of the `model` axis.
        devices: the devices to use, in order.

    Raises:
        InputError: axis sizes that are not positive or whose product is not the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or (data is not None and data < 1):
        raise InputError(f"Mesh axis sizes must be positive; found data={data}, model={model}.")
    if data is None:
        if n % model:
            raise InputError(f"The `model` axis of size {model} does not divide the {n} devices; choose a "
                             f"divisor of {n}.")
        data = n // model
    if data * model != n:
        raise InputError(f"A mesh of data={data} x model={model} needs {data * model} devices; found {n}. "
                         "Choose sizes whose product is the device count, or pass `devices`.")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def split_leading(mesh: Mesh) -> NamedSharding:
    """The leading axis split over `data` (sweep cells, batch rows)."""
    return NamedSharding(mesh, PartitionSpec("data"))
