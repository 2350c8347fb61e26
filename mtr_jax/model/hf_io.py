"""Hugging Face <-> JAX weights for Qwen2 / Qwen2.5, one tensor at a time.

Sources: an HF directory, a hub id, a GGUF file or `offline:NAME` (resolved by `sources`; GGUF
tensors are dequantized by `gguf_io`), or one of our checkpoints.

Loading reads safetensors one tensor at a time with plain file reads (our own 30-line reader:
numpy has no bfloat16, so `safetensors.numpy` cannot hand out bf16 tensors; no memory map, whose
pages would stay resident and count against the host) and builds each parameter with
`jax.make_array_from_callback` straight into its target sharding and storage dtype: one
parameter's host copy exists at a time (the layers of a stacked weight, transposed and cast), then
every device takes only its own shard and the copy is dropped. So a sharded 7B model is never
materialised whole on a host. HF stores Linear weights [out, in]; we store [in, out] and stack
layers on a leading axis.

Export streams the other way: one HF tensor at a time from device to a safetensors file, split
into shards with an index above `max_shard_bytes`. Tied embeddings write no `lm_head.weight`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import struct
import sys

import jax
import ml_dtypes
import numpy as np

from mtr_jax import paths
from mtr_jax.errors import MtrError
from mtr_jax.model.qwen2 import DTYPES, Qwen2, Qwen2Config, param_specs

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)

# ---------------------------------------------------------------------------------------------
# safetensors, read via mmap and written by streaming.


class SafetensorsFile:
    """Lazy reader: `get(name)` reads that tensor's bytes (and nothing else) into a new array."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or n > 100_000_000:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise MtrError(f"{path}: not a readable safetensors file ({e})") from None
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}
        self.offset = 8 + n

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise MtrError(f"{self.path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        try:
            raw = np.fromfile(self.path, dtype=np.uint8, count=max(end - start, 0), offset=self.offset + start)
        except (OSError, ValueError) as e:
            raise MtrError(f"{self.path}: cannot read tensor '{name}' ({e})") from None
        if end < start or raw.size != end - start or raw.size != dt.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
            raise MtrError(f"{self.path}: tensor '{name}' is truncated")
        return raw.view(dt).reshape(info["shape"])


def write_safetensors(path: pathlib.Path, tensors: list[tuple[str, tuple, np.dtype, callable]]) -> None:
    """tensors: (name, shape, numpy dtype, fetch() -> np.ndarray). Header first, then each tensor
    fetched and written in turn, so only one tensor is on the host at a time."""
    header, off = {}, 0
    for name, shape, dt, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dt)], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the spec asks for an 8-byte aligned data section
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dt, fetch in tensors:
            a = np.ascontiguousarray(fetch(), dtype=dt)
            if a.shape != tuple(shape):
                raise RuntimeError(f"tensor {name}: fetched shape {a.shape} != {shape}")
            f.write(a.tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Name mapping: our param path -> HF tensor name(s) and whether the HF tensor is transposed.


def hf_names(cfg: Qwen2Config) -> dict:
    """{our path tuple: ([hf name per layer] or [hf name], transpose)}."""
    L = cfg.num_hidden_layers
    per_layer = {
        "input_norm": ("input_layernorm.weight", False),
        "post_norm": ("post_attention_layernorm.weight", False),
        "q_w": ("self_attn.q_proj.weight", True),
        "q_b": ("self_attn.q_proj.bias", False),
        "k_w": ("self_attn.k_proj.weight", True),
        "k_b": ("self_attn.k_proj.bias", False),
        "v_w": ("self_attn.v_proj.weight", True),
        "v_b": ("self_attn.v_proj.bias", False),
        "o_w": ("self_attn.o_proj.weight", True),
        "gate_w": ("mlp.gate_proj.weight", True),
        "up_w": ("mlp.up_proj.weight", True),
        "down_w": ("mlp.down_proj.weight", True),
    }
    out = {
        ("embed",): (["model.embed_tokens.weight"], False),
        ("final_norm",): (["model.norm.weight"], False),
    }
    for k, (suffix, t) in per_layer.items():
        out[("layers", k)] = ([f"model.layers.{i}.{suffix}" for i in range(L)], t)
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = (["lm_head.weight"], True)
    return out


def torch_model(params, cfg: Qwen2Config, dtype: str = "float32"):
    """transformers' PyTorch `Qwen2ForCausalLM` holding exactly `params` (the peer of the benchmarks
    and the oracle of the tests), built in memory through the same name map as `export_hf`."""
    import torch
    import transformers

    hf = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict("float32").items() if k != "dtype"})
    model = transformers.Qwen2ForCausalLM(hf).eval().to(torch.float32)
    sd = {}
    for path, (names, transpose) in hf_names(cfg).items():
        arr = np.asarray(_get_path(params, path), np.float32)
        for i, n in enumerate(names):
            a = arr[i] if path[0] == "layers" else arr
            sd[n] = torch.from_numpy(np.array(a.T if transpose else a))  # writable copy
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any("lm_head" not in m for m in missing):
        raise RuntimeError(f"torch_model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(getattr(torch, dtype))


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Loading.


def _open_weights(d: pathlib.Path) -> dict:
    """{hf tensor name: SafetensorsFile}, from the index when sharded."""
    index = d / "model.safetensors.index.json"
    files: dict[str, SafetensorsFile] = {}
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MtrError(f"{index}: invalid safetensors index ({e})") from None
        out = {}
        for name, fname in wmap.items():
            fp = d / fname
            if fname not in files:
                if not fp.exists():
                    raise MtrError(f"{index}: lists shard '{fname}' which does not exist")
                files[fname] = SafetensorsFile(fp)
            if name not in files[fname].header:
                raise MtrError(f"{fp}: missing tensor '{name}' (listed in {index.name})")
            out[name] = files[fname]
        return out
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        if list(d.glob("*.bin")) or list(d.glob("*.pth")):
            raise MtrError(f"{d}: only PyTorch .bin weights found; convert to safetensors first")
        raise MtrError(f"{d}: no *.safetensors weights found")
    out = {}
    for fp in shards:
        f = SafetensorsFile(fp)
        for name in f.keys():
            out[name] = f
    return out


def open_weights(spec, config: Qwen2Config | None = None):
    """-> (Qwen2Config, {hf tensor name: reader with shape()/get()/path}, where) for a GGUF file or
    an HF directory (local, hub id, offline:NAME); `where` names the source in error messages."""
    from mtr_jax.model import sources

    src = spec if isinstance(spec, sources.Source) else sources.resolve(spec)
    if src.kind == "gguf":
        from mtr_jax.model.gguf_io import open_gguf

        file_cfg, gw = open_gguf(src.path)
        cfg = config or file_cfg
        return cfg, {n: gw for names, _ in hf_names(cfg).values() for n in names if n in gw}, src.path
    if src.kind != "hf_dir":
        raise MtrError(f"{src.spec}: a checkpoint directory, not a Hugging Face model (no config.json)")
    d = src.path
    cfg = config or Qwen2Config.from_file(d)
    index_file = d / "model.safetensors.index.json"
    return cfg, _open_weights(d), index_file if index_file.exists() else d


def load_hf_params(path_or_hub_id, dtype: str = "float32", mesh=None, shardings=None, config: Qwen2Config | None = None):
    """-> (params dict, Qwen2Config) from any model spec `sources.resolve` accepts (HF dir, hub id,
    GGUF file, offline:NAME, our checkpoint). Each param is built directly in its target sharding
    (`parallel.rules.param_shardings(cfg, mesh)` when `mesh` is given, else device 0), one HF
    tensor at a time."""
    from mtr_jax.model import sources

    if dtype not in DTYPES:
        raise MtrError(f"dtype '{dtype}': expected one of {sorted(DTYPES)}")
    src = path_or_hub_id if isinstance(path_or_hub_id, sources.Source) else sources.resolve(path_or_hub_id)
    if src.kind == "checkpoint":
        from mtr_jax.train.checkpoint import load_params

        return load_params(src.path, mesh=mesh, dtype=dtype)
    cfg, weights, where = open_weights(src, config)
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    specs = param_specs(cfg)
    if shardings is None:
        if mesh is not None:
            from mtr_jax.parallel.rules import param_shardings

            shardings = param_shardings(cfg, mesh)
        else:
            single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: single, specs, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple))
    target = np.dtype(DTYPES[dtype])
    plan = []
    for path, (names, transpose) in hf_names(cfg).items():  # validate everything before reading
        shape, _ = _get_path(specs, path)
        stacked = path[0] == "layers"
        want = shape[1:] if stacked else shape
        want_hf = tuple(reversed(want)) if transpose else tuple(want)
        for n in names:
            if n not in weights:
                raise MtrError(f"{where}: missing tensor '{n}'")
            got = weights[n].shape(n)
            if got != want_hf:
                raise MtrError(f"{weights[n].path}: tensor '{n}' has shape {list(got)}, expected {list(want_hf)} for this config")
        plan.append((path, names, transpose, shape, stacked))
    params: dict = {}
    for path, names, transpose, shape, stacked in plan:
        # this parameter's host copy, in the storage dtype and our layout: each HF tensor read once
        if stacked:
            full = np.empty(tuple(shape), target)
            for i, n in enumerate(names):
                a = weights[n].get(n)
                full[i] = a.T if transpose else a
                del a
        else:  # a view of what was read when it is already in the storage dtype: no second copy
            a = weights[names[0]].get(names[0])
            full = np.asarray(a.T if transpose else a, target)
            del a
        arr = jax.make_array_from_callback(tuple(shape), _get_path(shardings, path), lambda idx, full=full: full[idx])
        arr.block_until_ready()  # the transfers are done with `full` before the next one is built
        del full
        _set_path(params, path, arr)
        for r in {id(weights[n]): weights[n] for n in names}.values():
            getattr(r, "clear", lambda: None)()  # a GGUF reader's dequantized copies are no longer needed
    return params, cfg


