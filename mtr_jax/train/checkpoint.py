"""Checkpoints: orbax `CheckpointManager` under one small API, and the one on-disk layout.

Layout. A checkpoint dir is an orbax root: `DIR/<step>/` holds one orbax item per top-level key
of the saved state (`params`, `opt_state`, `rng`, ...) plus `meta` (JSON: `model_config`, data-
iterator state, anything). Saving each key as its own item lets eval/export restore `params` alone
without knowing the optimizer. `mtr import-hf` writes step 0 with just `params`; training runs
write `RUN_DIR/checkpoints/` (a run dir is accepted wherever a checkpoint dir is).

Safety. orbax writes a step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous steps intact and the half-written one invisible.

Any mesh. `restore(target=...)` takes `jax.ShapeDtypeStruct`s carrying the *new* shardings, so a
checkpoint saved on one mesh lands directly sharded on another (or on one device).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mtr_jax import paths
from mtr_jax.errors import MtrError


class _PartialRestoreNoise(logging.Filter):
    """Orbax warns for every item a partial restore leaves out (`items=["params"]` on purpose)."""

    def filter(self, record):
        return "was found in the checkpoint, but could not be restored" not in record.getMessage()


logging.getLogger("absl").addFilter(_PartialRestoreNoise())

META = "meta"


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Typed PRNG keys are not serialisable: store their uint32 key data instead."""
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


