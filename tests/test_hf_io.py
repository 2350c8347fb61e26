"""HF import/export: transformers reloads what we export, our loader round-trips bitwise, and
every bad input is an MtrError naming the file and the problem (one line, exit 2 at the CLI)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from hf_oracle import hf_logits, make_hf_model
from mtr_jax.cli import main as cli_main
from mtr_jax.errors import MtrError
from mtr_jax.model.hf_io import export_hf, load_hf, load_hf_params
from util import REPO

IDS = np.random.RandomState(5).randint(0, 256, (2, 10))


def _leaves(params):
    return jax.tree_util.tree_leaves_with_path(params)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_reloads_in_transformers_and_round_trips_bitwise(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    make_hf_model(tmp_path / "src", kv_heads=2, tied=tied)
    model, cfg = load_hf(tmp_path / "src")
    ours = np.asarray(model(IDS))
    # a tiny shard threshold forces the sharded layout with an index
    out = export_hf(model, cfg, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    assert "model.layers.0.self_attn.q_proj.bias" in index["weight_map"]
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "qwen2" and hf_cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (out / "generation_config.json").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert np.abs(hf_logits(reloaded, IDS) - ours).max() <= 1e-5

    again, cfg2 = load_hf_params(out)
    assert cfg2.tie_word_embeddings == tied
    for (path, a), (_, b) in zip(_leaves(model.params()), _leaves(again), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


def test_bf16_checkpoint_and_tokenizer_files(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    make_hf_model(tmp_path / "src", tied=True, dtype=torch.bfloat16)
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    p16, cfg = load_hf_params(tmp_path / "src", dtype="bfloat16")
    p32, _ = load_hf_params(tmp_path / "src", dtype="float32")
    assert p16["embed"].dtype == jax.numpy.bfloat16
    for a, b in zip(jax.tree_util.tree_leaves(p16), jax.tree_util.tree_leaves(p32)):
        assert np.array_equal(np.asarray(a), np.asarray(b.astype(a.dtype)))  # bf16 -> f32 is exact
    out = export_hf(p16, cfg, tmp_path / "out", tokenizer=tmp_path / "src")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer_config.json").exists() and (out / "model.safetensors").exists()
    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert m.dtype == torch.bfloat16
    sd = m.state_dict()
    ref = np.asarray(p16["layers"]["q_w"][1].astype(np.float32)).T
    assert np.array_equal(sd["model.layers.1.self_attn.q_proj.weight"].float().numpy(), ref)


def test_cli_import_then_export_round_trip(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(tmp_path / "src", kv_heads=1, tied=False)
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    assert cli_main(["import-hf", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli_main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert np.abs(hf_logits(back, IDS) - hf_logits(hf, IDS)).max() == 0.0  # f32 all the way: exact
    # importing into a dir that already holds a checkpoint is refused
    assert cli_main(["import-hf", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input.


def _rewrite_tensor(path, name, new_shape=None, drop=False):
    """Rewrite one tensor header of a single-file safetensors (shape change or removal)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    if drop:
        del header[name]
    else:
        start, _ = header[name]["data_offsets"]
        size = int(np.prod(new_shape)) * 4
        header[name]["shape"] = list(new_shape)
        header[name]["data_offsets"] = [start, start + size]
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_bad_inputs_name_file_and_problem(tmp_path):
    with pytest.raises(MtrError, match="not found"):
        load_hf(tmp_path / "nope")
    src = tmp_path / "src"
    make_hf_model(src, tied=True)
    st = src / "model.safetensors"
    good = st.read_bytes()

    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(MtrError, match=r"llama.*config\.json.*not qwen2|config\.json.*llama.*not qwen2"):
        load_hf(tmp_path / "llama")

    _rewrite_tensor(st, "model.layers.1.mlp.up_proj.weight", (64, 64))
    with pytest.raises(MtrError) as e:
        load_hf(src)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.1.mlp.up_proj.weight" in msg and "[64, 64]" in msg and "[128, 64]" in msg
    assert "\n" not in msg

    st.write_bytes(good)
    _rewrite_tensor(st, "model.layers.0.self_attn.k_proj.bias", drop=True)
    with pytest.raises(MtrError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.bias'"):
        load_hf(src)

    st.write_bytes(b"\x00garbage")
    with pytest.raises(MtrError, match="model.safetensors: not a readable safetensors file"):
        load_hf(src)
    st.unlink()
    with pytest.raises(MtrError, match="no \\*.safetensors"):
        load_hf(src)


def test_cli_bad_path_prints_one_line_and_exits_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    (tmp_path / "empty").mkdir()
    for argv, want in (
        (["import-hf", "--model", "/nonexistent", "--out", str(tmp_path / "x")], "not found"),
        (["export-hf", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "y")], "not found"),
        (["export-hf", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "y")], "no checkpoint found"),
    ):
        proc = subprocess.run([sys.executable, "-m", "mtr_jax.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
