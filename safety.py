"""Guards that keep the user's files safe, checked by every driver before any work starts.

- An output never equals or lies inside an input file or folder, and no input lies inside a
  folder a run may delete (paths compared after resolving symlinks): `check_apart`.
- Two inputs never map to one output name: `output_names` refuses, naming both.
- An output folder is a folder that can be written (or can be made): `check_writable`.
Each raises UnsafePathError (a ValueError) whose message names the paths and the problem; the
command-line drivers (predict_script.py, measure_script.py, instances.py) print it as one line
and exit with status 2 (EXIT_UNSAFE) before reading anything; the configuration's paths are
checked when it loads (config.ConfigError).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

EXIT_UNSAFE = 2  # every driver's exit status for a refused path


class UnsafePathError(ValueError):
    """A path that would put the user's files at risk, or that cannot be written."""


def resolved(path: Path) -> Path:
    """The absolute path with every symlink resolved (the path need not exist; a symlink loop
    stays as it is, for the reader to report)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies inside it (both resolved first)."""
    path, folder = resolved(path), resolved(folder)
    return path == folder or folder in path.parents


Named = Iterable[tuple[str, Path]]


def check_apart(outputs: Named, inputs: Named, deletable: Named = ()) -> None:
    """outputs / inputs / deletable: (a name for the message, e.g. a setting or 'output
    file', path) pairs. Refuses an output that is an input or lies inside one, and an input
    that lies inside a folder the run may delete."""
    outputs, inputs = list(outputs), list(inputs)
    for out_name, out in outputs:
        for in_name, source in inputs:
            if inside(out, source):
                same_file = resolved(out) == resolved(source) and Path(source).is_file()
                relation = "is" if same_file else "lies inside"
                raise UnsafePathError(
                    f"{out_name} {out} {relation} {in_name} {source}: outputs are written "
                    "outside the inputs, which are only ever read"
                )
    for del_name, folder in deletable:
        for in_name, source in inputs:
            if inside(source, folder):
                raise UnsafePathError(
                    f"{in_name} {source} lies inside {del_name} {folder}, which the run may "
                    "replace: keep the inputs outside it"
                )


def output_names(paths: Iterable[Path], name_of: Callable[[Path], str]) -> dict[Path, str]:
    """Each input's output name (name_of); refuses two inputs that would share one, naming
    both, so that no output overwrites another."""
    names: dict[str, Path] = {}
    for path in paths:
        name = name_of(path)
        if name in names and resolved(names[name]) != resolved(path):
            raise UnsafePathError(
                f"inputs {names[name]} and {path} would both be written as '{name}': rename "
                "one, or segment them into different output folders"
            )
        names[name] = path
    return {path: name for name, path in names.items()}


def check_outputs(
    output_dir: Path,
    names: dict[Path, str],
    suffixes: Iterable[str],
    run_files: Iterable[str] = (),
    other_inputs: Named = (),
) -> None:
    """A driver's outputs, output_dir/<name><suffix> per input and output_dir/<run file>, none
    an input (the inputs of `names`, `other_inputs`) nor inside an input folder, and
    output_dir writable; UnsafePathError otherwise."""
    outputs = [("--output-dir", Path(output_dir))]
    outputs += [
        ("output file", output_dir / f"{n}{end}") for n in names.values() for end in suffixes
    ]
    outputs += [("output file", output_dir / name) for name in run_files]
    check_apart(outputs, [("input", path) for path in names] + list(other_inputs))
    check_writable(output_dir, "--output-dir")


def check_writable(folder: Path, what: str) -> None:
    """Refuse `folder` unless it is a writable folder, or could be made as one: its nearest
    existing ancestor is a writable folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UnsafePathError(f"{what} {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UnsafePathError(f"{what} {folder} cannot be made: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UnsafePathError(f"{what} {folder} cannot be written (no permission on {existing})")


def interruptible(main: Callable[[], int]) -> int:
    """A command-line driver's main(), with Ctrl-C as one line and status 130 (what it wrote so
    far is complete: every output is atomic)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: the outputs written so far are complete; run again", file=sys.stderr)
        return 130
