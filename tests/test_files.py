"""bsmamba2.files: atomic writes (complete or absent, with a plain file's permissions), refusing to overwrite, and
names from data kept to plain names inside their folder."""
import os
import stat

import pytest

from bsmamba2.errors import BSMamba2Error
from bsmamba2.files import (atomic_write, is_plain_name, path_inside, plain_name, refuse_overwrite, track_name,
                            write_text_atomic)


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


PLAIN = ["vocals", "no_vocals", "My Song (live)", "Live: 1999", "ab:c", ".hidden", "x..y", "Noël ✓"]
# name: what plain_name makes of it (with the fallback "track")
NOT_PLAIN = {"": "track", ".": "track", "..": "track", "...": "track", ". .": "track", "../x": ".._x",
             "a/b": "a_b", "a\\b": "a_b", "C:x": "C_x", "C:": "C_", "nul\x00": "nul_", "two\nlines": "two_lines"}


def test_plain_names_are_one_name_on_every_system():
    for name in PLAIN:
        assert is_plain_name(name) and plain_name(name, "track") == name, name
    for name, made in NOT_PLAIN.items():
        assert not is_plain_name(name) and plain_name(name, "track") == made and is_plain_name(made), name
    assert not is_plain_name(None) and not is_plain_name(3)


def test_track_names_are_plain():
    names = ["song.flac", "/music/My Song.mp3", "...wav", "..wav", "a\\b.wav", "no extension"]
    assert [track_name(name) for name in names] == ["song", "My Song", "track", "track", "a_b", "no extension"]


def test_a_path_outside_its_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    assert path_inside(out, "song/vocals.wav") == out / "song" / "vocals.wav"
    assert path_inside(out, "a/../vocals.wav") == out / "a" / ".." / "vocals.wav"  # still inside
    for relative in ["../vocals.wav", "song/../../vocals.wav", "/tmp/vocals.wav", ".", ""]:
        with pytest.raises(BSMamba2Error, match=f"^{relative}: refused, it would be written outside the output "
                                                f"folder {out}$"):
            path_inside(out, relative)
