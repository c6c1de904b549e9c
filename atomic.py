"""Atomic file output: write to a temporary sibling, then rename over the target.

A killed process leaves either the old file or the new one, never a half-written one; the
temporaries are named ".<name>.<pid>.tmp<suffixes>" so that a rerun can delete leftovers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffixes, so writers pick the same format);
    rename it to `path` when the block succeeds, delete it when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
