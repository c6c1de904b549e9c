"""Atomic file output: write to a temporary sibling, then rename over the target.

A killed process leaves either the old file or the new one, never a half-written one. The
temporaries are named ".spineseg.<name>.<pid>.tmp<suffixes>" (TEMPORARY), so that a rerun
deletes the project's own leftovers, and nothing else, by that exact pattern.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = ".spineseg."
TEMPORARY = re.compile(re.escape(PREFIX) + r".+\.\d+\.tmp(\.[A-Za-z0-9]+)*")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffixes, so writers pick the same format);
    rename it to `path` when the block succeeds, delete it when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PREFIX}{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folders: Iterable[Path]) -> list[Path]:
    """Delete the temporaries a killed run left directly in `folders` (not below them): only
    files whose whole name matches TEMPORARY. Returns what was deleted."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).iterdir():
            if path.is_file() and not path.is_symlink() and TEMPORARY.fullmatch(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
