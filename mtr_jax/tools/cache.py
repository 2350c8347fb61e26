"""SQLite observation cache: key = (backend, tool, canonical arguments, context id).

WAL journal and one committed transaction per write, so a killed process leaves a consistent
database (SQLite's atomic commit); re-runs read the same observations back, deterministic and cheap.
A `gs://` cache is a local working copy (SQLite needs a local file), copied home by `sync()` (GRPO
calls it at every checkpoint; `close()` does it at the end).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sqlite3
import threading

from mtr_jax.errors import MtrError
from mtr_jax.tools.schema import canonical_json


def cache_key(backend: str, tool: str, arguments: dict, context_id: str) -> str:
    return hashlib.sha256(canonical_json([backend, tool, arguments, context_id]).encode("utf-8")).hexdigest()


def _as_stored(content: dict) -> str:
    """Key order kept (not canonical): a cached observation must render exactly like a fresh one."""
    return json.dumps(content, ensure_ascii=False, separators=(",", ":"))


class ObservationCache:
    def __init__(self, path: str | pathlib.Path):
        from mtr_jax.paths import SyncedFile

        self._file = SyncedFile(path)
        self.path = self._file.local
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: never corrupt, at worst the last write is lost
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS observations (key TEXT PRIMARY KEY, backend TEXT, tool TEXT, "
                "arguments TEXT, context_id TEXT, content TEXT NOT NULL, ok INTEGER NOT NULL, error TEXT)"
            )
        except sqlite3.DatabaseError as e:
            raise MtrError(f"tool cache {self.path}: not a usable SQLite database ({e})") from None

    def get(self, key: str) -> tuple[dict, bool, str | None] | None:
        with self._lock:
            row = self._db.execute("SELECT content, ok, error FROM observations WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), bool(row[1]), row[2]

    def put(self, key: str, backend: str, tool: str, arguments: dict, context_id: str, content: dict, ok: bool, error: str | None) -> None:
        with self._lock:  # autocommit mode: each statement is its own committed transaction
            self._db.execute(
                "INSERT OR REPLACE INTO observations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, backend, tool, canonical_json(arguments), context_id, _as_stored(content), int(ok), error),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM observations").fetchone()[0]

    def sync(self) -> None:
        """Copy a remote cache's local working copy home (a WAL checkpoint first: one file holds it all)."""
        with self._lock:
            self._file.sync(lambda: self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))

    def close(self) -> None:
        self.sync()
        with self._lock:
            self._db.close()