def load_hf(path_or_hub_id: str, dtype: str = "float32", mesh=None):
    """-> (Qwen2 NNX module, Qwen2Config) from an HF dir, hub id, GGUF file, offline:NAME or
    checkpoint (see `mtr_jax.model.sources`)."""
    params, cfg = load_hf_params(path_or_hub_id, dtype=dtype, mesh=mesh)
    return Qwen2(cfg, params=params), cfg


# ---------------------------------------------------------------------------------------------
# Export.


def _to_host(a) -> np.ndarray:
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))


def export_hf(model_or_params, config: Qwen2Config, out_dir, tokenizer=None, dtype: str | None = None,
              max_shard_bytes: int = 5 * 1024**3) -> pathlib.Path:
    """Write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `tokenizer`: a transformers tokenizer (saved with `save_pretrained`) or a directory whose
    tokenizer files are copied. `dtype`: float32 | bfloat16 (default: the config's param_dtype).
    """
    params = model_or_params.params() if isinstance(model_or_params, Qwen2) else model_or_params
    from mtr_jax.model import lora

    params = lora.merged(params, config.lora_alpha)  # LoRA adapters folded in (no-op without them)
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise MtrError(f"dtype '{dtype}': expected one of {sorted(DTYPES)}")
    np_dt = np.dtype(DTYPES[dtype])
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0

    tensors = []
    for path, (names, transpose) in hf_names(config).items():
        arr = _get_path(params, path)
        stacked = path[0] == "layers"
        for i, name in enumerate(names):
            shape = arr.shape[1:] if stacked else arr.shape
            shape = tuple(reversed(shape)) if transpose else tuple(shape)

            def fetch(arr=arr, i=i, stacked=stacked, transpose=transpose):
                a = _to_host(arr[i] if stacked else arr)  # one layer slice at a time
                a = a.astype(np_dt)
                return a.T if transpose else a

            tensors.append((name, shape, np_dt, fetch))

    # group into shards of at most max_shard_bytes (a tensor bigger than that gets its own shard)
    shards, cur, cur_bytes = [], [], 0
    for t in tensors:
        n = int(np.prod(t[1], dtype=np.int64)) * np_dt.itemsize
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += n
    shards.append(cur)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        if main:
            old.unlink()
    if len(shards) == 1:
        if main:
            write_safetensors(out / "model.safetensors", shards[0])
        else:
            for t in shards[0]:
                t[3]()  # every process joins the all-gathers
    else:
        wmap, total = {}, 0
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            if main:
                write_safetensors(out / fname, shard)
            else:
                for t in shard:
                    t[3]()
            for name, shape, _, _ in shard:
                wmap[name] = fname
                total += int(np.prod(shape, dtype=np.int64)) * np_dt.itemsize
        if main:
            (out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2)
            )
    if not main:
        return out

    hf_cfg = config.to_hf_dict(torch_dtype=dtype)
    hf_cfg["torch_dtype"] = dtype  # transformers 4 reads this key, 5 reads "dtype"
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {"_from_model_config": True}
    if config.bos_token_id is not None:
        gen["bos_token_id"] = config.bos_token_id
    if config.eos_token_id is not None:
        gen["eos_token_id"] = config.eos_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out))
        else:
            copy_tokenizer_files(tokenizer, out)
    return out


