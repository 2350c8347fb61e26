"""Typed dataclass configs: YAML files plus `key=value` overrides, validated with one-line errors.

A run config is one `Config` made of sections. `load_config(path, overrides)` reads YAML, applies
dotted overrides (`sft.lr=1e-4`, `mesh.fsdp=4`), and type-checks every leaf against the dataclass
annotations; an unknown key or a value of the wrong type raises `MtrError` naming the key.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mtr_jax.errors import MtrError

# shipped inside the package (a non-editable install has them); the repo's top-level configs/ links here
CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a file under configs/model/ (without .yaml), or a path to an HF config.json/dir
    arch: dict = field(default_factory=dict)  # overrides of Qwen2Config fields (hidden_size=..., ...)
    init_from: str = ""  # "" = random init; else an HF checkpoint dir or an orbax checkpoint dir
    tokenizer: str = ""  # HF tokenizer dir; "" = the one next to init_from
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage / master-weight dtype
    remat: bool = False
    # with remat: what a layer keeps for the backward. full = nothing (recompute the layer);
    # dots = every matmul output (no matmul recomputed, the elementwise work and attention are)
    remat_policy: str = "full"
    scan_layers: bool = False


@dataclass
class LoraConfig:
    """LoRA on the frozen base (model/lora.py): only the adapters train; GRPO's reference is the
    base itself (no second copy of the weights)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    targets: list = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    dropout: float = 0.0  # on each adapter's input while training (as peft's lora_dropout); 0 = off
    base_dtype: str = "bfloat16"  # storage of the frozen base
    base_quant: str = "none"  # none | int8 (QLoRA: int8 base, one float32 scale per output column)
    # embedding / head rows that train too (peft's trainable_token_indices): the trace grammar's
    # tool tags, which some Qwen2.5 checkpoints (the Coder-0.5B-Instruct) never learned;
    # a PEFT adapter-only export cannot carry them (export the merged model)
    trainable_tokens: list = field(default_factory=list)  # e.g. ["<tool_call>", "</tool_call>"] (the demo does)
    token_init: str = "base"  # base: start from the checkpoint's rows | pieces: the mean of the token text's pieces


@dataclass
class MeshConfig:
    data: int = -1  # -1 takes the remaining devices
    fsdp: int = 1
    tensor: int = 1


@dataclass
class DataConfig:
    datasets: list = field(default_factory=list)  # [{"name": "hotpotqa", "path": "...", "split": "dev"}]
    limit: int = 0  # 0 = all
    seed: int = 0
    batch_size: int = 8
    max_len: int = 1024
    traces: str = ""  # SFT traces JSONL
    tools: str = ""  # tools JSONL (make-tools output)


@dataclass
class ToolsConfig:
    toolmaker: str = "template"  # template | llm
    toolactor: str = "corpus"  # corpus | llm | http
    autoagent: str = "oracle"  # oracle | llm
    base_url: str = ""  # OpenAI-compatible endpoint for http backends
    model_name: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key (never logged)
    timeout_s: float = 30.0
    retries: int = 3
    noise: float = 0.0  # share of irrelevant results injected by the ToolActor
    cache: str = ""  # SQLite observation cache path ("" = <out_dir>/tool_cache.sqlite)
    top_k: int = 3
    keep_metric: str = "em"  # em | f1: AutoAgent keeps traces whose answer passes this
    keep_threshold: float = 1.0
    corpus: str = ""  # corpus JSONL ({"title", "text"} per line) for records without their own context
    backoff_s: float = 0.5  # first retry delay of the ToolActor's LLM/HTTP backends, doubled per retry
    # the model behind every `llm` role (mtr_jax.llm): HTTP when base_url is set, else this local model
    llm: str = ""  # a model spec load_hf accepts, e.g. offline:qwen2.5-coder-0.5b-instruct
    llm_dtype: str = "bfloat16"
    llm_max_len: int = 2048  # prompt + reply tokens per conversation (local backend)
    llm_batch: int = 16  # conversations decoded together (local backend)
    constrained: bool = True  # local backend: JSON-Schema-constrained decoding (llguidance)
    max_tokens: int = 512  # reply budget per request
    max_calls: int = 6  # AutoAgent: tool calls per trace before it is rejected as max_turns
    # AutoAgent oracle: the share of HotpotQA-shaped records (fixed per id) whose first search is the
    # question's keywords instead of the whole question
    keyword_query_rate: float = 0.0
    # AutoAgent oracle: the share of HotpotQA-shaped records (stratified per question template) whose
    # first <think> is brief ("Search first.") instead of a sentence
    brief_think_rate: float = 0.0
    structured_outputs: bool = False  # the server honours response_format json_schema (vLLM, SGLang, OpenAI)
    concurrency: int = 8  # HTTP requests in flight
    http_retries: int = 2  # the openai SDK's own retries (backoff, Retry-After) per request
    http_log: str = ""  # JSONL: every HTTP request body and its outcome (never the key)
    # training-time only (ZeroSearch-style): the simulating model is told the gold answer; eval
    # never passes it; counted in the actor's `answer_shown`
    actor_sees_answer: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    schedule: str = "cosine"  # cosine | constant
    # AdamW's first moment: float32, or bfloat16 to save 2 bytes a parameter (the second moment stays float32)
    mu_dtype: str = "float32"


