"""LoRA / QLoRA on a tiny Qwen2: a no-op at init, only adapters train, merged export and PEFT
adapter checked against transformers / peft, sharded == single device, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_oracle import hf_logits, make_hf_model
from mtr_jax.config import LoraConfig, load_config
from mtr_jax.errors import MtrError
from mtr_jax.model import lora, qwen2
from util import REPO, run_with_devices

LORA_SFT = """
import jax, numpy as np
from mtr_jax.config import load_config
from mtr_jax.model import qwen2, lora
from mtr_jax.train.sft import train_sft

def lora_setting(run_dir, steps=10, extra=()):
    cfg = load_config(None, [f"sft.steps={steps}", "sft.batch_size=4", "sft.seq_len=64", "sft.grad_accum=2",
                             "sft.optim.lr=1e-2", "sft.optim.warmup_steps=0", "run.checkpoint_every=2",
                             "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.base_dtype=float32",
                             f"run.out_dir={run_dir}", *extra])
    mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    rng = np.random.RandomState(0)
    examples = []
    for i in range(32):
        n = int(rng.randint(12, 30))
        ids = rng.randint(3, 128, n).astype(np.int32)
        mask = np.zeros(n, np.int32); mask[n // 2:] = 1
        examples.append((ids, mask))
    params = qwen2.init_params(mc, jax.random.PRNGKey(0), std=0.1)
    return cfg, mc, params, examples
"""
exec(LORA_SFT)


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(tree)])


def test_zero_b_adapters_are_exactly_the_base():
    mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    params = qwen2.init_params(mc, jax.random.PRNGKey(0), std=0.1)
    ad = lora.init_adapters(mc, list(lora.TARGETS.values()), 4, jax.random.key(1))
    assert float(jnp.abs(ad["layers"]["q_w@lora_a"]).sum()) > 0  # a is random, b is zero
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 11)), jnp.int32)
    a = qwen2.forward(params, mc, toks)
    b = qwen2.forward(lora.with_adapters(params, ad), mc, toks)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_lora_sft_trains_only_adapters_and_loss_falls(tmp_path):
    cfg, mc, params, examples = lora_setting(str(tmp_path), steps=10)
    from mtr_jax.train.sft import train_sft

    before = jax.tree_util.tree_map(np.asarray, params)
    out, m = train_sft(cfg, mc, params, examples, str(tmp_path), progress=False)
    base, ad = lora.split_adapters(out)
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(base)):
        assert np.array_equal(x, np.asarray(y))  # the frozen base is bitwise unchanged
    assert float(jnp.abs(ad["layers"]["down_w@lora_b"]).max()) > 0  # adapters moved
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, (rows[0]["loss"], rows[-1]["loss"])
    # the checkpoint holds adapters + optimizer state only, and points at its base
    from mtr_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "checkpoints", keep=None, read_only=True)
    meta = ck.meta(ck.latest_step())
    ck.close()
    assert meta["lora"]["rank"] == 4 and "base" in meta


def test_merged_export_and_peft_adapter_match_transformers(tmp_path):
    import peft
    import torch
    import transformers

    from mtr_jax.model.hf_io import export_hf, export_peft_adapter, load_hf_params

    make_hf_model(tmp_path / "base", tied=False)
    cfg = load_config(None, ["sft.steps=6", "sft.batch_size=4", "sft.seq_len=64", "sft.optim.lr=2e-2",
                             "sft.optim.warmup_steps=0", "run.checkpoint_every=100", "lora.enabled=true",
                             "lora.rank=4", "lora.alpha=8", "lora.targets=[q,v,down]", "lora.base_dtype=float32",
                             f"model.init_from={tmp_path / 'base'}"])
    params, mc = load_hf_params(str(tmp_path / "base"))
    rng = np.random.RandomState(0)
    examples = []
    for _ in range(16):
        ids = rng.randint(3, 256, 24).astype(np.int32)
        mask = np.zeros(24, np.int32); mask[12:] = 1
        examples.append((ids, mask))
    from mtr_jax.train.sft import train_sft

    out, _ = train_sft(cfg, mc, params, examples, str(tmp_path / "run"), progress=False)
    mc = mc.replace(lora_alpha=8.0)
    ids = rng.randint(0, 256, (2, 13))
    ours = np.asarray(qwen2.forward(out, mc, jnp.asarray(ids, jnp.int32)))
    # merged: a plain HF checkpoint
    export_hf(out, mc, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert np.max(np.abs(hf_logits(merged, ids) - ours)) < 1e-4
    # adapter only: peft loads it onto the base
    export_peft_adapter(out, mc, tmp_path / "adapter", base_name=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert np.max(np.abs(hf_logits(pm, ids) - ours)) < 1e-4
    # the CLI: export-hf of the LoRA run, merged and --adapter-only
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for extra, d in (([], "cli_merged"), (["--adapter-only"], "cli_adapter")):
        r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "export-hf", "--checkpoint", str(tmp_path / "run"),
                            "--out", str(tmp_path / d), *extra], capture_output=True, text=True, env=env, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "cli_adapter" / "adapter_config.json").exists()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli_merged"), dtype=torch.float32).eval()
    assert np.max(np.abs(hf_logits(m2, ids) - ours)) < 1e-4


def test_qlora_int8_base_forward_close_and_trains(tmp_path):
    cfg, mc, params, examples = lora_setting(str(tmp_path), steps=6, extra=("lora.base_quant=int8",))
    _, base, ad = lora.prepare(cfg.lora, mc, params)
    assert base["layers"]["q_w"]["int8"].dtype == jnp.int8
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 11)), jnp.int32)
    a = np.asarray(qwen2.forward(params, mc, toks))
    b = np.asarray(qwen2.forward(lora.with_adapters(base, ad), mc, toks))
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))  # int8 rounding of the base only
    from mtr_jax.train.sft import train_sft

    _, m = train_sft(cfg, mc, params, examples, str(tmp_path), progress=False)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_lora_sft_sigkill_resume_bitwise(tmp_path):
    from mtr_jax.train.sft import train_sft

    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    cfg, mc, params, examples = lora_setting(full, steps=6)
    want, _ = train_sft(cfg, mc, params, examples, full, progress=False)
    proc = subprocess.run([sys.executable, "-c", LORA_SFT + f"""
import os, signal
cfg, mc, params, examples = lora_setting({cut!r}, steps=6)
train_sft(cfg, mc, params, examples, {cut!r}, progress=False, stop_after=4)
os.kill(os.getpid(), signal.SIGKILL)
"""], capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == -9, proc.stderr[-3000:]
    cfg, mc, params, examples = lora_setting(cut, steps=6)
    got, _ = train_sft(cfg, mc, params, examples, cut, resume=True, progress=False)
    assert np.array_equal(_flat(got), _flat(want))
    # resuming with other LoRA settings is refused in one line
    cfg2, mc, params, examples = lora_setting(cut, steps=8, extra=("lora.rank=2",))
    with pytest.raises(MtrError, match="LoRA settings"):
        train_sft(cfg2, mc, params, examples, cut, resume=True, progress=False)


def test_lora_step_sharded_8_devices_equals_one():
    out = run_with_devices(LORA_SFT + """
import numpy as np, tempfile
from mtr_jax.parallel.mesh import make_mesh
from mtr_jax.config import MeshConfig
from mtr_jax.parallel.rules import param_shardings
res = []
for mesh in (None, make_mesh(MeshConfig(data=2, fsdp=4))):
    d = tempfile.mkdtemp()
    cfg, mc, params, examples = lora_setting(d, steps=1)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(mc, mesh))
    p, _ = train_sft(cfg, mc, params, examples, d, mesh=mesh, progress=False)
    res.append(np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(lora.split_adapters(p)[1])]))
