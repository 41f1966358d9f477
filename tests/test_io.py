"""Atomic output files."""

from __future__ import annotations

import os

import pytest

from poise.errors import PoiseError
from poise.io import atomic_write_text, read_jsonl


def test_atomic_writes_get_umask_permissions_not_mkstemp_0600(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left behind


def test_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path) -> None:
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(PoiseError, match=r"x.jsonl:3: expected a JSON object"):
        list(read_jsonl(tmp_path / "x.jsonl"))
