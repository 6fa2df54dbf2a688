"""Output files written whole or not at all (dtrain/atomic.py)."""

import pytest

from dtrain.atomic import replaced_atomically, write_text_atomic


def test_write_text_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "page.html"
    assert write_text_atomic(path, "old") == path
    write_text_atomic(path, "new é")
    assert path.read_text(encoding="utf-8") == "new é"
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_text_atomic(path, "[1]")
    with pytest.raises(RuntimeError, match="disk full"):
        with replaced_atomically(path) as tmp:
            tmp.write_text("[2, 3")  # half written
            raise RuntimeError("disk full")
    assert path.read_text() == "[1]"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