print("MAXDIFF", float(np.max(np.abs(res[0] - res[1]))))
""")
    diff = float(out.split("MAXDIFF")[1].split()[0])
    assert diff <= 1e-5, diff


def test_grpo_lora_reference_is_the_base_no_second_copy(tmp_path):
    """beta > 0 with LoRA: the KL reference is the frozen base (same buffers), not a copy."""
    from test_train import GRPO_SETUP  # noqa: F401  (the tiny GRPO world)

    ns = {}
    exec(GRPO_SETUP, ns)
    cfg, mc, params, tok, train, actor, tm = ns["grpo_setting"](str(tmp_path / "g"), steps=2, extra=(
        "lora.enabled=true", "lora.rank=4", "lora.base_dtype=float32"))
    from mtr_jax.train.grpo import GRPOTrainer

    tr = GRPOTrainer(cfg, mc, params, tok, train, actor, tm)
    assert tr.ref_params is None and tr.reference() is tr.frozen[0]
    base_ids = {id(x) for x in jax.tree_util.tree_leaves(tr.frozen[0])}
    assert {id(x) for x in jax.tree_util.tree_leaves(tr.reference())} == base_ids
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(tr.frozen[0]))
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(tr.params))
    assert n_train < 0.5 * n_base  # only adapters are trained (and held by the optimizer)
    metrics, _, _ = tr.step(train[:2], jax.random.key(0))
    assert np.isfinite(metrics["loss"]) and metrics["kl"] >= 0


@pytest.mark.parametrize("override,needle", [
    ("lora.targets=[q,attn]", "unknown target 'attn'"),
    ("lora.rank=0", "lora.rank=0"),
    ("lora.base_quant=nf3", "base_quant"),
    ("lora.dropout=1.0", "lora.dropout=1.0"),
])
def test_bad_lora_settings_one_line_exit_2(tmp_path, override, needle):
    traces = tmp_path / "t.jsonl"
    traces.write_text("")
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "sft", "--config", "configs/sft-qwen2.5-0.5b.yaml",
                        "lora.enabled=true", override, f"run.out_dir={tmp_path}", "model.init_from=", "model.tokenizer="],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_grpo_lora_sigkill_resume_bitwise(tmp_path):
    """GRPO with LoRA (beta > 0, reference = base): killed after step 3 of 4 and resumed, the adapters
    end bitwise equal to an uninterrupted run's."""
    from test_train import GRPO_SETUP

    ns = {}
    exec(GRPO_SETUP, ns)
    extra = ("lora.enabled=true", "lora.rank=4", "lora.base_dtype=float32")
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    cfg, mc, params, tok, train, actor, tm = ns["grpo_setting"](full, extra=extra)
    want = ns["train_grpo"](cfg, mc, params, tok, train, actor, tm, full, progress=False)
    proc = subprocess.run([sys.executable, "-c", GRPO_SETUP + f"""
import os, signal
cfg, mc, params, tok, train, actor, tm = grpo_setting({cut!r}, extra={extra!r})
train_grpo(cfg, mc, params, tok, train, actor, tm, {cut!r}, progress=False, stop_after=3)
os.kill(os.getpid(), signal.SIGKILL)
"""], capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == -9, proc.stderr[-3000:]
    cfg, mc, params, tok, train, actor, tm = ns["grpo_setting"](cut, extra=extra)
    got = ns["train_grpo"](cfg, mc, params, tok, train, actor, tm, cut, resume=True, progress=False)
    assert np.array_equal(_flat(lora.split_adapters(got)[1]), _flat(lora.split_adapters(want)[1]))
    rows = [json.loads(l) for l in open(os.path.join(cut, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["kl"] >= 0 for r in rows)


def test_trainable_token_rows_train_reload_and_export(tmp_path):
    """lora.trainable_tokens: a no-op at step 0; SFT moves exactly those rows of embed and lm_head
    (the rest of the base is bitwise unchanged); the checkpoint reloads to the same model; the
    merged export carries the rows (transformers logits); --adapter-only refuses in one line."""
    import torch
    import transformers

    from mtr_jax.model.hf_io import export_hf, load_hf_params
    from mtr_jax.train.checkpoint import load_params
    from mtr_jax.train.sft import train_sft

    make_hf_model(tmp_path / "base", tied=False)
    cfg = load_config(None, ["sft.steps=6", "sft.batch_size=4", "sft.seq_len=64", "sft.optim.lr=2e-2",
                             "sft.optim.warmup_steps=0", "run.checkpoint_every=100", "lora.enabled=true",
                             "lora.rank=4", "lora.alpha=8", "lora.targets=[q,v]", "lora.base_dtype=float32",
                             f"model.init_from={tmp_path / 'base'}"])
    params, mc = load_hf_params(str(tmp_path / "base"))
    ids = (7, 9)
    mc2, base, ad = lora.prepare(cfg.lora, mc, params, token_ids=ids)
    toks = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 13)), jnp.int32).at[:, 3].set(7)
    np.testing.assert_array_equal(np.asarray(qwen2.forward(lora.with_adapters(base, ad, ids), mc2, toks)),
                                  np.asarray(qwen2.forward(params, mc2, toks)))
    rng = np.random.RandomState(0)
    examples = []
    for _ in range(16):  # the labels are mostly token 7 and 9: their rows get gradient
        seq = rng.randint(3, 256, 24).astype(np.int32)
        seq[12::2] = 7
        seq[13::2] = 9
        mask = np.zeros(24, np.int32); mask[12:] = 1
        examples.append((seq, mask))
    out, _ = train_sft(cfg, mc, params, examples, str(tmp_path / "run"), progress=False, token_ids=ids)
    emb0, emb1 = np.asarray(params["embed"]), np.asarray(out["embed"])
    head0, head1 = np.asarray(params["lm_head"]), np.asarray(out["lm_head"])
    other = np.setdiff1d(np.arange(emb0.shape[0]), ids)
    assert np.array_equal(emb0[other], emb1[other]) and np.array_equal(head0[:, other], head1[:, other])
    assert np.abs(emb1[list(ids)] - emb0[list(ids)]).max() > 1e-3
    assert np.abs(head1[:, list(ids)] - head0[:, list(ids)]).max() > 1e-3
    mc = mc.replace(lora_alpha=8.0)
    probe = rng.randint(0, 256, (2, 13))
    probe[:, 4] = 9
    ours = np.asarray(qwen2.forward(out, mc, jnp.asarray(probe, jnp.int32)))
    again, mc3 = load_params(str(tmp_path / "run"))
    np.testing.assert_allclose(np.asarray(qwen2.forward(again, mc3, jnp.asarray(probe, jnp.int32))), ours, atol=1e-5)
    export_hf(out, mc, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert np.max(np.abs(hf_logits(merged, probe) - ours)) < 1e-4
    r = subprocess.run([sys.executable, "-m", "mtr_jax.cli", "export-hf", "--checkpoint", str(tmp_path / "run"),
                        "--out", str(tmp_path / "ad"), "--adapter-only"], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO)
    assert r.returncode == 2 and "trainable_tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_lora_sft_loss_falls_on_32_fixture_traces(tmp_path):
    """LoRA SFT on oracle traces of the real dataset fixtures (HotpotQA, MuSiQue, 2Wiki), rendered by
    the real Qwen2.5 tokenizer and chat template (vocab 151936), on a small random Qwen2."""
    from qwen_tokenizer import qwen25_tokenizer

    from mtr_jax.config import ToolsConfig
    from mtr_jax.data.loaders import load_records
    from mtr_jax.tools.autoagent import AutoAgent
    from mtr_jax.tools.toolactor import ToolActor
    from mtr_jax.tools.toolmaker import ToolMaker
    from mtr_jax.train.sft import traces_to_examples, train_sft
    from util import REPO as _R

    import pathlib

    fx = pathlib.Path(_R) / "tests" / "fixtures"
    recs = (load_records("hotpotqa", str(fx / "hotpotqa_dev_original_20.jsonl"))
            + load_records("musique", str(fx / "musique_dev_6.jsonl")) + load_records("2wikimultihopqa", str(fx / "2wiki_dev_6.jsonl")))
    agent = AutoAgent("oracle", actor=ToolActor.from_config(ToolsConfig(), None))
    tm = ToolMaker("template")
    traces = [t for t in (agent.make_trace(r, tm.make(r))[0] for r in recs) if t is not None]
    assert len(traces) >= 28, len(traces)
    tok = qwen25_tokenizer()
    examples, _ = traces_to_examples(tok, traces, 2048)
    mc = qwen2.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)
    # std 0.3: with a frozen random head at std 0.02 the largest reachable logit is ~0.6, so no
    # adapter could lower the loss much below ln(151936); at 0.3 the head can express a prediction
    params = qwen2.init_params(mc, jax.random.PRNGKey(0), std=0.3)
    cfg = load_config(None, ["sft.steps=12", "sft.batch_size=4", "sft.seq_len=2048", "sft.optim.lr=1e-2",
                             "sft.optim.warmup_steps=0", "run.checkpoint_every=100", "run.log_every=1", "lora.enabled=true",
                             "lora.rank=8", "lora.alpha=16", "lora.base_dtype=float32",
                             "lora.trainable_tokens=[<tool_call>,</tool_call>]", f"run.out_dir={tmp_path}"])
    ids = lora.resolve_tokens(cfg.lora, tok)
    assert ids == (151657, 151658)
    train_sft(cfg, mc, params, examples, str(tmp_path), progress=False, token_ids=ids)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.5, (first, last)


