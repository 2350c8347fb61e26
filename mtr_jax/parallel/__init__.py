"""Mesh, logical-axis sharding rules and multi-host start-up."""

from mtr_jax.parallel.mesh import AXES, make_mesh  # noqa: F401
from mtr_jax.parallel.rules import RULES, batch_sharding, param_shardings, shard_params, sharding_for  # noqa: F401
from mtr_jax.parallel.distributed import maybe_initialize_distributed  # noqa: F401