def copy_tokenizer_files(src, dst) -> int:
    """Copy the HF tokenizer files found in `src` into `dst`; returns how many were copied."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not src.is_dir():
        raise MtrError(f"tokenizer directory not found: {src}")
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# CLI.


def _peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include a forking parent's)."""
    try:
        return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] / 2**20
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _mesh_arg(text: str) -> dict:
    """'data=1,fsdp=-1' -> {'data': 1, 'fsdp': -1}, or MtrError."""
    out = {}
    for part in str(text).split(","):
        k, sep, v = part.partition("=")
        k = k.strip()
        if not sep or k not in ("data", "fsdp", "tensor"):
            raise MtrError(f"--mesh {text!r}: expected AXIS=N pairs over data, fsdp, tensor (e.g. fsdp=-1)")
        try:
            out[k] = int(v)
        except ValueError:
            raise MtrError(f"--mesh {text!r}: {k}={v!r} is not an integer") from None
    return out


def cli_import(args) -> int:
    """`mtr import-hf --model SPEC --out DIR [--dtype]`: an HF dir, hub id, GGUF file or
    offline:NAME -> our checkpoint (step 0), with its tokenizer next to it."""
    from mtr_jax.model import sources
    from mtr_jax.train.checkpoint import Checkpointer

    out = paths.path(args.out)  # local or gs://
    # every check before any work (and before orbax starts its threads)
    if paths.is_remote(args.out):
        paths.check_writable(args.out, "--out")
    if out.is_dir() and any(c.name.isdigit() for c in out.iterdir()):
        raise MtrError(f"--out {out} already holds a checkpoint; choose an empty directory")
    from mtr_jax.parallel.mesh import make_mesh

    # one tensor at a time, each straight into its shard of the mesh (a 7B never sits whole on a host)
    mesh = make_mesh(_mesh_arg(getattr(args, "mesh", None) or "fsdp=-1"))
    src = sources.resolve(args.model)
    if src.kind == "checkpoint":
        raise MtrError(f"--model {args.model}: already one of our checkpoints (nothing to import)")
    params, cfg = load_hf_params(src, dtype=args.dtype or "float32", mesh=mesh)
    try:
        tok_dir = sources.tokenizer_dir(src.path)
    except MtrError as e:  # the weights are still worth importing; say so and go on
        print(f"mtr import-hf: warning: no tokenizer imported: {e}", file=sys.stderr)
        tok_dir = None
    meta = {"model_config": dataclasses.asdict(cfg), "source": str(args.model)}
    if tok_dir:
        meta["tokenizer"] = "tokenizer"  # relative to the checkpoint dir
    ck = Checkpointer(out, keep=1)
    ck.save(0, {"params": params}, meta=meta, force=True)
    ck.close()
    ntok = 0
    if tok_dir:  # after the checkpoint: a writer's start-up clean-up on GCS removes unmarked directories
        with paths.local_dir_for_write(out / "tokenizer") as d:
            ntok = copy_tokenizer_files(tok_dir, d)
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    peak = _peak_rss_gib()
    print(f"imported {args.model} -> {out} ({n / 1e6:.1f}M params, {cfg.param_dtype}{', tokenizer' if ntok else ''}; "
          f"mesh {dict(mesh.shape)}, peak host RSS {peak:.2f} GiB)")
    return 0