def test_lora_dropout_masks_adapter_input_only_in_training(tmp_path):
    """lora.dropout: inference (no keys) is unaffected; with keys, the base path is untouched and the
    adapter path sees inverted-dropout inputs (same key -> same output, other key -> other output);
    an SFT run with dropout cut short and resumed ends bitwise equal to an uninterrupted run."""
    from mtr_jax.train.sft import train_sft

    mc = qwen2.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, lora_dropout=0.5)
    params = qwen2.init_params(mc, jax.random.PRNGKey(0), std=0.1)
    ad = lora.init_adapters(mc, ["q_w", "down_w"], 4, jax.random.key(1))
    ad["layers"] = {k: (v + 0.05 if k.endswith("_b") else v) for k, v in ad["layers"].items()}  # a non-zero delta
    full = lora.with_adapters(params, ad)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 9)), jnp.int32)
    plain = np.asarray(qwen2.forward(full, mc, toks))
    np.testing.assert_array_equal(plain, np.asarray(qwen2.forward(full, mc.replace(lora_dropout=0.0), toks)))
    k1, k2 = lora.dropout_key(0, 1, 0), lora.dropout_key(0, 2, 0)
    a = np.asarray(qwen2.forward(lora.with_dropout(full, k1, 2), mc, toks))
    b = np.asarray(qwen2.forward(lora.with_dropout(full, k1, 2), mc, toks))
    c = np.asarray(qwen2.forward(lora.with_dropout(full, k2, 2), mc, toks))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4 and np.abs(a - plain).max() > 1e-4
    base_only = lora.with_dropout(params, k1, 2)  # no adapters: dropout has nothing to act on
    np.testing.assert_array_equal(np.asarray(qwen2.forward(base_only, mc, toks)), np.asarray(qwen2.forward(params, mc, toks)))
    # resume: masks are a function of (seed, step, micro-batch)
    cfg, mc2, params2, examples = lora_setting(str(tmp_path / "a"), steps=6, extra=["lora.dropout=0.3"])
    fresh = lambda: jax.tree_util.tree_map(jnp.copy, params2)
    whole, _ = train_sft(cfg, mc2, fresh(), examples, str(tmp_path / "a"), progress=False)
    cfg, *_ = lora_setting(str(tmp_path / "b"), steps=6, extra=["lora.dropout=0.3"])
    train_sft(cfg, mc2, fresh(), examples, str(tmp_path / "b"), progress=False, stop_after=3)
    resumed, _ = train_sft(cfg, mc2, fresh(), examples, str(tmp_path / "b"), progress=False, resume=True)
    for x, y in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    cfg0, *_ = lora_setting(str(tmp_path / "c"), steps=6)
    nodrop, _ = train_sft(cfg0, mc2, fresh(), examples, str(tmp_path / "c"), progress=False)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(nodrop)))


