"""`model:` config section -> `Qwen2Config` and parameters, placed directly on the mesh.

Where the architecture comes from, first match wins:
  1. `init_from` set: the source's own config (an HF dir's or hub snapshot's config.json, a GGUF's
     metadata, `offline:NAME`, or our checkpoint's metadata), since the weights fix the shapes;
  2. `preset`: a path to an HF config.json / dir, or a name under configs/model/ (tiny,
     qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b).
Then `arch` overrides single fields, and dtype/param_dtype/remat/scan_layers come from the section.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import yaml

from mtr_jax.config import CONFIG_DIR, ModelConfig
from mtr_jax.errors import MtrError
from mtr_jax.model.qwen2 import REMAT_POLICIES, Qwen2Config, init_params

PRESET_DIR = CONFIG_DIR / "model"
_FIELDS = {f.name for f in dataclasses.fields(Qwen2Config)}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> Qwen2Config:
    """A preset name, or a path to an HF config.json or its directory."""
    p = pathlib.Path(name).expanduser()
    if p.exists():
        return Qwen2Config.from_file(p)
    f = PRESET_DIR / f"{name}.yaml"
    if not f.exists():
        raise MtrError(f"model.preset '{name}': not a file/dir and not one of {preset_names()}")
    d = yaml.safe_load(f.read_text()) or {}
    bad = sorted(set(d) - _FIELDS)
    if bad:
        raise MtrError(f"{f}: unknown Qwen2Config fields {bad}")
    return Qwen2Config(**d)


def init_source(mc: ModelConfig):
    """`model.init_from` resolved (see `model.sources`); errors name the config key."""
    from mtr_jax.model import sources

    try:
        return sources.resolve(mc.init_from)
    except MtrError as e:
        raise MtrError(f"model.init_from: {e}") from None


def resolve_model_config(mc: ModelConfig) -> Qwen2Config:
    """`model:` section -> Qwen2Config (see the module docstring for precedence)."""
    if mc.init_from:
        src = init_source(mc)
        if src.kind == "checkpoint":
            from mtr_jax.train.checkpoint import checkpoint_model_config

            cfg = checkpoint_model_config(src.path)
        else:
            from mtr_jax.model.hf_io import open_weights

            cfg, _, _ = open_weights(src)
    else:
        cfg = load_preset(mc.preset)
    arch = dict(mc.arch or {})
    bad = sorted(set(arch) - set(Qwen2Config.HF_FIELDS) - {"attention_block"})
    if bad:
        raise MtrError(f"model.arch: unknown Qwen2Config fields {bad} (known: {', '.join(Qwen2Config.HF_FIELDS)})")
    try:
        if mc.remat_policy not in REMAT_POLICIES:
            raise MtrError(f"model.remat_policy={mc.remat_policy!r}: expected one of {', '.join(REMAT_POLICIES)}")
        return cfg.replace(**arch, dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat, scan_layers=mc.scan_layers,
                           remat_policy=mc.remat_policy)
    except TypeError as e:
        raise MtrError(f"model.arch: {e}") from None


def build_params(mc: ModelConfig, mesh=None, key=None):
    """-> (params, Qwen2Config): random init (`init_from` empty) or the weights of `init_from`
    (HF dir, hub id, GGUF, offline:NAME or our checkpoint), each parameter created directly in
    its sharding on `mesh`."""
    from mtr_jax.parallel.rules import param_shardings

    cfg = resolve_model_config(mc)
    if mc.init_from:
        src = init_source(mc)
        if src.kind != "checkpoint":
            from mtr_jax.model.hf_io import load_hf_params

            params, loaded = load_hf_params(src, dtype=mc.param_dtype, mesh=mesh, config=cfg)
        else:
            from mtr_jax.train.checkpoint import load_params

            params, loaded = load_params(src.path, mesh=mesh, dtype=mc.param_dtype)
            _check_same_shapes(cfg, loaded, mc.init_from)
        return params, cfg
    key = jax.random.key(0) if key is None else key
    if mesh is None:
        return jax.jit(init_params, static_argnums=0)(cfg, key), cfg
    shardings = param_shardings(cfg, mesh)
    # jit with out_shardings: each device computes only its shard, nothing is gathered on one device
    params = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(cfg, key)
    return params, cfg


def _check_same_shapes(a: Qwen2Config, b: Qwen2Config, where: str) -> None:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings")
    diff = {k: (getattr(a, k), getattr(b, k)) for k in keys if getattr(a, k) != getattr(b, k)}
    if diff:
        raise MtrError(f"model.arch changes shapes of the checkpoint {where}: {diff}")