def export_peft_adapter(params, config: Qwen2Config, out_dir, base_name: str = "") -> pathlib.Path:
    """A PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads: lora_A = a.T [r, in], lora_B = b.T
    [out, r], scale lora_alpha / r as ours."""
    from mtr_jax.model import lora

    _, ad = lora.split_adapters(params)
    if not ad:
        raise MtrError("--adapter-only: this checkpoint has no LoRA adapters")
    keys = lora.adapter_keys(ad)
    r = int(ad["layers"][keys[0] + lora.SEP + "a"].shape[-1])
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = []
    for k in keys:
        a, b = ad["layers"][k + lora.SEP + "a"], ad["layers"][k + lora.SEP + "b"]
        for i in range(config.num_hidden_layers):
            stem = f"base_model.model.model.layers.{i}.{lora.PEFT_NAMES[k]}"
            tensors.append((f"{stem}.lora_A.weight", (r, a.shape[1]), np.float32, lambda a=a, i=i: _to_host(a[i]).astype(np.float32).T))
            tensors.append((f"{stem}.lora_B.weight", (b.shape[2], r), np.float32, lambda b=b, i=i: _to_host(b[i]).astype(np.float32).T))
    if jax.process_index() == 0:
        write_safetensors(out / "adapter_model.safetensors", tensors)
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": config.lora_alpha,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "target_modules": sorted(lora.PEFT_NAMES[k].split(".")[-1] for k in keys),
            "base_model_name_or_path": base_name, "inference_mode": True,
        }, indent=2))
    return out