def test_token_rows_from_pieces_with_the_real_tokenizer():
    """lora.token_init=pieces: `<tool_call>` / `</tool_call>` start as the mean of their text's
    pieces (real Qwen2.5 tokenizer), so the two start apart; other rows untouched."""
    from qwen_tokenizer import qwen25_tokenizer

    tok = qwen25_tokenizer()
    assert lora._pieces(tok, "<tool_call>") == [27, 14172, 13429, 29]
    assert lora._pieces(tok, "</tool_call>") == [522, 14172, 13429, 29]
    mc = qwen2.Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    params = qwen2.init_params(mc, jax.random.PRNGKey(0))
    out = lora.init_rows_from_pieces(params, tok, (151657, 151658))
    E, H = np.asarray(out["embed"]), np.asarray(out["lm_head"])
    np.testing.assert_allclose(E[151657], np.asarray(params["embed"])[[27, 14172, 13429, 29]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(H[:, 151658], np.asarray(params["lm_head"])[:, [522, 14172, 13429, 29]].mean(1), rtol=1e-6)
    assert np.array_equal(E[:151657], np.asarray(params["embed"])[:151657])


@pytest.mark.parametrize("tied,chunk,temperature", [(True, 64, 1.0), (False, 64, 0.7), (True, None, 1.0), (False, None, 1.0)])
def test_patched_token_rows_equal_written_rows(tied, chunk, temperature):
    """The training losses take trainable token rows as a patch beside the frozen embedding
    (`with_adapters(..., patch_rows=True)`: no dense [V, E] gradient). Log-probs, entropies and the
    gradient w.r.t. every adapter, the rows included, equal those of the rows written into the
    embedding / head, in float32, on both log-prob paths (full rows and a shared prompt), with the
    vocabulary-chunked head (4 chunks) and the plain one, tied and untied. The patched tokens occur
    as inputs and as targets, and the rows differ from the base's."""
    from mtr_jax.train import losses
    from util import tiny_config

    mc = tiny_config(tie_word_embeddings=tied)
    params = qwen2.init_params(mc, jax.random.key(1), std=0.3)
    ids = (5, 130)  # one in the first vocabulary chunk, one in the third
    lc = LoraConfig(enabled=True, rank=4, alpha=8.0, base_dtype="float32")
    mc, base, ad = lora.prepare(lc, mc, params, key=jax.random.key(2), token_ids=ids)
    rng = np.random.RandomState(0)
    ad = jax.tree_util.tree_map(lambda a: a + 0.2 * rng.normal(size=a.shape).astype(np.float32), ad)
    tokens = rng.randint(0, mc.vocab_size, (3, 21))
    tokens[:, 3::4], tokens[:, 5::6] = ids[0], ids[1]
    tokens = jnp.asarray(tokens, jnp.int32)
    prompts, comps = tokens[:1, :9], tokens[:, 9:]

    def f(a, patch, shared):
        p = lora.with_adapters(base, a, ids, patch_rows=patch)
        if shared:
            h_last, h_c = qwen2.shared_prefix_hidden(p, mc, prompts, jnp.array([9], jnp.int32), comps)
            h = jnp.concatenate([jnp.repeat(h_last, 3, axis=0)[:, None], h_c[:, :-1]], axis=1)
            return losses.head_logp_entropy(p, mc, h, comps, temperature, chunk=chunk)
        h = qwen2.hidden_states(p, mc, tokens)[:, :-1]
        return losses.head_logp_entropy(p, mc, h, tokens[:, 1:], temperature, chunk=chunk)

    for shared in (False, True):
        (lp_p, ent_p), (lp_w, ent_w) = f(ad, True, shared), f(ad, False, shared)
        np.testing.assert_allclose(lp_p, lp_w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ent_p, ent_w, atol=1e-5)
        loss = lambda patch: (lambda a: jnp.sum(f(a, patch, shared)[0]) + 0.1 * jnp.sum(f(a, patch, shared)[1]))
        g_p, g_w = jax.grad(loss(True))(ad), jax.grad(loss(False))(ad)
        for k in ("embed@rows",) + (() if tied else ("lm_head@rows",)):
            assert float(jnp.max(jnp.abs(g_w[k]))) > 1e-2, k  # the rows do get a gradient
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree_util.tree_leaves(g_w)):
            assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(b)))), (shared, path)
    # qwen2.forward's logits (the plain head) honour the patch as well
    np.testing.assert_allclose(qwen2.forward(lora.with_adapters(base, ad, ids, patch_rows=True), mc, tokens),
                               qwen2.forward(lora.with_adapters(base, ad, ids), mc, tokens), rtol=1e-5, atol=1e-5)
