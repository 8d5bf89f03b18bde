"""Known models and their checkpoints: a registry, a cache, and verified, resumable downloads.

    path, config = hub.checkpoint_file("bsmamba2-vocals-msst")    # downloads once, then uses the cache

The registry is `registry.yaml` beside this file, extended or overridden by the YAML file that the
BSMAMBA2_MODELS environment variable names. A model's file comes from one of three places: installed with the
package (`package_file`), a local file (a `file://` URL, used where it is), or an http(s) URL downloaded into the
cache folder (BSMAMBA2_CACHE, else the platform's user cache folder).

Downloads behave as pip and Hugging Face Hub users expect: streamed to `<file>.part` beside the final name,
resumed with an HTTP Range request after an interruption, checked against the entry's size and sha256, then
renamed into place; a lock file makes concurrent processes (torchrun ranks) download once while the others wait.
A server never writes more than the entry's size to the disk, and a symbolic link planted in a shared cache at a
name we write (`.part`, `.lock`) is refused rather than written through.
A cached file is hashed once, when it arrives (or when it is first found there, put by hand); afterwards it is
trusted while its size and modification time are unchanged, as Hugging Face Hub trusts its cache: hashing a
200 MB checkpoint on every run would cost more than it protects.

This module never imports torch: `bsmamba2 models` lists and downloads without it.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import yaml
from tqdm import tqdm

from . import __version__
from .config import packaged_config_names
from .errors import BSMamba2Error
from .files import write_text_atomic

log = logging.getLogger(__name__)

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")
REGISTRY_VERSION = 1
MODELS_ENV = "BSMAMBA2_MODELS"
CACHE_ENV = "BSMAMBA2_CACHE"
# What runs when no model or checkpoint is named: a bundled model, four stems as demucs gives them (karaoke users
# add --two-stems vocals); the choice is explained in bsmamba2/pretrained/synth_4stem.md.
DEFAULT_MODEL = "synth-4stem"

URL_SCHEMES = ("http", "https", "file")
TIMEOUT_SECONDS = 30.0  # for connecting and for each read: a stalled server fails instead of hanging
ATTEMPTS = 3            # transfers per download: an interrupted one is resumed this many times before giving up
CHUNK_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Score:
    stem: str
    metric: str
    value: float
    dataset: str
    source: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str = ""
    stems: tuple[str, ...] = ()
    url: Optional[str] = None           # http(s):// to download, or file:// to use in place
    package_file: Optional[str] = None  # or a file installed with the package, relative to it
    file: Optional[str] = None          # the downloaded file's name in the cache (default: the URL's last part)
    sha256: Optional[str] = None
    size: Optional[int] = None          # bytes
    license: Optional[str] = None
    source: Optional[str] = None        # where the model is published
    config: Optional[str] = None        # a packaged config name or a YAML path, for checkpoints without one
    architecture: Optional[str] = None
    scores: tuple[Score, ...] = ()
    registry: str = ""                  # the YAML file that defines the entry, for messages


# The keys a registry entry may have; `name` is its key in `models:`, `registry` is where it was read.
ENTRY_KEYS = [f.name for f in dataclasses.fields(ModelEntry) if f.name not in ("name", "registry")]
_TEXT_KEYS = ("description", "url", "package_file", "file", "sha256", "license", "source", "config",
              "architecture")
_SCORE_KEYS = [f.name for f in dataclasses.fields(Score)]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # also a folder name in the cache
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def registry() -> dict[str, ModelEntry]:
    """The shipped models, extended or overridden by the entries of the file named by BSMAMBA2_MODELS."""
    entries = _read_registry(REGISTRY_FILE)
    user_file = os.environ.get(MODELS_ENV)
    if user_file:
        entries.update(_read_registry(Path(user_file).expanduser()))
    return entries


def get_model(name: str) -> ModelEntry:
    entries = registry()
    if name not in entries:
        raise BSMamba2Error(f"unknown model {name!r} (known: {', '.join(sorted(entries))}; add your own in a "
                            f"YAML file named by {MODELS_ENV})")
    return entries[name]


def checkpoint_file(name: str, progress: bool = True) -> tuple[Path, Optional[str]]:
    """Model `name`'s verified local checkpoint file (downloaded on first use, with a progress bar unless
    `progress` is False) and the config it needs: a packaged config name, a YAML path, or None."""
    entry = get_model(name)
    if entry.package_file is not None:
        return _package_file(entry), entry.config
    if _scheme(entry.url) == "file":
        return _file_in_place(entry), entry.config
    return _cached_download(entry, progress), entry.config


def _read_registry(path: Path) -> dict[str, ModelEntry]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise BSMamba2Error(f"cannot read model registry {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise BSMamba2Error(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise BSMamba2Error(f"{path}: expected `models:`, a mapping of model names to entries")
    unknown = sorted(set(document) - {"version", "models"})
    if unknown:
        raise BSMamba2Error(f"{path}: unknown key {unknown[0]} (known: version, models)")
    if document.get("version", REGISTRY_VERSION) != REGISTRY_VERSION:
        raise BSMamba2Error(f"{path}: version {document['version']!r} is not supported (this bsmamba2 reads "
                            f"version {REGISTRY_VERSION})")
    return {str(name): _parse_entry(str(name), values, path) for name, values in document["models"].items()}


def _parse_entry(name: str, values, path: Path) -> ModelEntry:
    """Check one entry's YAML mapping; every problem is one line naming the file and the key."""
    where = f"{path}: models.{name}"

    def require(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise BSMamba2Error(f"{where}{'.' + key if key else ''}: {message}")

    require(bool(_NAME.match(name)), "", "a model name is letters, digits, '.', '_' and '-'")
    require(isinstance(values, dict), "", "expected a mapping of fields (url, sha256, ...)")
    unknown = sorted(set(values) - set(ENTRY_KEYS))
    require(not unknown, unknown[0] if unknown else "", f"unknown key (known: {', '.join(ENTRY_KEYS)})")
    for key in _TEXT_KEYS:
        require(values.get(key) is None or isinstance(values[key], str), key, "expected a string")
    url, sha256, size = values.get("url"), values.get("sha256"), values.get("size")
    require((url is None) != (values.get("package_file") is None), "url",
            "give a URL (http://, https:// or file://), or package_file for a file installed with bsmamba2")
    scheme = _scheme(url)
    require(url is None or scheme in URL_SCHEMES, "url", f"expected an http://, https:// or file:// URL, got {url!r}")
    if sha256 is not None:
        sha256 = sha256.lower()
        require(bool(_SHA256.match(sha256)), "sha256", "expected 64 hexadecimal digits")
    require(sha256 is not None or scheme not in ("http", "https"), "sha256",
            "required for an http(s) URL: a download is used only once its hash has been checked")
    require(size is None or (type(size) is int and size > 0), "size", "expected a positive number of bytes")
    stems = values.get("stems", [])
    require(isinstance(stems, list) and all(isinstance(s, str) for s in stems), "stems", "expected a list of names")
    file = values.get("file") or (Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name if url else None)
    require(scheme not in ("http", "https") or (bool(file) and Path(file).name == file and file not in (".", "..")),
            "file", "expected a plain file name for the cache (the URL does not end in one)")
    config = values.get("config")
    if config is not None and config not in packaged_config_names():
        require(Path(config).suffix in (".yaml", ".yml"), "config", f"{config!r} is neither a packaged config "
                f"({', '.join(packaged_config_names())}) nor a .yaml file")
        config = str(path.parent / Path(config).expanduser())  # relative to the registry file that names it
    scores = values.get("scores") or []
    require(isinstance(scores, list), "scores", "expected a list of {stem, metric, value, dataset, source}")
    for i, score in enumerate(scores):
        require(isinstance(score, dict) and sorted(score) == sorted(_SCORE_KEYS)
                and isinstance(score["value"], (int, float)), f"scores[{i}]",
                f"expected {', '.join(_SCORE_KEYS)} (value a number)")
    return ModelEntry(
        name=name, description=values.get("description") or "", stems=tuple(stems), url=url,
        package_file=values.get("package_file"), file=file, sha256=sha256, size=size,
        license=values.get("license"), source=values.get("source"), config=config,
        architecture=values.get("architecture"), scores=tuple(Score(**score) for score in scores),
        registry=str(path))


def _scheme(url: Optional[str]) -> Optional[str]:
    return urllib.parse.urlparse(url).scheme.lower() if url else None


# ------------------------------------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """BSMAMBA2_CACHE, else the platform's user cache folder (where pip and Hugging Face Hub keep theirs)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "bsmamba2" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "bsmamba2"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bsmamba2"


def local_path(entry: ModelEntry) -> Path:
    """Where model `entry`'s file is (installed with the package, or a file:// path) or will be (the cache)."""
    if entry.package_file is not None:
        return Path(__file__).parent / entry.package_file
    if _scheme(entry.url) == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(entry.url).path))
    return cache_dir() / entry.name / entry.file


