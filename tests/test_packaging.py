"""A non-editable install (`pip install .`) ships the presets and run configs inside the package."""

import os
import subprocess
import sys

from util import REPO


def test_non_editable_install_finds_presets_and_configs(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), REPO], capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import mtr_jax.config as c, mtr_jax.model.presets as p;"
            "assert str(c.CONFIG_DIR).startswith(%r), c.CONFIG_DIR;"
            "print(c.find_config_file('configs/grpo-qwen2.5-0.5b-instruct.yaml'));"
            "print(p.load_preset('qwen2.5-7b').num_hidden_layers)") % str(target)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=str(target)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "28" and "grpo-qwen2.5-0.5b-instruct.yaml" in r.stdout
