"""Writing files so that nothing is ever half-written under its final name, nor overwritten unasked."""
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Union

from .errors import BSMamba2Error


def refuse_overwrite(path: Union[str, Path], force: bool) -> None:
    """Stop, naming the file, if `path` exists and `force` (the `--force` option) is not given."""
    if not force and Path(path).exists():
        raise BSMamba2Error(f"{path} already exists (use --force to overwrite)")


def temporary_path(path: Union[str, Path]) -> Path:
    """A fresh hidden name beside `path` for a file being written, renamed to `path` once complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")


@contextmanager
def atomic_write(path: Union[str, Path], mode: str = "wb", **open_options) -> Iterator[IO]:
    """A temporary file beside `path`, renamed to `path` when the block ends, deleted if it raises. The file gets
    the permissions that a plain `open` would give it (0o666 less the umask), so teammates can read checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, mode, **open_options) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as file:
        file.write(text)
