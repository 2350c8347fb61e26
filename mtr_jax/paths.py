"""One path abstraction for everything the CLI reads or writes: local paths and `gs://` URLs.

`etils.epath` (what orbax itself uses) does the work: local paths stay `pathlib`-like, `gs://`
goes through gcsfs (and tensorstore for orbax's arrays). What needs a real local file gets one:
  - `local_dir_for_write(dest)`: a directory to write into (`save_pretrained`, an export);
    uploaded to `dest` on exit when `dest` is remote;
  - `localize(path)`: a local copy of a remote file or directory to read (a tokenizer, an HF dir),
    kept under the cache directory, keyed by the URL;
  - the SQLite tool cache lives in a local file, synced to its remote path (`SyncedFile`).

Tests and offline users point both clients at a GCS emulator on 127.0.0.1 with
`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (`use_gcs_emulator` sets what tensorstore needs too).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import tempfile

from etils import epath

from mtr_jax.errors import MtrError

REMOTE_PREFIXES = ("gs://",)


def is_remote(p) -> bool:
    return str(p).startswith(REMOTE_PREFIXES)


def path(p) -> epath.Path:
    """A local path (user-expanded, absolute) or a `gs://` URL, as an `epath.Path`."""
    s = str(p)
    if is_remote(s):
        return epath.Path(s)
    return epath.Path(pathlib.Path(s.removeprefix("file://")).expanduser().absolute())


def join(base, *parts) -> str:
    """`os.path.join` that keeps `gs://` URLs intact."""
    return str(path(base).joinpath(*parts)) if is_remote(base) else os.path.join(str(base), *parts)


def exists(p) -> bool:
    try:
        return path(p).exists()
    except Exception as e:  # a remote store that cannot be reached says so once, here
        raise MtrError(f"{p}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def makedirs(p) -> epath.Path:
    d = path(p)
    d.mkdir(parents=True, exist_ok=True)
    return d


def use_gcs_emulator(endpoint: str | None = None) -> None:
    """Point every GCS client at an emulator: gcsfs reads STORAGE_EMULATOR_HOST; orbax's arrays go
    through tensorstore, which takes its own endpoint and a fixed token (no credentials)."""
    endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST")
    if not endpoint:
        return
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    import logging

    # gcsfs asks Google (not the emulator) for each bucket's type, fails without credentials and warns
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", endpoint)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def check_writable(p, what: str = "run.out_dir") -> None:
    """Before any work: a remote directory must be reachable and its bucket must exist (one line)."""
    if not is_remote(p):
        return
    use_gcs_emulator()
    bucket = str(p)[len("gs://"):].split("/", 1)[0]
    import logging

    log = logging.getLogger("gcsfs")
    level = log.level
    log.setLevel(logging.CRITICAL)  # gcsfs logs each failed retry with a traceback; one line below says it
    try:
        ok = epath.Path(f"gs://{bucket}").exists()
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise MtrError(f"{what} {p}: cannot reach Google Cloud Storage ({type(e).__name__}: {first}); "
                       "check credentials (gcloud auth application-default login) or STORAGE_EMULATOR_HOST") from None
    finally:
        log.setLevel(level)
    if not ok:
        raise MtrError(f"{what} {p}: bucket gs://{bucket} does not exist")


def upload_tree(src: pathlib.Path, dest) -> None:
    """Copy every file under the local directory `src` to `dest` (local or gs://)."""
    dest = path(dest)
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = dest / f.relative_to(src).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())


@contextlib.contextmanager
def local_dir_for_write(dest):
    """Yields a local directory; its contents are at `dest` when the block ends (uploaded if remote)."""
    if not is_remote(dest):
        d = pathlib.Path(str(dest)).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        yield d
        return
    with tempfile.TemporaryDirectory(prefix="mtr_upload_") as tmp:
        yield pathlib.Path(tmp)
        upload_tree(pathlib.Path(tmp), dest)


def walk(d):
    """Every file under `d`, depth first (epath's gs:// glob has no `**`)."""
    for c in sorted(path(d).iterdir()):
        if c.is_dir():
            yield from walk(c)
        else:
            yield c


def _cache_dir(url: str) -> pathlib.Path:
    from mtr_jax.model.sources import cache_root

    return cache_root() / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _fetch(src: epath.Path, target: pathlib.Path) -> None:
    """Download `src` to `target` unless a copy of the same size is there (a model is read several
    times per run: config, weights, tokenizer)."""
    try:
        if target.exists() and target.stat().st_size == src.stat().length:
            return
    except (AttributeError, OSError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, target)  # a killed download never leaves a short file under the real name


def localize(p) -> pathlib.Path:
    """A local path holding `p`'s contents: `p` itself when local, else a downloaded copy
    (a file, or a directory tree) under the cache directory, keyed by the URL."""
    if not is_remote(p):
        return pathlib.Path(str(p).removeprefix("file://")).expanduser()
    src = path(p)
    out = _cache_dir(str(p))
    if src.is_dir():
        for f in walk(src):
            _fetch(f, out / str(f)[len(str(src)):].lstrip("/"))
        out.mkdir(parents=True, exist_ok=True)
        return out
    target = out / src.name
    _fetch(src, target)
    return target


class SyncedFile:
    """A local working copy of a file whose home may be remote (the SQLite tool cache: SQLite needs
    a local file). `local` is the path to use; `sync()` copies it home (at checkpoints and at the
    end); a remote file that exists is downloaded first, so a resumed run keeps what was answered."""

    def __init__(self, home):
        self.home = str(home)
        self.remote = is_remote(home)
        if not self.remote:
            self.local = pathlib.Path(self.home).expanduser().absolute()
            self.local.parent.mkdir(parents=True, exist_ok=True)
            return
        self.local = _cache_dir(self.home) / path(home).name
        self.local.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("-wal", "-shm"):  # a stale journal from another run must not be replayed
            pathlib.Path(str(self.local) + suffix).unlink(missing_ok=True)
        if path(home).exists():
            self.local.write_bytes(path(home).read_bytes())
        else:
            self.local.unlink(missing_ok=True)

    def sync(self, checkpoint=None) -> None:
        """Copy the local file home. `checkpoint`: called first (SQLite's WAL checkpoint)."""
        if not self.remote or not self.local.exists():
            return
        if checkpoint is not None:
            checkpoint()
        dest = path(self.home)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.local.read_bytes())
