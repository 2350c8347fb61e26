"""GGUF in, on tiny files written here with the `gguf` package's own writer, plus model-spec
resolution (offline:NAME assembly and verification, hub ids offline) and their bad-input paths.
The real GGUF is checked against transformers in test_real_model.py."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from hf_oracle import hf_logits, make_hf_model
from mtr_jax.errors import MtrError
from mtr_jax.model import sources
from mtr_jax.model.hf_io import load_hf, load_hf_params


def write_gguf(model, path, qtype=None, arch="qwen2"):
    """A GGUF of a transformers Qwen2 model, as llama.cpp's converter lays it out (HF names through
    gguf's tensor map, [out, in] data); qtype quantizes the 2-D weights (e.g. Q8_0)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_tokenizer_model("gpt2")  # transformers' loader reads the vocabulary size from the token list
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if qtype is not None and a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    model = make_hf_model(tmp_path / "hf", tied=False)
    return model, write_gguf(model, tmp_path / "tiny.gguf")


def test_float32_gguf_logits_equal_transformers(tiny_gguf):
    model, path = tiny_gguf
    ours, cfg = load_hf(str(path))
    assert not cfg.tie_word_embeddings and cfg.vocab_size == 256 and cfg.num_key_value_heads == 2
    ids = np.random.default_rng(0).integers(0, 256, (2, 17))
    assert np.max(np.abs(np.asarray(ours(ids)) - hf_logits(model, ids))) < 1e-5


def test_quantized_gguf_equals_transformers_gguf_loader(tmp_path):
    """Q8_0 weights: our dequantized parameters are transformers' GGUF loader's, bit for bit."""
    import gguf
    import torch
    import transformers

    from mtr_jax.model.hf_io import hf_names

    model = make_hf_model(tmp_path / "hf", tied=True)
    path = write_gguf(model, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    params, cfg = load_hf_params(str(path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q8.gguf", dtype=torch.float32)
    sd = ref.state_dict()
    for p, (names, transpose) in hf_names(cfg).items():
        arr = np.asarray(params[p[0]][p[1]] if len(p) == 2 else params[p[0]])
        for i, n in enumerate(names):
            a = arr[i] if p[0] == "layers" else arr
            assert np.array_equal(a.T if transpose else a, sd[n].numpy()), n
    # and the quantization really happened (the weights moved off the float32 originals)
    assert not np.array_equal(np.asarray(params["embed"]), model.model.embed_tokens.weight.detach().numpy())


def test_gguf_as_init_from_and_import_hf(tiny_gguf, tmp_path):
    from mtr_jax.config import ModelConfig
    from mtr_jax.model.presets import build_params

    model, path = tiny_gguf
    params, cfg = build_params(ModelConfig(init_from=str(path)))
    ref, _ = load_hf_params(str(path))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)))
    r = _mtr("import-hf", "--model", str(path), "--out", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    assert "no tokenizer imported" in r.stderr  # this GGUF's token list has no merges: weights only, said once
    back, cfg2 = load_hf_params(str(tmp_path / "ck"))  # a checkpoint is a model spec too
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(ref)))


def _mtr(*args, env=None):
    e = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "mtr_jax.cli", *args], capture_output=True, text=True, env=e, timeout=300)


def _one_line_exit2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_gguf_files_one_line_exit_2(tiny_gguf, tmp_path):
    model, path = tiny_gguf
    data = path.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:100])
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"XXXX" + data[4:])
    llama = write_gguf(model, tmp_path / "llama.gguf", arch="llama")
    for bad, needle in ((trunc, "trunc"), (header_cut, "header.gguf"), (magic, "magic.gguf"), (llama, "llama")):
        with pytest.raises(MtrError):
            load_hf_params(str(bad))
        line = _one_line_exit2(_mtr("import-hf", "--model", str(bad), "--out", str(tmp_path / f"o-{bad.stem}")), str(bad))
        assert needle in line
    assert "not qwen2" in line


