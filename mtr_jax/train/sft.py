"""Stage 1, SFT: next-token cross-entropy on the tokens the model emits in a trace.

Traces are rendered by the trace grammar (`render_trace` -> ids, loss mask), packed into rows of
`sft.seq_len` (segment ids keep packed traces apart), and trained with the shared jitted step
(gradient accumulation as (sum, denominator): the loss is the mean over every assistant token of
the optimiser step, whatever the micro-batch split). Checkpoints hold params, optimiser state, the
step and the data iterator's state, so `--resume` after a kill continues with the next unseen row
and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from mtr_jax.config import Config
from mtr_jax import paths
from mtr_jax.errors import MtrError
from mtr_jax.model import lora
from mtr_jax.train import losses
from mtr_jax.train.metrics import MetricsLogger
from mtr_jax.train.optim import make_optimizer
from mtr_jax.train.step import make_train_step, put_micro_batches, split_micro


def read_traces(path: str) -> list[dict]:
    if not path or not paths.exists(path):
        raise MtrError(f"traces file not found: {path or '(data.traces is empty)'}")
    out = []
    with paths.path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                t = json.loads(line)
            except json.JSONDecodeError:
                raise MtrError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(t, dict) or not isinstance(t.get("messages"), list):
                raise MtrError(f"{path}:{n}: a trace needs a 'messages' list")
            out.append(t)
    return out


def traces_to_examples(tokenizer, traces: list[dict], max_len: int) -> tuple[list, int]:
    """Render each trace to (ids, loss_mask). A trace longer than max_len, with nothing to learn, or
    that does not render (e.g. its turns tokenize differently from its whole text) is dropped and
    counted, never fatal: -> (examples, dropped); the reasons are printed once."""
    import sys
    from collections import Counter

    from mtr_jax.traces.render import render_trace

    examples, why = [], Counter()
    for t in traces:
        try:
            ids, mask = render_trace(tokenizer, t)
        except (MtrError, KeyError, TypeError, ValueError) as e:
            why[f"does not render ({type(e).__name__})"] += 1
            continue
        if len(ids) > max_len or not any(mask):
            why[f"longer than {max_len} tokens or empty"] += 1
            continue
        examples.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    dropped = sum(why.values())
    if not examples:
        raise MtrError(f"no valid traces to train on ({dropped} dropped: {dict(why)})")
    if dropped and jax.process_index() == 0:
        print(f"sft: {dropped} of {len(traces)} traces dropped: {dict(why)}", file=sys.stderr)
    return examples, dropped


def shardings_of(tree):
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def checkpoint_meta(cfg: Config, model_cfg, step: int, data_state, token_ids=()) -> dict:
    """A step's metadata; a LoRA run also records its settings and the base (`model.init_from`),
    since its `params` item holds only the adapters."""
    meta = {"step": step, "data_state": data_state, "model_config": dataclasses.asdict(model_cfg)}
    if cfg.lora.enabled:
        meta["lora"] = lora.settings(cfg.lora, token_ids)
        meta["base"] = cfg.model.init_from
    return meta


def train_sft(
    cfg: Config,
    model_cfg,
    params,
    examples: list,
    run_dir: str,
    *,
    mesh=None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    token_ids=(),
):
    """Runs `cfg.sft.steps` optimiser steps; returns (params, last metrics). `stop_after` ends the
    loop early (tests: simulate a run that is cut short) without the final checkpoint. `token_ids`:
    with LoRA, the embedding / head rows that train too (`lora.resolve_tokens`)."""
    from mtr_jax.data.pipeline import sft_batches
    from mtr_jax.train.checkpoint import Checkpointer

    s = cfg.sft
    if s.batch_size % s.grad_accum:
        raise MtrError(f"sft.batch_size={s.batch_size} is not a multiple of sft.grad_accum={s.grad_accum}")
    frozen = ()
    if cfg.lora.enabled:  # train adapters only; the base rides along as a frozen argument
        model_cfg, base, params = lora.prepare(cfg.lora, model_cfg, params, mesh, jax.random.key(cfg.run.seed),
                                               token_ids=token_ids)
        frozen = (base,)
    tx, sched = make_optimizer(s.optim, s.steps)
    opt_state = jax.jit(tx.init)(params)

    loss_fn = losses.sft_shared_loss_num if s.share_prefix else losses.sft_loss_num

    dropout = cfg.lora.enabled and cfg.lora.dropout > 0

    def loss_num(p, mb, *base):
        full = lora.with_adapters(base[0], p, token_ids, patch_rows=True) if base else p
        if dropout:
            full = lora.with_dropout(full, mb["dropout_key"], model_cfg.num_hidden_layers)
        num, den = loss_fn(full, model_cfg, mb)
        return num, {"tokens": den}

    step_fn = make_train_step(loss_num, losses.sft_shared_denominator if s.share_prefix else losses.sft_denominator, tx)
    if s.share_prefix:
        from mtr_jax.data.pipeline import shared_prefix_batches

        pad = 0
        it = shared_prefix_batches(examples, s.batch_size, groups=s.grad_accum, seed=cfg.run.seed, pad_id=pad,
                                   shard_index=jax.process_index(), shard_count=jax.process_count())
    else:
        it = sft_batches(examples, seq_len=s.seq_len, batch_size=s.batch_size, seed=cfg.run.seed,
                         shard_index=jax.process_index(), shard_count=jax.process_count())
    ckpt = Checkpointer(paths.join(run_dir, "checkpoints"), keep=cfg.run.keep_checkpoints)
    start = 0
    if resume:
        latest = ckpt.latest_step()
        if latest is None:
            raise MtrError(f"--resume: no checkpoint in {paths.join(run_dir, 'checkpoints')}")
        target = {"params": params, "opt_state": opt_state}
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        lora.check_resume(cfg.lora, ckpt.meta(latest), paths.join(run_dir, "checkpoints"), token_ids)
        state, meta = ckpt.restore(latest, target=abstract)
        params, opt_state = state["params"], state["opt_state"]
        it.set_state(meta["data_state"])
        start = int(meta["step"])
    logger = MetricsLogger(run_dir, resume_step=start if resume else None)
    bar = _progress(s.steps, start, "sft", progress)
    metrics = {}
    t_last = time.perf_counter()
    for step in range(start + 1, s.steps + 1):
        batch = next(it)
        if s.share_prefix:
            real = int(batch["real_tokens"])
            arrays = split_micro({k: batch[k] for k in ("prompts", "prompt_lens", "completions", "mask")}, s.grad_accum)
        else:
            real = int(np.sum(batch["segment_ids"] > 0))
            arrays = split_micro({k: batch[k] for k in ("tokens", "loss_mask", "segment_ids", "positions")}, s.grad_accum)
            # the LM head and cross-entropy run only where a label is (15-30% of a trace's tokens)
            arrays["label_idx"], arrays["label_w"] = losses.label_index(arrays["loss_mask"], arrays["segment_ids"])
        if dropout:
            arrays["dropout_key"] = lora.dropout_keys(cfg.run.seed, step, s.grad_accum)
        mb = put_micro_batches(arrays, mesh)
        params, opt_state, m = step_fn(params, opt_state, mb, *frozen)
        if step % cfg.run.log_every == 0 or step == s.steps:
            m = jax.device_get(m)
            now = time.perf_counter()
            metrics = {"loss": m["loss"], "grad_norm": m["grad_norm"], "skipped": m["skipped"], "lr": float(sched(step - 1)),
                       "tokens": m["tokens"], "tokens_per_s": real / max(now - t_last, 1e-9)}
            t_last = now
            logger.log(step, "sft", metrics)
            bar.set_postfix(loss=f"{float(m['loss']):.4f}")
        bar.update(1)
        if stop_after is not None and step >= stop_after:
            ckpt.wait()
            bar.close()
            logger.close()
            return (lora.with_adapters(frozen[0], params, token_ids) if frozen else params), metrics
        if step % cfg.run.checkpoint_every == 0 or step == s.steps:
            ckpt.save(step, {"params": params, "opt_state": opt_state}, meta=checkpoint_meta(cfg, model_cfg, step, it.get_state(), token_ids))
            logger.sync()  # a gs:// run's metrics go home with each checkpoint
    ckpt.wait()
    ckpt.close()
    bar.close()
    logger.close()
    return (lora.with_adapters(frozen[0], params, token_ids) if frozen else params), metrics


def _progress(total, start, desc, enabled):
    from mtr_jax.progress import progress

    return progress(total, start, desc, enabled)


def cli(args) -> int:
    from mtr_jax.train.setup import check_out_dir, load_tokenizer, setup_model

    cfg: Config = args.cfg
    lora.validate(cfg.lora)  # before any work
    check_out_dir(cfg)
    traces = read_traces(cfg.data.traces)
    tokenizer = load_tokenizer(cfg)
    examples, dropped = traces_to_examples(tokenizer, traces, cfg.sft.seq_len)
    mesh, model_cfg, params = setup_model(cfg)
    print(f"sft: {len(examples)} traces ({dropped} dropped), {cfg.sft.steps} steps -> {cfg.run.out_dir}")
    if jax.process_index() == 0:  # RUN_DIR/tokenizer, next to checkpoints/ (export-hf / eval find it there);
        # not inside it: on GCS orbax deletes any directory there without its commit marker
        with paths.local_dir_for_write(paths.join(cfg.run.out_dir, "tokenizer")) as d:
            tokenizer.save_pretrained(str(d))
    token_ids = lora.resolve_tokens(cfg.lora, tokenizer) if cfg.lora.enabled else ()
    if token_ids and cfg.lora.token_init == "pieces" and not args.resume:
        params = lora.init_rows_from_pieces(params, tokenizer, token_ids)
    train_sft(cfg, model_cfg, params, examples, cfg.run.out_dir, mesh=mesh, resume=args.resume, token_ids=token_ids)
    return 0
