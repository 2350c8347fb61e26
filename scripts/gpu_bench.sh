#!/usr/bin/env bash
# The benchmarks on a GPU machine, ours (JAX on CUDA) against the PyTorch peers on the same GPU.
# Needs JAX with CUDA, PyTorch with CUDA, flax, transformers and pyyaml in `python3`; run from the
# repository root (no install: the package is put on PYTHONPATH). Results: $OUT/*.json and *.log.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the card
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
for w in "sample" "forward" "sample --dtype bfloat16"; do
  name=$(echo "$w" | tr -d '-' | tr ' ' '_')
  flags=${XLA_FLAGS:-}
  # sample: XLA's GEMM autotuning of the float32 'highest' prefill programs ran past 2 minutes
  # of compile on an H100; without autotuning they compile in seconds (seen on an H200)
  case $w in sample*) flags="--xla_gpu_autotune_level=0 $flags" ;; esac
  XLA_FLAGS=$flags timeout "${BENCH_TIMEOUT:-180}" python3 -m mtr_jax.cli bench $w --json >"$OUT/$name.json" 2>"$OUT/$name.log"
  echo "== $w: exit $?"; tail -n 4 "$OUT/$name.log"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        print(f.stem, "no result"); continue
    extra = {k: r[k] for k in ("decode_ms_per_step", "bandwidth_bound_ms_per_step", "matmul_floor_ms_per_step",
                               "greedy_tokens_equal_before_first_divergence") if k in r}
    for d in ("float32", "bfloat16"):
        if d in r:
            extra[d] = {k: round(r[d][k], 4) for k in ("ours", "peer", "ratio", "ours_mfu", "peer_mfu", "loss_abs_diff")}
    if "multi_turn" in r:
        extra["multi_turn_speedup"] = r["multi_turn"]["speedup"]
    print(f.stem, r["device"], "|", r["peer_name"], "| ours", r["ours"], "peer", r["peer"], "ratio", r["ratio"], extra)
PY
