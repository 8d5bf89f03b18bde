"""Writing files so that nothing is ever half-written under its final name, nor overwritten unasked, nor outside
its folder: names that come from data (a checkpoint's stems, an upload's name) are plain names."""
import os
import secrets
import unicodedata
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


def plain_name(name: str, fallback: str) -> str:
    """`name` made a plain name (see `is_plain_name`): "_" for each path separator (/ and \\), control character
    and drive colon ("C:x" is a path on Windows); `fallback` for a name of only dots and spaces ("..")."""
    name = "".join("_" if char in "/\\" or unicodedata.category(char) == "Cc" else char for char in name)
    if name[1:2] == ":":
        name = name[0] + "_" + name[2:]
    return name if name.strip(". ") else fallback


def is_plain_name(name) -> bool:
    """Whether `name` names one file or folder inside a folder, on every system: a string that `plain_name`
    leaves as it is."""
    return isinstance(name, str) and name != "" and plain_name(name, fallback="") == name


def track_name(file_name: Union[str, Path]) -> str:
    """A track's name in output paths (the {track} of --filename, the folder in the web page's zip): the file's
    name without its extension, as a plain name ("track" for `...wav`, whose name would be "..")."""
    return plain_name(Path(file_name).stem, fallback="track")


def path_inside(folder: Union[str, Path], relative: Union[str, Path]) -> Path:
    """`folder / relative`, checked to name something inside `folder`: the last guard, where a file is about to be
    written, against a name that climbs out (".."), an absolute path or a drive."""
    path = Path(folder) / relative
    if Path(os.path.abspath(folder)) not in Path(os.path.abspath(path)).parents:
        raise BSMamba2Error(f"{relative}: refused, it would be written outside the output folder {folder}")
    return path