class Checkpointer:
    """`Checkpointer(dir, keep=3)`; `save(step, {"params":..., "opt_state":..., "rng":...}, meta)`;
    `restore(step=None, target=None) -> (state, meta)`; `latest_step()`; `wait()`; `close()`."""

    def __init__(self, directory, keep: int | None = 3, async_save: bool = True, read_only: bool = False):
        self.directory = paths.path(directory)  # local or gs:// (orbax takes epath)
        # a writer removes tmp dirs left by a killed save; a reader must not (a live run may own them)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # (orbax's own read_only mode logs warnings)
        )
        self._opts = opts
        registry = None
        if paths.is_remote(directory) and os.environ.get("STORAGE_EMULATOR_HOST"):
            # a GCS emulator ignores generation preconditions, which OCDBT's manifest writes rely on
            # (seen: hangs and "Malformed StorageGeneration"); real GCS keeps orbax's default, OCDBT
            registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
            arrays, js = ocp.StandardCheckpointHandler(use_ocdbt=False), ocp.JsonCheckpointHandler()
            for args_type, h in ((ocp.args.StandardSave, arrays), (ocp.args.StandardRestore, arrays),
                                 (ocp.args.JsonSave, js), (ocp.args.JsonRestore, js)):
                registry.add(None, args_type, h)
        self._mngr = ocp.CheckpointManager(self.directory, options=opts, handler_registry=registry)

    # -- saving --------------------------------------------------------------------------------

    def save(self, step: int, state: dict, meta: dict | None = None, force: bool = False) -> bool:
        """Start saving `state` (a dict of pytrees) at `step`; returns whether a save started.
        Async: the arrays are copied off-device first, so training may continue (and donate)."""
        if not isinstance(state, dict) or not state:
            raise TypeError("Checkpointer.save: state must be a non-empty dict of pytrees")
        if META in state:
            raise ValueError(f"Checkpointer.save: '{META}' is reserved for the JSON metadata")
        try:
            json.dumps(meta or {})
        except TypeError as e:
            raise TypeError(f"Checkpointer.save: meta must be JSON-serialisable ({e})") from None
        items = {k: ocp.args.StandardSave(_wrap(_keys_to_data(v))) for k, v in state.items()}
        items[META] = ocp.args.JsonSave(dict(meta or {}))
        return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Block until the pending async save is committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    # -- reading -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def items(self, step: int) -> list[str]:
        d = self.directory / str(step)
        return sorted(p.name for p in d.iterdir() if p.is_dir() and p.name != META and not p.name.startswith((".", "_")))

    def meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(out[META] or {})

    def _step(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise MtrError(f"no checkpoint found in {self.directory}")
        elif step not in self.all_steps():
            raise MtrError(f"{self.directory}: no checkpoint for step {step} (have {self.all_steps()})")
        return int(step)

    def restore(self, step: int | None = None, target: dict | None = None, items: list[str] | None = None):
        """-> (state dict, meta dict). `target`: {item: pytree of jax.ShapeDtypeStruct with
        .sharding} (e.g. from `jax.eval_shape` + shardings of the new mesh); items without a
        target are restored onto one device with their saved shapes and dtypes."""
        step = self._step(step)
        names = list(items) if items is not None else self.items(step)
        target = dict(target or {})
        missing = [n for n in list(names) + list(target) if n not in self.items(step)]
        if missing:
            raise MtrError(f"{self.directory}/{step}: no item(s) {missing} (have {self.items(step)})")
        names = list(dict.fromkeys(names + list(target)))
        meta_tree = self._mngr.item_metadata(step)
        args, keys_in = {}, {}
        for n in names:
            t = target.get(n)
            if t is None:
                t = _target_from_metadata(meta_tree[n])
            else:
                t = _wrap(t)
            t, keys_in[n] = _split_keys(t)
            args[n] = ocp.args.StandardRestore(t)
        args[META] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        state = {n: _unwrap(_join_keys(out[n], keys_in[n])) for n in names}
        return state, dict(out[META] or {})


_LEAF = "_leaf"


def _wrap(x):
    """orbax's StandardSave wants a container: a bare array/scalar item is stored as {"_leaf": x}."""
    return {_LEAF: x} if not isinstance(x, (dict, list, tuple)) else x


def _unwrap(x):
    return x[_LEAF] if isinstance(x, dict) and set(x) == {_LEAF} else x


def _target_from_metadata(md):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(m):
        if hasattr(m, "shape") and hasattr(m, "dtype"):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev)
        return m

    return jax.tree_util.tree_map(leaf, md, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _split_keys(target):
    """Replace typed-key leaves of a target by their uint32 key-data struct; remember the impl."""
    impls = []

    def f(x):
        if _is_key(x):
            impls.append(jax.random.key_impl(x) if isinstance(x, jax.Array) else x.dtype._impl)
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
        impls.append(None)
        return x

    return jax.tree_util.tree_map(f, target), impls


def _join_keys(tree, impls):
    if not any(i is not None for i in impls):
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [jax.random.wrap_key_data(x, impl=i) if i is not None else x for x, i in zip(leaves, impls)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------------
# Params + model config from any of our checkpoint dirs (import-hf output or a training run).


def resolve_root(path):
    """The orbax root for `path` (local or gs://): the dir itself, its `checkpoints/` (a run dir)."""
    p = paths.path(path)
    if not paths.exists(p):
        raise MtrError(f"checkpoint directory not found: {p}")
    if not p.is_dir():
        raise MtrError(f"checkpoint path is not a directory: {p}")
    if (p / "checkpoints").is_dir() and not any(c.name.isdigit() for c in p.iterdir()):
        return p / "checkpoints"
    return p


def _root_and_step(path, step):
    p = resolve_root(path)
    if step is None and p.name.isdigit() and (p / META).exists():  # a step dir was given
        return p.parent, int(p.name)
    return p, step


def load_params(ckpt_dir, mesh=None, step: int | None = None, dtype: str | None = None):
    """-> (params, Qwen2Config) from the latest (or given) step, placed with
    `param_shardings(cfg, mesh)` (or on one device). `dtype` casts the stored params."""
    from mtr_jax.model.qwen2 import param_specs

    root, step = _root_and_step(ckpt_dir, step)
    ck = Checkpointer(root, keep=None, read_only=True)
    meta = ck.meta(step)
    cfg = _model_config(meta, root)
    if meta.get("lora"):
        ck.close()
        return _load_lora(root, step, meta, cfg, mesh, dtype)
    if mesh is not None:
        from mtr_jax.parallel.rules import param_shardings

        shard = param_shardings(cfg, mesh)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shard = jax.tree_util.tree_map(lambda _: dev, param_specs(cfg), is_leaf=_is_spec)
    specs = param_specs(cfg)
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s[0], cfg.storage_dtype, sharding=sh), specs, shard, is_leaf=_is_spec
    )
    state, _ = ck.restore(step, target={"params": target}, items=["params"])
    ck.close()
    params = state["params"]
    if dtype and dtype != cfg.param_dtype:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
        params = jax.tree_util.tree_map(lambda a: a.astype(cfg.storage_dtype), params)
    return params, cfg


