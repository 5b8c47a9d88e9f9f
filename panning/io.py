"""Atomic file writes: the one way the project writes a result file.

A reader (a resumed sweep, another process, a user) sees either the old file or the complete new
one, never half a file: content goes to a temporary sibling unique to this process and thread,
which then replaces the target in one ``os.replace``.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json", "write_text"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temporary name keeps ``path``'s suffix (``masks.pt`` -> ``masks.<pid>.<tid>.tmp.pt``), so
    writers that choose a format by suffix (matplotlib, SB3's zip) do the right thing.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")
