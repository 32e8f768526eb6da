"""Atomic writes: a target appears only complete, a failure leaves nothing, temporary names are recognisable."""

from __future__ import annotations

import hashlib

import pytest

from fusionkern.files import atomic_output, sha256_file, write_bytes_atomic, write_text_atomic


def test_atomic_output_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "sub" / "scores.tif"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".scores.") and tmp.suffix == ".tif"
        tmp.write_bytes(b"done")
        assert not target.exists()  # nothing at the target until the block succeeds
    assert target.read_bytes() == b"done"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"done"  # the previous complete file is untouched
    assert not list(target.parent.glob(".*.tmp*"))


def test_write_helpers_and_checksum(tmp_path):
    data = bytes(range(256)) * 1000
    path = write_bytes_atomic(tmp_path / "a.bin", data)
    assert path.read_bytes() == data
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert write_text_atomic(tmp_path / "r.md", "é\n").read_text(encoding="utf-8") == "é\n"
    assert not list(tmp_path.glob(".*.tmp*"))
