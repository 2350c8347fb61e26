"""Assembling a run from its config: tokenizer, mesh + sharded model, datasets, tools.

Every CLI subcommand that trains or evaluates goes through these, so each piece is built one way.
"""

from __future__ import annotations


import jax

from mtr_jax import paths
from mtr_jax.config import Config
from mtr_jax.errors import MtrError


def load_tokenizer(cfg: Config):
    """`model.tokenizer`, else the tokenizer that comes with `model.init_from`. Either may be an HF
    directory, a hub id, a GGUF file, `offline:NAME` or one of our checkpoints (`model.sources`)."""
    from transformers import AutoTokenizer

    from mtr_jax.model import sources

    key, spec = ("model.tokenizer", cfg.model.tokenizer) if cfg.model.tokenizer else ("model.init_from", cfg.model.init_from)
    if not spec:
        raise MtrError("no tokenizer: set model.tokenizer (an HF tokenizer directory, hub id, GGUF or offline:NAME)")
    try:
        path = sources.tokenizer_dir(spec)
    except MtrError as e:
        raise MtrError(f"{key}: {e}") from None
    if path is None:
        raise MtrError(f"{key}: {spec} holds no tokenizer; set model.tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds for a bad directory
        raise MtrError(f"{key}: cannot load a tokenizer from {path} ({type(e).__name__})") from None


def check_out_dir(cfg: Config, out_dir: str | None = None) -> None:
    """Before any work: a gs:// output must be reachable and its bucket must exist; a multi-host
    run must write to shared storage (each host's local disk would hold a part of the run)."""
    out = out_dir or cfg.run.out_dir
    if paths.is_remote(out):
        paths.check_writable(out, "run.out_dir" if out_dir is None else "output")
        return
    from mtr_jax.parallel.distributed import spans_machines

    if spans_machines():
        raise MtrError(f"run.out_dir {out}: a multi-host run needs shared storage (gs://BUCKET/...), "
                       "not a local directory each host would write on its own")


def setup_model(cfg: Config):
    """-> (mesh, Qwen2Config, params): multi-host init, the mesh, params created in their shardings."""
    from mtr_jax.model.presets import build_params
    from mtr_jax.parallel.distributed import maybe_initialize_distributed
    from mtr_jax.parallel.mesh import make_mesh

    maybe_initialize_distributed()
    mesh = make_mesh(cfg.mesh)
    params, model_cfg = build_params(cfg.model, mesh=mesh, key=jax.random.PRNGKey(cfg.run.seed))
    return mesh, model_cfg, params


def load_datasets(cfg: Config, limit: int = 0, on_error: str = "raise") -> dict:
    """{dataset name: (records, skipped count)} for every entry of `data.datasets`."""
    from mtr_jax.data.loaders import LoadStats, load_records

    if not cfg.data.datasets:
        raise MtrError("data.datasets is empty: give e.g. [{name: hotpotqa, path: data/hotpot_dev.json}]")
    out = {}
    for i, d in enumerate(cfg.data.datasets):
        if not isinstance(d, dict) or "name" not in d:
            raise MtrError(f"data.datasets[{i}]: expected a mapping with 'name' (and 'path', 'split')")
        stats = LoadStats()
        recs = load_records(d["name"], d.get("path"), split=d.get("split", "dev"), limit=limit or cfg.data.limit,
                            on_error=on_error, stats=stats)
        out[d.get("label", d["name"])] = (recs, stats.skipped)
    return out


def load_records_from_config(cfg: Config, limit: int | None = None) -> list:
    """Every record of `data.datasets` (at most `limit`, else `data.limit`, per dataset)."""
    return [r for recs, _ in load_datasets(cfg, limit=limit or 0).values() for r in recs]


def make_actor(cfg: Config, out_dir: str | None = None, for_eval: bool = False):
    """The configured ToolActor. `for_eval`: the simulating model never sees the gold answer,
    whatever `tools.actor_sees_answer` says."""
    from mtr_jax.tools.toolactor import ToolActor

    # local or gs:// (a gs:// cache is a local working copy synced home at checkpoints: tools/cache.py)
    cache = cfg.tools.cache or paths.join(out_dir or cfg.run.out_dir, "tool_cache.sqlite")
    if jax.process_count() > 1:  # one file per process: each syncs its own copy home, none overwrites another's
        cache = cache.removesuffix(".sqlite") + f".p{jax.process_index()}.sqlite"
    return ToolActor.from_config(cfg.tools, cache, seed=cfg.run.seed, sees_answer=False if for_eval else None)


def check_tools(actor, toolmaker) -> None:
    """Before any work: every tool the run will offer must be answerable by its actor (the corpus
    backend answers retrieval-shaped tools, calculator and compare; a model simulates anything)."""
    import sys

    from mtr_jax.tools.toolmaker import ToolSetMaker

    if isinstance(toolmaker, ToolSetMaker):
        bad = actor.unanswerable(toolmaker.sets.values())
        if bad:
            raise MtrError(f"data.tools {toolmaker.path}: the corpus ToolActor cannot answer {', '.join(bad[:8])}"
                           f"{' ...' if len(bad) > 8 else ''}; set tools.toolactor to llm or http (a model simulates them)")
    elif getattr(toolmaker, "backend", "") == "llm" and actor.backend == "corpus":
        print("note: tools.toolmaker=llm with the corpus ToolActor: a made tool it cannot answer gets an "
              "'unsupported_tool' error observation (set tools.toolactor to llm or http to simulate it)", file=sys.stderr)


def make_toolmaker(cfg: Config, fallback: str | None = None):
    """With `data.tools` set: the tools of that make-tools file, by record (every command that
    offers tools uses the same ones); else the configured ToolMaker."""
    from mtr_jax.tools.toolmaker import ToolMaker, ToolSetMaker

    backend = fallback or cfg.tools.toolmaker
    llm = None
    if backend == "llm":
        from mtr_jax.llm import make_llm

        llm = make_llm(cfg.tools)
    base = ToolMaker(backend=backend, llm=llm, retries=cfg.tools.retries, max_tokens=cfg.tools.max_tokens)
    return ToolSetMaker(cfg.data.tools, base) if cfg.data.tools else base
