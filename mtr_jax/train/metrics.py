"""Metrics: one JSON object per line in RUN_DIR/metrics.jsonl, mirrored to TensorBoard.

Only process 0 writes (multi-host). A resumed run appends; lines of steps past the resume point
(written after the last checkpoint of a killed run) are dropped so every step appears once. A
fresh run (no resume) drops the old lines of the stage it logs (an earlier run of that stage in
the same directory) and keeps the others (an SFT run's lines when GRPO follows in its directory),
so two runs' curves are never mixed. On gs:// the file is a local working copy (GCS objects cannot
be appended to), copied home by `sync()` (at every checkpoint) and `close()`; lines past the last
sync belong to steps a resumed run repeats anyway.
"""

from __future__ import annotations

import json
import math

import jax

from mtr_jax import paths


class MetricsLogger:
    def __init__(self, run_dir: str, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        paths.makedirs(run_dir)
        self._file = paths.SyncedFile(paths.join(run_dir, "metrics.jsonl"))  # local or gs://
        self.path = self._file.local
        self._tb_home = paths.join(run_dir, "tb") if paths.is_remote(run_dir) else None
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.fresh = resume_step is None
        self.started: set[str] = set()
        self.f = self.path.open("a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tb") if self._tb_home else paths.join(run_dir, "tb"))
            except Exception:  # TensorBoard is a mirror; JSONL is the record
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        keep = []
        with self.path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", -1) <= step or rec.get("stage") not in ("sft", "grpo"):
                    keep.append(json.dumps(rec))
        with self.path.open("w") as f:
            f.write("".join(k + "\n" for k in keep))

    def _drop_stage(self, stage: str) -> None:
        self.f.close()
        with self.path.open() as f:
            keep = [line for line in f if _stage_of(line) != stage]
        with self.path.open("w") as f:
            f.write("".join(keep))
        self.f = self.path.open("a")

    def log(self, step: int, stage: str, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.fresh and stage not in self.started:
            self._drop_stage(stage)
        self.started.add(stage)
        rec = {"step": int(step), "stage": stage}
        for k, v in metrics.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            rec[k] = v if math.isfinite(v) else None
            if self.tb is not None and math.isfinite(v):
                self.tb.add_scalar(f"{stage}/{k}", v, step)
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def sync(self) -> None:
        """Copy a gs:// run's metrics (and TensorBoard events) home; nothing to do for a local run."""
        if not self.enabled or not self._file.remote:
            return
        self.f.flush()
        if self.tb is not None:
            self.tb.flush()
        self._send_home()

    def _send_home(self) -> None:
        self._file.sync()
        tb = self.path.parent / "tb"
        if tb.is_dir():
            paths.upload_tree(tb, self._tb_home)

    def close(self) -> None:
        if self.enabled:
            if self.tb is not None:
                self.tb.close()
            self.f.close()
            if self._file.remote:
                self._send_home()


def _stage_of(line: str):
    try:
        return json.loads(line).get("stage")
    except (json.JSONDecodeError, AttributeError):
        return None  # a line cut by a kill: kept, as readers skip it