def is_cached(entry: ModelEntry) -> bool:
    """Whether the model's file is here already (of the right size, when the entry gives one): no download."""
    path = local_path(entry)
    return path.is_file() and (entry.size is None or path.stat().st_size == entry.size)


def _package_file(entry: ModelEntry) -> Path:
    path = local_path(entry)
    if not path.is_file():
        raise BSMamba2Error(f"model {entry.name}: {path} is missing from the installed package (reinstall bsmamba2)")
    return path


def _file_in_place(entry: ModelEntry) -> Path:
    """A file:// model is used where it is, as pip installs from a local path: a copy in the cache would double
    its disk space. Its sha256, when given, is checked on every use, since the file may change outside the cache."""
    path = local_path(entry)
    if not path.is_file():
        raise BSMamba2Error(f"model {entry.name}: no file {path} (from {entry.url} in {entry.registry})")
    problem = _mismatch(entry, path)
    if problem:
        raise BSMamba2Error(f"model {entry.name}: {path} has {problem}")
    return path


def _cached_download(entry: ModelEntry, progress: bool) -> Path:
    path = local_path(entry)
    if _is_verified(entry, path):
        return path
    with _exclusive_lock(path.with_name(path.name + ".lock"), entry.name):
        # Another process may have downloaded it while this one waited for the lock.
        if not (_is_verified(entry, path) or _verify_found_file(entry, path)):
            _download(entry, path, progress)
    return path