def cli_export(args) -> int:
    """`mtr export-hf --checkpoint DIR --out DIR [--dtype] [--adapter-only]`: latest step of our
    checkpoint -> HF dir (LoRA adapters merged), or with --adapter-only a PEFT adapter dir."""
    from mtr_jax.train.checkpoint import Checkpointer, _root_and_step, find_tokenizer, load_params

    params, cfg = load_params(args.checkpoint)
    if getattr(args, "adapter_only", False):
        root, step = _root_and_step(args.checkpoint, None)
        ck = Checkpointer(root, keep=None, read_only=True)
        meta = ck.meta(step)
        base = meta.get("base", "")
        ck.close()
        if (meta.get("lora") or {}).get("token_ids"):
            raise MtrError(f"{args.checkpoint}: this LoRA run also trained embedding/head rows (lora.trainable_tokens), "
                           "which a PEFT adapter directory here would not carry; export the merged model (drop --adapter-only)")
        with paths.local_dir_for_write(args.out) as d:
            export_peft_adapter(params, cfg, d, base_name=str(base))
        print(f"exported the LoRA adapter of {args.checkpoint} -> {args.out} (base: {base})")
        return 0
    tok = find_tokenizer(args.checkpoint)
    with paths.local_dir_for_write(args.out) as d:  # gs://: written locally, then uploaded
        export_hf(params, cfg, d, tokenizer=str(tok) if tok else None, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {args.out}{' (with tokenizer)' if tok else ''}")
    return 0