def test_hub_id_offline_and_not_cached_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    line = _one_line_exit2(_mtr("import-hf", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--out", str(tmp_path / "o"), env=env),
                           "Qwen/Qwen2.5-0.5B-Instruct", "HF_HUB_OFFLINE")
    cfg = tmp_path / "c.yaml"
    fixture = pathlib.Path(__file__).parent / "fixtures" / "hotpotqa_dev_original_20.jsonl"
    cfg.write_text("model:\n  init_from: Qwen/Qwen2.5-0.5B-Instruct\n"
                   f"data:\n  datasets: [{{name: hotpotqa, path: {fixture}}}]\n")
    _one_line_exit2(_mtr("eval", "--config", str(cfg), f"run.out_dir={tmp_path / 'run'}", env=env),
                    "model.init_from", "Qwen/Qwen2.5-0.5B-Instruct", "HF_HUB_OFFLINE")


def test_hub_id_resolves_from_the_hub_cache(tmp_path, monkeypatch):
    """A hub id whose snapshot is in huggingface_hub's cache loads offline (HF_HUB_OFFLINE=1)."""
    make_hf_model(tmp_path / "src")
    repo = tmp_path / "hub" / "models--someone--tiny-qwen"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in (tmp_path / "src").iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = sources.resolve("someone/tiny-qwen")
    assert src.kind == "hf_dir" and src.path == snap
    _, cfg = load_hf_params("someone/tiny-qwen")
    assert cfg.vocab_size == 256


def _fake_offline(monkeypatch, tmp_path, parts: list[bytes], sha=None):
    files = []
    for i, b in enumerate(parts):
        f = tmp_path / f"part{i}.bin"
        f.write_bytes(b)
        files.append(f)
    whole = b"".join(parts)
    m = sources.OfflineModel(packages=("fake-a", "fake-b"), version="1", size=len(whole),
                             sha256=sha or hashlib.sha256(whole).hexdigest(), license="none")
    monkeypatch.setitem(sources.OFFLINE_MODELS, "fake", m)
    monkeypatch.setattr(sources, "_offline_parts", lambda name, m: files)
    monkeypatch.setenv("MTR_CACHE", str(tmp_path / "cache"))
    return whole


def test_offline_model_assembles_verifies_and_repairs(monkeypatch, tmp_path):
    whole = _fake_offline(monkeypatch, tmp_path, [os.urandom(3000), os.urandom(1234)])
    p = sources.offline_gguf("fake")
    assert p.read_bytes() == whole
    assert json.loads((p.parent / "verified.json").read_text())["size"] == len(whole)
    assert sources.offline_gguf("fake") == p  # stamp hit: no rebuild
    p.write_bytes(b"corrupt" + whole[7:])  # damaged cache (same size, new mtime) -> rebuilt from the parts
    assert sources.offline_gguf("fake").read_bytes() == whole


def test_offline_model_with_wrong_hash_is_refused(monkeypatch, tmp_path):
    _fake_offline(monkeypatch, tmp_path, [b"abc", b"def"], sha="0" * 64)
    with pytest.raises(MtrError, match="sha256"):
        sources.offline_gguf("fake")
    assert not list((tmp_path / "cache" / "offline" / "fake").glob("model.gguf*"))  # nothing half-written left


def test_offline_model_not_installed_names_the_pip_command(monkeypatch, tmp_path):
    m = sources.OfflineModel(packages=("no-such-package-mtr-xyz",), version="1", size=1, sha256="0" * 64, license="none")
    monkeypatch.setitem(sources.OFFLINE_MODELS, "missing", m)
    monkeypatch.setenv("MTR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MtrError, match=r"pip install 'mtr_jax\[offline\]'"):
        sources.resolve("offline:missing")
    with pytest.raises(MtrError, match="unknown offline model"):
        sources.resolve("offline:nope")


def test_shipped_configs_found_from_any_directory(tmp_path, monkeypatch):
    from mtr_jax.config import find_config_file

    monkeypatch.chdir(tmp_path)
    for spec in ("configs/sft-qwen2.5-0.5b-instruct.yaml", "sft-qwen2.5-0.5b-instruct.yaml", "sft-qwen2.5-0.5b-instruct"):
        assert find_config_file(spec).name == "sft-qwen2.5-0.5b-instruct.yaml"
    assert find_config_file("configs/model/tiny.yaml").exists()
    with pytest.raises(MtrError, match="not found"):
        find_config_file("configs/nope.yaml")
