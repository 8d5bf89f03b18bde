from pathlib import Path

import pytest

from training_fixtures import write_tracks


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tracks(root, "train", 4)
    write_tracks(root, "test", 2, first=10)
    return root
