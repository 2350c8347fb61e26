"""`mtr plan`: the estimate is checked against XLA's compiled memory analysis of the real programs
(the SFT/GRPO train step of train/step.py, the GRPO log-prob forward), and the per-device parameter
count against real shardings on 8 fake devices."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from mtr_jax.config import load_config
from mtr_jax.errors import MtrError
from mtr_jax.bench.plan_check import _peak
from mtr_jax.plan import GiB, estimate, make_plan, model_config, parse_accelerator
from util import REPO, run_with_devices

ARCH = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True)


def _cfg(**over):
    base = {"model": {"preset": "tiny", "arch": dict(ARCH)}, "mesh": {"data": -1}, "run": {"accelerator": "cpu"}}
    items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in over.items()]
    return load_config(None, items, base=base)


@pytest.mark.parametrize(
    "over",
    [
        {"sft.batch_size": 8, "sft.seq_len": 256},
        {"sft.batch_size": 8, "sft.seq_len": 128, "model.arch.vocab_size": 2048},
        {"sft.batch_size": 8, "sft.seq_len": 256, "sft.grad_accum": 2, "model.remat": True, "model.scan_layers": True},
        {"sft.batch_size": 8, "sft.seq_len": 256, "model.remat": True, "model.scan_layers": True,
         "model.remat_policy": "dots", "model.arch.intermediate_size": 1024},
        # the real vocabulary: the vocabulary-chunked head (plan.CHUNKED_HEAD), bf16 compute
        {"sft.batch_size": 8, "sft.seq_len": 256, "model.arch.vocab_size": 151936, "model.dtype": "bfloat16"},
        {"sft.batch_size": 8, "sft.seq_len": 256, "model.arch.vocab_size": 151936, "model.dtype": "bfloat16",
         "model.remat": True, "model.scan_layers": True},
    ],
)
def test_sft_estimate_matches_compiled_memory(over):
    from mtr_jax.bench.plan_check import measure_sft

    cfg = _cfg(**over)
    mcfg = model_config(cfg)
    measured = measure_sft(cfg, mcfg)  # the trainer's program: LM head at label positions (all of them)
    planned = estimate(cfg, mcfg, (1, 1, 1), "sft")["peak"]
    assert abs(planned - measured) / measured < 0.25, (planned / 2**20, measured / 2**20)


@pytest.mark.parametrize("share_prompt,vocab", [(True, 512), (False, 512), (True, 151936), (False, 151936)])
def test_grpo_estimates_match_compiled_memory(share_prompt, vocab):
    """Both update layouts (each group's prompt once, or full rows); the real vocabulary's chunked head."""
    from mtr_jax.bench.plan_check import measure_grpo

    cfg = _cfg(**{"grpo.batch_size": 4, "grpo.group_size": 4, "grpo.minibatches": 2, "grpo.max_len": 256,
                  "grpo.max_turns": 2, "grpo.max_new_tokens": 64, "grpo.share_prompt": share_prompt,
                  "model.arch.vocab_size": vocab, "model.dtype": "bfloat16" if vocab > 512 else "float32"})
    mcfg = model_config(cfg)
    est = estimate(cfg, mcfg, (1, 1, 1), "grpo")
    update, forward = measure_grpo(cfg, mcfg)
    planned = est["params"] + est["optimizer"] + est["train_step"]
    assert abs(planned - update) / update < 0.25, (planned / 2**20, update / 2**20)
    # the no-grad log-prob forward, one minibatch of episodes at a time
    planned = est["params"] + est["logprob_forward"]
    assert abs(planned - forward) / forward < 0.25, (planned / 2**20, forward / 2**20)


def test_param_sharding_matches_real_shardings():
    out = run_with_devices(
        """
        import json, math, jax
        from mtr_jax.model.qwen2 import Qwen2Config
        from mtr_jax.parallel.mesh import make_mesh
        from mtr_jax.parallel.rules import param_shardings
        from mtr_jax.model.qwen2 import param_specs
        from mtr_jax.plan import param_elems_per_device
        cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        res = []
        for sizes in [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)]:
            mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), sizes)))
            sh = param_shardings(cfg, mesh)
            specs = jax.tree_util.tree_leaves(param_specs(cfg), is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], tuple))
            real = sum(math.prod(s.shard_shape(sp[0])) for s, sp in zip(jax.tree_util.tree_leaves(sh), specs))
            res.append((real, param_elems_per_device(cfg, sizes)[1]))
        print(json.dumps(res))
        """
    )
    pairs = json.loads(out.strip().splitlines()[-1])
    assert all(a == b for a, b in pairs), pairs
    assert len({a for a, _ in pairs}) > 2  # the meshes really shard differently


def test_accelerators():
    assert parse_accelerator("v5e-8")[:2] == ("v5e", 8)
    assert parse_accelerator("v5litepod-16")[:2] == ("v5e", 16)
    assert parse_accelerator("v4-8")[:2] == ("v4", 4)  # v4 names count TensorCores: 4 chips
    assert parse_accelerator("v5p-16")[:2] == ("v5p", 8)
    assert parse_accelerator("h100x8") == ("h100", 8, 80 * GiB)
    assert parse_accelerator("v6e")[2] == 32 * GiB and parse_accelerator("h200")[2] == 141 * GiB
    for bad in ("v9", "tpu", "a100", "v4-7"):
        with pytest.raises(MtrError):
            parse_accelerator(bad)


def test_does_not_fit_and_bad_mesh():
    big = {"model.preset": "qwen2.5-7b", "model.arch": {}, "run.accelerator": "v5e-8", "sft.seq_len": 4096}
    res = make_plan(_cfg(**big), ["sft"])
    assert not res["fits"] and res["stages"]["sft"]["peak"] > 16 * GiB
    assert res["n_params"] == pytest.approx(7.6e9, rel=0.02)  # Qwen2.5-7B: 7.62B parameters
    with pytest.raises(MtrError, match="does not divide|do not divide"):
        make_plan(_cfg(**{"run.accelerator": "v5e-8", "mesh.fsdp": 3}))
    with pytest.raises(MtrError, match="rows do not split"):
        make_plan(_cfg(**{"run.accelerator": "v5e-8", "sft.batch_size": 4}), ["sft"])


def test_cli_exit_codes(tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "mtr_jax.cli", "plan", *argv], cwd=REPO, capture_output=True, text=True)

    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"model": {"preset": "qwen2.5-0.5b", "remat": True, "scan_layers": True, "dtype": "bfloat16"},
                                  "mesh": {"data": 1, "fsdp": -1}, "run": {"accelerator": "v5e-8"},
                                  "sft": {"batch_size": 8, "seq_len": 1024},
                                  "grpo": {"batch_size": 4, "group_size": 4, "max_len": 1024}}))
    p = run("--config", str(ok))
    assert p.returncode == 0, p.stderr
    assert "SFT: FITS" in p.stdout and "GRPO: FITS" in p.stdout and "parameters" in p.stdout
    p = run("--config", str(ok), "--json", "--stage", "sft")
    assert json.loads(p.stdout)["stages"]["sft"]["fits"] is True
    p = run("--config", str(ok), "run.accelerator=v7x-9000")
    assert p.returncode == 2 and "unknown accelerator" in p.stderr and "Traceback" not in p.stderr
    p = run("--config", str(ok), "sft.seq_len=32768", "--stage", "sft")
    assert p.returncode == 2 and "DOES NOT FIT" in p.stdout and "does not fit" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("path", sorted(str(p) for p in (pathlib.Path(REPO) / "configs").glob("*.yaml")))
def test_every_shipped_config_plans(path):
    from mtr_jax.config import load_config

    cfg = load_config(path)
    res = make_plan(cfg)
    assert res["n_params"] > 0 and all(v["peak"] > 0 for v in res["stages"].values())


def test_sharded_estimate_matches_compiled_memory_on_8_devices():
    """Per-device peak of the SPMD-compiled SFT step on 8 fake devices vs the plan (within 25%)."""
    out = run_with_devices(
        """
        import json, jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from mtr_jax.config import load_config
        from mtr_jax.plan import estimate, model_config
        from mtr_jax.model.qwen2 import init_params
        from mtr_jax.parallel.mesh import make_mesh
        from mtr_jax.parallel.rules import param_shardings, batch_sharding
        from mtr_jax.train import losses
        from mtr_jax.train.optim import make_optimizer
        from mtr_jax.train.step import make_train_step
        ARCH = %r
        res = []
        for sizes in [(2, 4, 1), (2, 2, 2)]:
            over = [f"mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), sizes)] + ["sft.batch_size=16", "sft.seq_len=256"]
            cfg = load_config(None, over, base={"model": {"preset": "tiny", "arch": ARCH}})
            mcfg = model_config(cfg)
            mesh = make_mesh(cfg.mesh)
            tx, _ = make_optimizer(cfg.sft.optim, 10)
            shapes = jax.eval_shape(lambda: init_params(mcfg, jax.random.key(0)))
            params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                            param_shardings(mcfg, mesh))
            opt = jax.eval_shape(tx.init, params)
            def loss_num(p, mb):
                num, den = losses.sft_loss_num(p, mcfg, mb)
                return num, {"tokens": den}
            bsh = NamedSharding(mesh, P(None, *batch_sharding(mesh, 2).spec))
            b = {k: jax.ShapeDtypeStruct((1, 16, 256), jnp.int32, sharding=bsh) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
            m = make_train_step(loss_num, lambda b: jnp.float32(1.0), tx).lower(params, opt, b).compile().memory_analysis()
            measured = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            res.append((measured, estimate(cfg, mcfg, sizes, "sft")["peak"]))
        print(json.dumps(res))
        """ % (ARCH,)
    )
    for measured, planned in json.loads(out.strip().splitlines()[-1]):
        assert abs(planned - measured) / measured < 0.25, (planned / 2**20, measured / 2**20)


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_lora_sft_estimate_matches_compiled_memory(quant):
    """LoRA / QLoRA: frozen base in bf16 (or int8), float32 adapters with the only gradients and
    AdamW moments; the plan within 25% of XLA's compiled memory of the real LoRA step."""
    import jax
    import jax.numpy as jnp

    from mtr_jax.model import lora
    from mtr_jax.model.qwen2 import init_params
    from mtr_jax.train import losses
    from mtr_jax.train.optim import make_optimizer
    from mtr_jax.train.step import make_train_step

    cfg = _cfg(**{"sft.batch_size": 8, "sft.seq_len": 256, "lora.enabled": True, "lora.rank": 8,
                  "lora.base_quant": quant, "model.arch.hidden_size": 256, "model.arch.intermediate_size": 1024,
                  "model.arch.num_hidden_layers": 4})
    mcfg = model_config(cfg)
    full = jax.eval_shape(lambda: init_params(mcfg, jax.random.key(0)))
    base = jax.eval_shape(lambda p: lora.prepare(cfg.lora, mcfg, p)[1], full)
    ad = jax.eval_shape(lambda: lora.init_adapters(mcfg, tuple(lora.target_keys(cfg.lora.targets)), 8, jax.random.key(0)))
    tx, _ = make_optimizer(cfg.sft.optim, 10)
    opt = jax.eval_shape(tx.init, ad)
    s = cfg.sft
    shapes = {k: jax.ShapeDtypeStruct((1, s.batch_size, s.seq_len), jnp.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}

    def loss_num(p, mb, b):
        num, den = losses.sft_loss_num(lora.with_adapters(b, p), mcfg, mb)
        return num, {"tokens": den}

    measured = _peak(make_train_step(loss_num, lambda b: jnp.float32(1.0), tx).lower(ad, opt, shapes, base).compile())
    est = estimate(cfg, mcfg, (1, 1, 1), "sft")
    full_est = estimate(_cfg(**{"sft.batch_size": 8, "sft.seq_len": 256, "model.arch.hidden_size": 256,
                                "model.arch.intermediate_size": 1024, "model.arch.num_hidden_layers": 4}), mcfg, (1, 1, 1), "sft")
    assert est["optimizer"] < 0.2 * full_est["optimizer"] and est["params"] < full_est["params"]
    assert abs(est["peak"] - measured) / measured < 0.25, (est["peak"] / 2**20, measured / 2**20)


def test_bfloat16_first_moment_is_what_the_plan_counts():
    """`optim.mu_dtype: bfloat16`: optax holds AdamW's mu in bfloat16 (nu stays float32) and the plan
    counts 2 + 4 bytes a parameter for the optimizer instead of 4 + 4; a bad value is refused."""
    import jax
    import jax.numpy as jnp

    from mtr_jax.train.optim import make_optimizer

    f32, bf16 = _cfg(), _cfg(**{"sft.optim.mu_dtype": "bfloat16"})
    params = {"w": jnp.zeros((8, 8), jnp.float32)}
    state = jax.eval_shape(make_optimizer(bf16.sft.optim, 10)[0].init, params)
    adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32
    mcfg = model_config(f32)
    a, b = estimate(f32, mcfg, (1, 1, 1), "sft")["optimizer"], estimate(bf16, mcfg, (1, 1, 1), "sft")["optimizer"]
    assert b == pytest.approx(a * 6 / 8)
    with pytest.raises(MtrError, match="mu_dtype"):
        make_optimizer(_cfg(**{"sft.optim.mu_dtype": "float16"}).sft.optim, 10)


def test_plan_at_the_real_shape():
    """`mtr plan` against XLA's compiled memory at the real Qwen2.5-0.5B shape (vocab 151936, 24 layers,
    bf16 compute, float32 AdamW), which its coefficients were not fitted to: an SFT step whose remat
    activations are the peak, and GRPO's shared-prompt update and log-prob forward without remat.
    `python -m mtr_jax.bench.plan_check` runs all 14 programs (with and without remat)."""
    from mtr_jax.bench.plan_check import CASES, _cfg, measure_grpo, measure_sft

    cfg = _cfg("", True, CASES["sft 8x2048"][1])  # shapes only: the preset, no weights
    mcfg = model_config(cfg)
    est = estimate(cfg, mcfg, (1, 1, 1), "sft")
    assert est["activations"] + est["gradients"] > est["update"]  # the activation model is what is checked
    measured = measure_sft(cfg, mcfg)
    assert abs(est["peak"] / measured - 1) < 0.25, (est["peak"] / GiB, measured / GiB)

    cfg = _cfg("", False, CASES["grpo 2x8, max_len 1024"][1])
    mcfg = model_config(cfg)
    est = estimate(cfg, mcfg, (1, 1, 1), "grpo")
    update, forward = measure_grpo(cfg, mcfg)
    planned = est["params"] + est["optimizer"] + est["train_step"]
    assert abs(planned / update - 1) < 0.25, (planned / GiB, update / GiB)
    planned = est["params"] + est["logprob_forward"]
    assert abs(planned / forward - 1) < 0.25, (planned / GiB, forward / GiB)