def _load_lora(root, step, meta, cfg, mesh, dtype):
    """A LoRA checkpoint holds adapters only: load its base (`meta["base"]`, any model spec) and
    return base + adapters in one params tree (the model applies them; export merges them)."""
    from mtr_jax.model import lora
    from mtr_jax.model.hf_io import load_hf_params

    ls = meta["lora"]
    if not meta.get("base"):
        raise MtrError(f"{root}: LoRA checkpoint without a base model (meta 'base')")
    base, _ = load_hf_params(meta["base"], dtype=dtype or ls.get("base_dtype", "float32"), mesh=mesh)
    if mesh is not None:
        from mtr_jax.parallel.rules import adapter_shardings

        shard = adapter_shardings(cfg, mesh, ls["targets"], ls["rank"])
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shard = jax.tree_util.tree_map(lambda _: dev, lora.adapter_specs(cfg, ls["targets"], ls["rank"]), is_leaf=_is_spec)
    target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s[0], jnp.float32, sharding=sh),
                                    lora.adapter_specs(cfg, ls["targets"], ls["rank"]), shard, is_leaf=_is_spec)
    ids = ls.get("token_ids") or []
    if ids:  # trainable token rows (lora.token_rows), replicated
        E = cfg.hidden_size
        rep = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
               else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        names = ["embed" + lora.ROWS] + ([] if cfg.tie_word_embeddings else ["lm_head" + lora.ROWS])
        target.update({k: jax.ShapeDtypeStruct((len(ids), E), jnp.float32, sharding=rep) for k in names})
    ck = Checkpointer(root, keep=None, read_only=True)
    try:
        state, _ = ck.restore(step, target={"params": target}, items=["params"])
    finally:
        ck.close()
    if ls.get("base_quant") == "int8":  # the model trained against the int8-rounded base
        base = lora.dequantized(lora.quantize_base(base))
    cfg = cfg.replace(param_dtype=dtype or cfg.param_dtype, lora_alpha=float(ls["alpha"]))
    return lora.with_adapters(base, state["params"], ids), cfg


def _model_config(meta: dict, root):
    from mtr_jax.model.qwen2 import Qwen2Config

    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise MtrError(f"{root}: checkpoint metadata has no 'model_config'")
    names = {f.name for f in dataclasses.fields(Qwen2Config)}
    try:
        return Qwen2Config(**{k: v for k, v in mc.items() if k in names})
    except TypeError as e:
        raise MtrError(f"{root}: bad model_config in checkpoint metadata ({e})") from None


def checkpoint_model_config(ckpt_dir, step: int | None = None):
    """The Qwen2Config recorded in a checkpoint's metadata (latest step unless given)."""
    root, step = _root_and_step(ckpt_dir, step)
    ck = Checkpointer(root, keep=None, read_only=True)
    try:
        return _model_config(ck.meta(step), root)
    finally:
        ck.close()


def _is_spec(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def find_tokenizer(ckpt_dir) -> pathlib.Path | None:
    """The tokenizer dir recorded in a checkpoint's meta (relative to its root), if any; a local
    copy when the checkpoint is on gs:// (tokenizers read local files)."""
    root, step = _root_and_step(ckpt_dir, None)
    ck = Checkpointer(root, keep=None, read_only=True)
    try:
        meta = ck.meta(step)
    finally:
        ck.close()
    # meta's own entry; DIR/tokenizer (import-hf, older runs); RUN_DIR/tokenizer (a run dir's checkpoints/ root)
    for cand in (meta.get("tokenizer"), "tokenizer", "../tokenizer"):
        if cand:
            if paths.is_remote(cand) or pathlib.Path(cand).is_absolute():
                p = paths.path(cand)
            else:
                p = root.parent / "tokenizer" if cand == "../tokenizer" else root / cand
            if (p / "tokenizer_config.json").exists() or (p / "tokenizer.json").exists():
                return paths.localize(p)
    return None