def _is_verified(entry: ModelEntry, path: Path) -> bool:
    """Whether `path` was hashed before and found to be the entry's file, and has not changed since: its stamp
    records the hash with the file's size and modification time."""
    try:
        return _stamp_path(path).read_text().split() == [entry.sha256, *_file_state(path)]
    except OSError:
        return False


def _verify_found_file(entry: ModelEntry, path: Path) -> bool:
    """A file at the cache path without a valid stamp (put there by hand, or changed) is hashed once: stamped when
    it is the entry's file, else deleted so that it is downloaded again."""
    if not path.is_file():
        return False
    problem = _mismatch(entry, path)
    if problem:
        log.warning(f"model {entry.name}: {path} has {problem}; downloading it again")
        path.unlink()
        return False
    _write_stamp(entry, path)
    return True


def _mismatch(entry: ModelEntry, path: Path) -> Optional[str]:
    """What makes `path` not the entry's file (its size, then its sha256), or None when it is."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"{size} bytes, expected {entry.size}"
    digest = _sha256(path) if entry.sha256 else None
    if digest != entry.sha256:
        return f"sha256 {digest}, expected {entry.sha256}"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _file_state(path: Path) -> list[str]:
    stat = path.stat()
    return [str(stat.st_size), str(stat.st_mtime_ns)]


def _write_stamp(entry: ModelEntry, path: Path) -> None:
    write_text_atomic(_stamp_path(path), " ".join([entry.sha256, *_file_state(path)]) + "\n")


# ---------------------------------------------------------------------------------------------------- download

def _download(entry: ModelEntry, path: Path, progress: bool) -> None:
    """Fetch the entry's URL into `path` through `<file>.part`: resumed after interruptions, then checked against
    the size and sha256 and renamed. A part that fails the check is deleted; one cut short is kept for resuming."""
    part = path.with_name(path.name + ".part")
    for _ in range(ATTEMPTS):
        announced = _transfer(entry, part, path, progress)
        # The server's word on the file's length decides whether the transfer was cut short; the entry's size is
        # for the check below (a file of another size is not resumed, it is refused).
        expected = announced if announced is not None else entry.size
        received = part.stat().st_size
        if expected is None or received >= expected:
            break
        log.warning(f"model {entry.name}: the download stopped at {received} of {expected} bytes; resuming")
    else:
        raise BSMamba2Error(f"model {entry.name}: the download from {entry.url} kept stopping ({received} of "
                            f"{expected} bytes so far, kept in {part}); run the command again to resume")
    problem = _mismatch(entry, part)
    if problem:
        part.unlink()
        raise BSMamba2Error(f"model {entry.name}: the file downloaded from {entry.url} has {problem}; deleted it "
                            f"(if this persists, the file on the server is not the one the registry describes)")
    os.replace(part, path)
    _write_stamp(entry, path)


def _transfer(entry: ModelEntry, part: Path, path: Path, progress: bool) -> Optional[int]:
    """One request: continue `part` from where it ends (an HTTP Range request) or start it afresh. Returns the
    file's full size as the server announced it (None when it did not). A connection that breaks mid-file ends
    the transfer quietly: the caller sees the part is short and resumes."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(entry.url, headers={"User-Agent": f"bsmamba2/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the part is not a prefix of the file (or is all of it): start afresh
            part.unlink()
            return _transfer(entry, part, path, progress)
        raise _unreachable(entry, path, f"HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:  # URLError (offline, refused, DNS), timeouts
        raise _unreachable(entry, path, getattr(error, "reason", None) or error) from None
    with response:
        if response.status != 206:  # the whole file (a server that ignores Range sends it all again)
            offset = 0
        length = response.headers.get("Content-Length")
        announced = offset + int(length) if length and length.isdigit() else None
        # A hostile server, or anyone on a plain http path, must not fill the disk: nothing past the entry's size
        # is written, and a Content-Length beyond it is refused before the body.
        oversize = entry.size is not None and announced is not None and announced > entry.size
        if not oversize:
            # sizes in MB = 10^6 bytes (tqdm's default, bsmamba2.sizes); a bar on a terminal only, as in separate_file
            with _open_no_link(part, "ab" if offset else "wb") as file, \
                    tqdm(total=entry.size or announced, initial=offset, unit="B", unit_scale=True,
                         desc=entry.name, disable=None if progress else True) as bar:
                received = offset
                try:
                    for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                        received += len(block)
                        if entry.size is not None and received > entry.size:
                            oversize = True
                            break
                        file.write(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException) as error:
                    log.warning(f"model {entry.name}: connection lost during the download ({error})")
    if oversize:
        part.unlink(missing_ok=True)
        raise BSMamba2Error(f"model {entry.name}: {entry.url} sends more than the {entry.size} bytes that "
                            f"{entry.registry} gives for it; stopped and deleted the download (the file on the "
                            "server is not the one the registry describes)")
    return announced


def _unreachable(entry: ModelEntry, path: Path, reason) -> BSMamba2Error:
    return BSMamba2Error(f"model {entry.name}: cannot download {entry.url} ({reason}); without a connection, put the "
                         f"file at {path} by hand (sha256 {entry.sha256})")


def _open_no_link(path: Path, mode: str):
    """`open(path, mode)` for a file that we write in the cache, refusing a symbolic link there (O_NOFOLLOW, where
    the system has it): in a shared cache, another user could plant one to have us overwrite a file of their
    choosing."""
    flags = {"wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "a+b": os.O_RDWR | os.O_CREAT | os.O_APPEND}[mode]
    try:
        handle = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise BSMamba2Error(f"{path} is a symbolic link, which the model cache never holds: refused to write "
                                "through it (delete it)") from None
        raise
    return os.fdopen(handle, mode)


# -------------------------------------------------------------------------------------------------------- lock

@contextmanager
def _exclusive_lock(path: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on file `path` while the block runs; other processes wait for it. The lock file is
    left in place: deleting it would let a third process lock a new file while a second still holds the old."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = _open_no_link(path, "a+b")
    except OSError as error:
        raise BSMamba2Error(f"cannot write to the model cache {path.parent}: {error.strerror or error} (set "
                            f"{CACHE_ENV} to a writable folder)") from None
    with file:
        if not _try_lock(file):
            log.info(f"model {name}: waiting for another process to finish downloading it")
            _lock(file)
        try:
            yield
        finally:
            _unlock(file)


if os.name == "nt":
    import msvcrt

    def _try_lock(file) -> bool:
        file.seek(0)
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(file) -> None:
        while not _try_lock(file):  # msvcrt cannot wait without a time limit: poll
            time.sleep(0.2)

    def _unlock(file) -> None:
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(file) -> bool:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock(file) -> None:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)

    def _unlock(file) -> None:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
