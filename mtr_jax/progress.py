"""Progress that reads well in a terminal AND in a log file.

On a TTY: a tqdm bar. Anywhere else (CI logs, `nohup ... > run.log`, a pod's stdout): one plain
line every `every` steps (about 20 lines per run by default) and at the end, instead of tqdm's
carriage-return updates, which a log file keeps as thousands of partial lines."""

from __future__ import annotations

import sys
import time


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class LineProgress:
    def __init__(self, total: int, initial: int = 0, desc: str = "", every: int | None = None, stream=None):
        self.total, self.n, self.desc = int(total), int(initial), desc
        self.every = every or max(1, self.total // 20)
        self.stream = stream or sys.stdout
        self.postfix: dict = {}
        self.t0, self.n0 = time.perf_counter(), self.n
        self._last = self.n

    def set_postfix(self, **kw):
        self.postfix.update(kw)

    def update(self, n=1):
        self.n += n
        if self.n - self._last >= self.every or self.n >= self.total:
            self._print()

    def _print(self):
        self._last = self.n
        dt = time.perf_counter() - self.t0
        rate = (self.n - self.n0) / dt if dt > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc} {self.n}/{self.total} [{dt:.0f}s elapsed, {left:.0f}s left] {extra}".rstrip(),
              file=self.stream, flush=True)

    def close(self):
        if self.n != self._last:
            self._print()


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True, stream=None):
    """A bar on a terminal, plain lines in a log, nothing when disabled or off the main process."""
    import jax

    if not enabled or jax.process_index() != 0:
        return _NoBar()
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)
    return LineProgress(total, initial, desc, stream=stream)
