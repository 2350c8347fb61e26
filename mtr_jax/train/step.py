"""The jitted optimiser step both trainers share.

`make_train_step(loss_num, denom_fn, tx)` builds `step(params, opt_state, micro_batches)`:
the batch arrives as [A, b, ...] (A micro-batches, b sharded over the data axes, possibly fed by
several processes), `denom = denom_fn(micro_batches)` is computed once over the WHOLE global batch
inside the jitted step, and gradients of `loss_num(params, mb) / denom` are summed over the A
micro-batches with `lax.scan` (so the step's loss is exact whatever A and the process count are),
clipped and applied with optax. A non-finite loss or gradient leaves params and optimiser state
untouched and reports `skipped=1` (the caller logs it; nothing non-finite is ever saved).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_train_step(loss_num, denom_fn, tx, donate: bool = True):
    """loss_num(params, micro_batch, *frozen) -> (numerator, aux dict of sums); denom_fn(batches) ->
    scalar. `step(params, opt_state, batches, *frozen)`: arrays in `frozen` (a LoRA run's base
    weights) reach the loss as arguments, are neither differentiated nor updated nor donated."""

    def step(params, opt_state, batches, *frozen):
        denom = jnp.maximum(denom_fn(batches).astype(jnp.float32), 1.0)
        def micro(carry, mb):
            g_acc, loss_acc, aux_acc = carry

            def f(p):
                num, aux = loss_num(p, mb, *frozen)
                return num / denom, aux

            (loss, aux), g = jax.value_and_grad(f, has_aux=True)(params)
            g_acc = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            aux_acc = jax.tree_util.tree_map(lambda a, b: a + b, aux_acc, aux)
            return (g_acc, loss_acc + loss, aux_acc), None

        first = jax.tree_util.tree_map(lambda x: x[0], batches)
        aux0 = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda p, mb: loss_num(p, mb, *frozen)[1], params, first))
        if jax.tree_util.tree_leaves(batches)[0].shape[0] == 1:
            # one micro-batch: no float32 accumulator beside the gradients (a params-sized buffer
            # less at the peak); 0 + g == g, so the numbers are the same as through the scan
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, loss, aux), _ = micro((zeros, jnp.float32(0.0), aux0), first)
        else:
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, loss, aux), _ = jax.lax.scan(micro, (zeros, jnp.float32(0.0), aux0), batches)
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        # a non-finite step keeps params and optimiser state as they were. A branch, not
        # `where(ok, new, old)` over every leaf: that keeps the old and the new state alive together
        def apply(operands):
            g, o, p = operands
            if hasattr(tx, "apply"):  # train.optim.AdamW: no update tree beside the gradients
                new_p, new_o = tx.apply(g, o, p, gnorm)
            else:
                updates, new_o = tx.update(g, o, p)
                new_p = optax.apply_updates(p, updates)
            return jax.tree_util.tree_map(lambda n, old: n.astype(old.dtype), new_p, p), new_o

        new_params, new_opt = jax.lax.cond(ok, apply, lambda operands: (operands[2], operands[1]),
                                           (grads, opt_state, params))
        metrics = {"loss": loss, "grad_norm": gnorm, "skipped": 1.0 - ok.astype(jnp.float32), **aux}
        return new_params, new_opt, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def put_micro_batches(mb: dict, mesh):
    """Place [A, b, ...] micro-batches: b split over the data-parallel axes (data, fsdp) when it
    divides, A and the rest replicated. No mesh: left where it is. With several processes each
    one passes ITS rows and the global batch is their concatenation (grain shards by process)."""
    if mesh is None:
        return mb
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mtr_jax.parallel.rules import batch_sharding

    def place(x):
        spec = batch_sharding(mesh, 1).spec[0]
        n = 1
        for a in (spec if isinstance(spec, tuple) else (spec,) if spec else ()):
            n *= mesh.shape[a]
        if jax.process_count() > 1:
            sh = NamedSharding(mesh, P(None, spec, *([None] * (x.ndim - 2))))
            return jax.make_array_from_process_local_data(sh, x)
        if x.shape[1] % n:
            spec = None
        return jax.device_put(x, NamedSharding(mesh, P(None, spec, *([None] * (x.ndim - 2)))))

    return {k: place(v) for k, v in mb.items()}


def split_micro(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B/accum, ...] for every array of a batch."""

    def f(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum} micro-batches")
        return x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

    return {k: f(v) for k, v in batch.items()}