@dataclass
class SFTConfig:
    steps: int = 100
    batch_size: int = 8  # packed rows per step, per process
    seq_len: int = 512
    grad_accum: int = 1
    epochs: int = 0  # 0 = run `steps`
    # one trace per row, each micro-batch's common prefix (system prompt + tool schemas) run once
    # instead of packing: for traces that share their prompt, ~2x fewer tokens per step
    share_prefix: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class GRPOConfig:
    steps: int = 20
    batch_size: int = 4  # questions per step (B), per process
    group_size: int = 4  # rollouts per question (G)
    mu: int = 1  # optimisation passes over each batch of rollouts
    minibatches: int = 1
    # micro-batches per update (whole groups each), gradients summed: the same update with about
    # 1/grad_accum of the step's activation memory (the demo's peak RSS is this step's)
    grad_accum: int = 1
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # KL(pi || ref) weight, k3 estimator; 0 skips the reference forward
    scale_std: bool = True  # False = Dr. GRPO (no std division)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    drop_equal_groups: bool = False
    # SimpleTIR: an episode with a void turn (neither a complete tool call nor an answer, e.g. a turn
    # cut at max_new_tokens) leaves the update and its group's statistics, instead of scoring
    # format_penalty: that penalty otherwise pushes a weak policy to answer with no tool call
    drop_void_turns: bool = False
    # the update runs each group's shared prompt once (same loss and gradient as full rows, tested)
    share_prompt: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_turns: int = 4
    max_new_tokens: int = 64  # per turn
    max_len: int = 1024  # whole episode
    w_answer: float = 1.0
    w_consistency: float = 0.5
    format_penalty: float = -1.0
    correctness: str = "em"  # em | f1
    # length penalty: reward -= w_length * generated tokens / (max_turns * max_new_tokens), on
    # episodes that pass the format gate (rewards.py); 0 = off
    w_length: float = 0.0
    # rollouts from an int8 copy of the policy, made once per step: none | int8 | int8-dynamic (model/quant.py)
    rollout_quant: str = "none"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0))


@dataclass
class EvalConfig:
    limit: int = 0
    max_turns: int = 4
    max_new_tokens: int = 64
    max_len: int = 1024
    batch_size: int = 8  # questions per batch, per process
    quant: str = "none"  # sample from an int8 copy of the weights: none | int8 | int8-dynamic (model/quant.py)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1
    accelerator: str = "cpu"  # for `mtr plan`: cpu | v4 | v5e | v5p | v6e | h100 | h200


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks.


def _check_leaf(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _check_leaf(key, value, arg)
            except MtrError:
                pass
        raise MtrError(f"config key '{key}': {value!r} is not a {tp}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MtrError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise MtrError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise MtrError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise MtrError(f"config key '{key}': expected a string, got {value!r}")
    if tp in (list, dict) or origin in (list, dict):
        want = origin or tp
        if isinstance(value, want):
            return value
        raise MtrError(f"config key '{key}': expected a {want.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise MtrError(f"config section '{prefix or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise MtrError(f"unknown config key '{where}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, data[f.name], key)
        else:
            kwargs[f.name] = _check_leaf(key, data[f.name], tp)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise MtrError(f"override '{item}' is not key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise MtrError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise MtrError(f"override '{item}': '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def find_config_file(path: str | pathlib.Path) -> pathlib.Path:
    """`path` as given, else a shipped config of that name (`configs/sft-qwen2.5-0.5b.yaml`,
    `sft-qwen2.5-0.5b.yaml` or `sft-qwen2.5-0.5b` all find the packaged file from any directory)."""
    p = pathlib.Path(path).expanduser()
    if p.exists():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    rel = p.parent.parts[1:] if p.parent.parts[:1] == ("configs",) else p.parent.parts
    shipped = CONFIG_DIR.joinpath(*rel, name)
    if shipped.exists():
        return shipped
    raise MtrError(f"config file not found: {p}")


def read_yaml(path: str | pathlib.Path) -> dict:
    p = find_config_file(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise MtrError(f"{p}{where}: invalid YAML") from None
    if not isinstance(data, dict):
        raise MtrError(f"{p}: top level must be a mapping")
    return data


# int8 sampling copies (model/quant.py)
QUANT_MODES = ("none", "int8", "int8-dynamic")


def load_config(path: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated `Config`."""
    data: dict = dict(base or {})
    if path:
        data = _deep_merge(data, read_yaml(path))
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(Config, data)
    for key, value, allowed in (("eval.quant", cfg.eval.quant, QUANT_MODES),
                                ("grpo.rollout_quant", cfg.grpo.rollout_quant, QUANT_MODES)):
        if value not in allowed:  # before any model loads
            raise MtrError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
