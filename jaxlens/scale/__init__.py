"""Scale: one ("data", "model") mesh over every device of every process, sharded weights, multi-host jobs."""

from jaxlens.scale import distributed
from jaxlens.scale.distributed import initialize
from jaxlens.scale.mesh import AXES, make_mesh, replicated, split_leading
from jaxlens.scale.sharded_loading import ReadLog, load_sharded, record_reads
from jaxlens.scale.sharding import (
    FSDP_RULES,
    RULES,
    check_divisible,
    param_shardings,
    param_specs,
    shard_params,
    sharded_bytes_per_device,
)
from jaxlens.scale.store import ChunkStore

__all__ = ["AXES", "FSDP_RULES", "RULES", "ChunkStore", "ReadLog", "check_divisible", "distributed",
           "initialize", "load_sharded", "make_mesh", "param_shardings", "param_specs", "record_reads",
           "replicated", "shard_params", "sharded_bytes_per_device", "split_leading"]
