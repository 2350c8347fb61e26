"""The one `mtr` entry point. Each subcommand lives in its own module, imported only when used
(so `mtr --help` and bad-input errors are fast and never import JAX needlessly).

Bad input anywhere raises `MtrError`; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mtr_jax.errors import MtrError

# subcommand -> (module, function, help). The function takes the parsed argparse namespace.
COMMANDS = {
    "demo": ("mtr_jax.demo", "cli", "embedded default: a real Qwen2.5 (offline) on a synthetic world, zero-shot -> LoRA SFT -> GRPO on CPU"),
    "make-tools": ("mtr_jax.tools.toolmaker", "cli", "ToolMaker over a dataset -> tools JSONL"),
    "make-traces": ("mtr_jax.tools.autoagent", "cli", "AutoAgent + ToolActor -> SFT traces JSONL"),
    "sft": ("mtr_jax.train.sft", "cli", "supervised fine-tuning on traces"),
    "grpo": ("mtr_jax.train.grpo", "cli", "GRPO with the composite trace reward"),
    "eval": ("mtr_jax.eval", "cli", "EM/F1 table per dataset"),
    "export-hf": ("mtr_jax.model.hf_io", "cli_export", "checkpoint -> Hugging Face directory"),
    "import-hf": ("mtr_jax.model.hf_io", "cli_import", "Hugging Face model -> checkpoint"),
    "bench": ("mtr_jax.bench", "cli", "benchmarks with ratios against a named peer"),
    "plan": ("mtr_jax.plan", "cli", "per-device memory plan: fits or not"),
    "report": ("mtr_jax.report", "cli", "PNG plots + markdown summary of a run"),
}

CONFIG_COMMANDS = {"make-tools", "make-traces", "sft", "grpo", "eval", "plan"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtr", description="Model-as-Tools Reasoning in JAX")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name in CONFIG_COMMANDS:
            sp.add_argument("--config", required=True, help="YAML config file")
            sp.add_argument("overrides", nargs="*", help="key=value overrides (e.g. sft.optim.lr=1e-4)")
        if name in ("sft", "grpo"):
            sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        if name in ("eval", "make-tools", "make-traces"):
            sp.add_argument("--limit", type=int, default=None, help="at most N records per dataset")
            sp.add_argument("--out", default=None, help="output file or directory")
        if name == "eval":
            sp.add_argument("--checkpoint", default=None, help="checkpoint dir to evaluate")
        if name == "demo":
            sp.add_argument("--out", default="runs/demo", help="output directory")
            sp.add_argument("--config", default=None, help="optional YAML overriding the demo defaults")
            sp.add_argument("--small", action="store_true", help="a minutes-scale smoke configuration")
            sp.add_argument("--model", default=None,
                            help="the Qwen2.5 to start from: hub id, HF dir, .gguf, checkpoint or offline:NAME "
                                 "(default: offline:qwen2.5-coder-0.5b-instruct)")
            sp.add_argument("--tiny", action="store_true", help="train a 1M-parameter Qwen2 from scratch instead (smoke run)")
            sp.add_argument("overrides", nargs="*", help="key=value overrides")
        if name == "export-hf":
            sp.add_argument("--checkpoint", required=True)
            sp.add_argument("--out", required=True)
            sp.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as stored)")
            sp.add_argument("--adapter-only", action="store_true",
                            help="write the LoRA adapter as a PEFT directory instead of a merged model")
        if name == "import-hf":
            sp.add_argument("--model", required=True, help="HF directory, hub id, GGUF file or offline:NAME")
            sp.add_argument("--out", required=True)
            sp.add_argument("--dtype", default="float32", help="storage dtype of the checkpoint: float32 | bfloat16")
            sp.add_argument("--mesh", default="fsdp=-1",
                            help="mesh the weights are loaded onto, e.g. data=1,fsdp=-1,tensor=1 (default: every device on fsdp)")
        if name == "bench":
            sp.add_argument("workload", choices=["forward", "sample", "grpo"])
            sp.add_argument("--json", action="store_true", help="print one JSON object")
            sp.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
            sp.add_argument("--dtype", default=None)
            sp.add_argument("--preset", default=None,
                            help="model shape, e.g. qwen2.5-0.5b (real weights when the offline extra is installed)")
            sp.add_argument("--batch", type=int, default=None, help="override the workload's batch size")
            sp.add_argument("--prompt", type=int, default=None, help="sample: prompt tokens; forward: sequence length")
            sp.add_argument("--new", type=int, default=None, help="sample: new tokens per row")
            sp.add_argument("--case", choices=["decode", "prefix", "quant"], default="decode",
                            help="sample: decode throughput (default), prefix-caching prefill, or an int8 copy vs the unquantized weights")
            sp.add_argument("--quant", choices=["int8", "int8-dynamic"], default=None,
                            help="sample --case quant: weight-only int8, or W8A8 with dynamic activation scales (default)")
            sp.add_argument("--remat-policy", choices=["full", "dots", "none"], default=None,
                            help="forward at a preset: what a layer keeps for the backward (default full; none = no remat)")
        if name == "plan":
            sp.add_argument("--stage", choices=["sft", "grpo", "both"], default="both", help="which stage(s) to plan")
            sp.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "report":
            sp.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module, func, _ = COMMANDS[args.command]
    from mtr_jax.paths import use_gcs_emulator

    use_gcs_emulator()  # STORAGE_EMULATOR_HOST set: every GCS client (gcsfs, tensorstore) goes there
    try:
        if getattr(args, "config", None) is not None or args.command in CONFIG_COMMANDS:
            from mtr_jax.config import load_config

            if args.command != "demo":
                args.cfg = load_config(args.config, args.overrides)
        handler = getattr(importlib.import_module(module), func)
        rc = handler(args)
        return int(rc or 0)
    except MtrError as e:
        print(f"mtr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
