"""Scale: one ("data", "model") mesh over every device of every process, sharded weights, multi-host jobs."""

from jaxlens.scale.mesh import AXES, make_mesh, replicated, split_leading

__all__ = ["AXES", "make_mesh", "replicated", "split_leading"]
