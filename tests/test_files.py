"""bsmamba2.files: atomic writes (complete or absent, with a plain file's permissions) and refusing to overwrite."""
import os
import stat

import pytest

from bsmamba2.errors import BSMamba2Error
from bsmamba2.files import atomic_write, refuse_overwrite, write_text_atomic


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path, umask):
    """A checkpoint written by one teammate stays readable by the others, as any file they save is."""
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "written.txt", "hello")
        (tmp_path / "opened.txt").write_text("hello")
    finally:
        os.umask(previous)
    modes = [stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("written.txt", "opened.txt")]
    assert modes == [0o666 & ~umask] * 2


def test_atomic_write_leaves_nothing_when_it_fails(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    with atomic_write(target) as file:
        file.write(b"first")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as file:
            file.write(b"second, half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"first" and [p.name for p in target.parent.iterdir()] == ["x.bin"]


def test_refuse_overwrite(tmp_path):
    path = tmp_path / "results.json"
    refuse_overwrite(path, force=False)  # nothing there: fine
    path.write_text("{}")
    refuse_overwrite(path, force=True)
    with pytest.raises(BSMamba2Error, match=f"^{path} already exists \\(use --force to overwrite\\)$"):
        refuse_overwrite(path, force=False)
