"""The one table mapping logical axis names (on every parameter and activation) to mesh axes.

Parameters carry logical axes from `qwen2.logical_axes`; this module turns them into
`NamedSharding`s. A dimension that does not divide by its mesh axes' size is replicated instead
(correct everywhere, just less sharded), so the same rules work from 1 CPU to a TPU pod.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtr_jax.model.qwen2 import Qwen2Config, logical_axes, param_specs

# logical axis -> mesh axis (str), several mesh axes (tuple) or None (replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations: batch over every data-parallel axis
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",  # FSDP: weights' model dim split over fsdp, gathered per layer by XLA
    "q_heads": "tensor",  # Megatron-style: heads / MLP columns split over tensor
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "lora_rank": None,  # LoRA adapters: the rank dim is small, replicated; their in/out dims follow the projection
}

# head axes may only be split on whole heads (a split inside a head costs an all-gather per matmul)
_HEAD_COUNT = {"q_heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(names: tuple, shape: tuple, mesh: Mesh, cfg: Qwen2Config | None = None) -> P:
    """PartitionSpec for one array with logical axes `names`, replicating dims that don't divide."""
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        if name not in RULES:
            raise KeyError(f"logical axis '{name}' has no entry in parallel.rules.RULES")
        axes = RULES[name]
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            size = _axis_size(mesh, tup) if tup else 1
            heads = getattr(cfg, _HEAD_COUNT[name]) if (cfg is not None and name in _HEAD_COUNT) else dim
            if not tup or dim % size or heads % size:
                axes = None
            else:
                used.update(tup)
                axes = tup[0] if len(tup) == 1 else tup
        out.append(axes)
    return P(*out)


def sharding_for(names: tuple, shape: tuple, mesh: Mesh) -> NamedSharding:
    """NamedSharding for an activation/input with logical axes `names` (e.g. ("batch", "length"))."""
    return NamedSharding(mesh, spec_for(tuple(names), tuple(shape), mesh))


def param_shardings(cfg: Qwen2Config, mesh: Mesh) -> dict:
    """Tree of NamedSharding matching `init_params(cfg)` / `load_hf` params."""
    specs = param_specs(cfg)
    is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, spec_for(s[1], s[0], mesh, cfg)), specs, is_leaf=is_spec)


def adapter_shardings(cfg: Qwen2Config, mesh: Mesh, targets: list, rank: int) -> dict:
    """Tree of NamedSharding matching `lora.init_adapters(cfg, targets, rank, key)`."""
    from mtr_jax.model.lora import adapter_specs

    is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, spec_for(s[1], s[0], mesh, cfg)),
                                  adapter_specs(cfg, targets, rank), is_leaf=is_spec)


def shard_params(params, shardings):
    """Move (or reshard) a params tree onto `shardings`."""
    return jax.device_put(params, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Inputs [batch, length, ...]: batch split over data*fsdp, the rest replicated."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    first = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


__all__ = ["RULES", "spec_for", "sharding_for", "param_shardings", "shard_params", "batch_sharding", "replicated", "logical_axes"]
