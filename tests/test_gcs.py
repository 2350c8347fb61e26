"""gs:// everywhere, against a GCS emulator on 127.0.0.1 (gcp-storage-emulator, in-memory).

Clients reach it the documented way: STORAGE_EMULATOR_HOST for gcsfs (etils.epath), and for orbax's
arrays tensorstore's own endpoint (TENSORSTORE_GCS_HTTP_URL, set by `mtr_jax.paths.use_gcs_emulator`).
- the CLI chain make-traces -> sft -> grpo (init_from the gs:// SFT run) -> eval -> export-hf, with
  every output (checkpoints, metrics, tokenizer, tool cache, traces, eval rows, export) on gs://;
- an SFT run on gs:// killed with SIGKILL and resumed ends bitwise equal to an uninterrupted local one,
  every step logged once;
- a missing bucket and an unreachable store are one line, exit 2, before any work.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from util import REPO

FIX = os.path.join(REPO, "tests", "fixtures", "data")
BUCKET = "mtr-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the GCS emulator did not start")
    env = dict(os.environ, JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}",
               TENSORSTORE_GCS_HTTP_URL=f"http://127.0.0.1:{port}", GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator")
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    yield env
    proc.kill()
    proc.wait()


def _mtr(env, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "mtr_jax.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _gs(env):
    """epath bound to the emulator, in this process."""
    os.environ.update({k: env[k] for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                           "GOOGLE_AUTH_TOKEN_FOR_TESTING")})
    from etils import epath

    return lambda p: epath.Path(f"gs://{BUCKET}/{p}")


def _config(tmp_path, tok_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model: {{preset: tiny, tokenizer: {tok_dir}, arch: {{vocab_size: 1536}}}}
data:
  datasets: [{{name: hotpotqa, path: {FIX}/hotpotqa/original_format.jsonl}}]
  traces: gs://{BUCKET}/data/traces.jsonl
sft: {{steps: 2, batch_size: 2, seq_len: 4096}}
grpo: {{steps: 2, batch_size: 2, group_size: 2, max_turns: 2, max_new_tokens: 8, max_len: 1024}}
eval: {{max_turns: 2, max_new_tokens: 8, max_len: 1024, batch_size: 3}}
run: {{checkpoint_every: 1}}
""")
    return cfg


def test_cli_chain_with_every_output_on_gs(emulator, tmp_path):
    from mtr_jax.data.demo_tokenizer import train_demo_tokenizer

    gs = _gs(emulator)
    tok_dir = tmp_path / "tok"
    train_demo_tokenizer(["Where was the director of the film born? Paris, France."] * 4, vocab_size=300, out_dir=tok_dir)
    cfg = str(_config(tmp_path, tok_dir))
    r = _mtr(emulator, "make-traces", "--config", cfg, "--limit", "4", f"run.out_dir=gs://{BUCKET}/traces")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["kept"] >= 2
    assert gs("data/traces.jsonl").exists() and gs("traces/tool_cache.sqlite").exists()

    r = _mtr(emulator, "sft", "--config", cfg, f"run.out_dir=gs://{BUCKET}/runs/sft")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in gs("runs/sft/checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert gs("runs/sft/tokenizer/tokenizer.json").exists()
    steps = [json.loads(l)["step"] for l in gs("runs/sft/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # the old bug: gs://b/x became <cwd>/gs:/b/x

    # GRPO starts from the gs:// SFT run; its tokenizer comes from there too (model.tokenizer unset)
    r = _mtr(emulator, "grpo", "--config", cfg, f"model.init_from=gs://{BUCKET}/runs/sft", "model.tokenizer=",
             f"run.out_dir=gs://{BUCKET}/runs/grpo")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(l)["step"] for l in gs("runs/grpo/metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert gs("runs/grpo/tool_cache.sqlite").exists()

    r = _mtr(emulator, "eval", "--config", cfg, "--checkpoint", f"gs://{BUCKET}/runs/grpo", "--limit", "3",
             "model.tokenizer=", f"run.out_dir=gs://{BUCKET}/runs/grpo")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(gs("runs/grpo/eval/results.json").read_text())
    assert res["hotpotqa"]["n"] == 3
    assert len(gs("runs/grpo/eval/hotpotqa.jsonl").read_text().splitlines()) == 3

    r = _mtr(emulator, "export-hf", "--checkpoint", f"gs://{BUCKET}/runs/grpo", "--out", f"gs://{BUCKET}/export")
    assert r.returncode == 0, r.stderr[-3000:]
    names = {p.name for p in gs("export").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, names
    local = tmp_path / "export"
    local.mkdir()
    for n in names:
        (local / n).write_bytes(gs(f"export/{n}").read_bytes())
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(local))
    assert m.config.vocab_size == 1536


SFT_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_train import SFT_SETUP
exec(SFT_SETUP)
import os, signal
cfg, mc, params, examples = sft_setting({run!r})
train_sft(cfg, mc, params, examples, {run!r}, progress=False, **{kw})
"""


def test_sft_on_gs_killed_and_resumed_is_bitwise_equal(emulator, tmp_path):
    gs = _gs(emulator)
    tests = os.path.join(REPO, "tests")
    sys.path.insert(0, tests)
    from test_train import SFT_SETUP, _flat

    ns = {}
    exec(SFT_SETUP, ns)
    cfg, mc, params, examples = ns["sft_setting"](str(tmp_path / "local"))
    want, _ = ns["train_sft"](cfg, mc, params, examples, str(tmp_path / "local"), progress=False)
    run = f"gs://{BUCKET}/runs/killed"
    code = SFT_RUN.format(tests=tests, run=run, kw={"stop_after": 5}) + "os.kill(os.getpid(), signal.SIGKILL)\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=emulator, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    assert "4" in {c.name for c in gs("runs/killed/checkpoints").iterdir()}
    code = SFT_RUN.format(tests=tests, run=run, kw={"resume": True}) + """
import numpy as np, jax
from mtr_jax.train.checkpoint import load_params
got, _ = load_params({run!r})
np.save({out!r}, np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(got)]))
""".format(run=run, out=str(tmp_path / "got.npy"))
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=emulator, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "got.npy"), _flat(want))
    steps = [json.loads(l)["step"] for l in gs("runs/killed/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # every step once: the lost step 5 redone


def _one_line_exit2(r, *needles):
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_gs_paths_are_one_line_before_any_work(emulator, tmp_path):
    traces = tmp_path / "t.jsonl"
    traces.write_text("")
    base = ("sft", "--config", "configs/sft-qwen2.5-0.5b.yaml", "model.init_from=", "model.tokenizer=",
            f"data.traces={traces}")
    _one_line_exit2(_mtr(emulator, *base, "run.out_dir=gs://no-such-bucket/run"), "gs://no-such-bucket", "does not exist")
    dead = dict(emulator, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{_free_port()}")
    dead["TENSORSTORE_GCS_HTTP_URL"] = dead["STORAGE_EMULATOR_HOST"]
    _one_line_exit2(_mtr(dead, *base, f"run.out_dir=gs://{BUCKET}/run", timeout=300), "cannot reach")
    # a multi-machine run (a pod slice's worker list) with a local out_dir
    pod = dict(emulator, TPU_WORKER_HOSTNAMES="10.0.0.1,10.0.0.2")
    _one_line_exit2(_mtr(pod, *base, f"run.out_dir={tmp_path / 'run'}"), "shared storage")
