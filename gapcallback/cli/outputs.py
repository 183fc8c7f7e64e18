"""Writing the command line's results, with no partial outputs left behind.

:func:`staged_outputs` collects a command's files in a staging folder and moves them into the
output folder only when the command succeeds; :func:`write_json` and :func:`write_csv` write
files that strict readers accept; :func:`format_table` lays rows out for a terminal.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "staged_outputs", "write_csv", "write_json"]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Stage a command's output files, and move them into ``out_dir`` only on success.

    Yields a fresh, empty staging folder ``.{name}.tmp-XXXX`` next to ``out_dir`` (in its parent,
    or in its closest existing ancestor when the parent does not exist yet; inside ``out_dir``
    itself when that folder exists and its parent cannot be written), on the same file system,
    so each move is an atomic ``os.replace``.

    * Normal exit: ``out_dir`` is created if needed (with its parents) and every staged file
      (sub-folders included) is moved into it, one by one: other files already in ``out_dir`` are
      kept, same-named ones replaced. The staging folder is then removed.
    * Exception: the staging folder is removed and the exception re-raised; ``out_dir`` is left
      as it was (not created when it did not exist).

    Raises:
        NotADirectoryError: ``out_dir`` exists and is not a folder (checked before yielding).
        IsADirectoryError: a staged file would replace a folder of ``out_dir`` (or a staged
            folder a file); checked before anything is moved, so nothing is.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder; pass a folder path")
    prefix = f".{out.name or 'out'}.tmp-"
    try:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=_nearest_existing(out.parent)))
    except PermissionError:
        if not out.is_dir():
            raise
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
    try:
        yield staging
        _move_all(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_all(staging: Path, out: Path) -> None:
    """Move the tree under ``staging`` into ``out``, file by file (conflicts checked first)."""
    entries = sorted(staging.rglob("*"))
    folders = [p for p in entries if p.is_dir() and not p.is_symlink()]
    files = [p for p in entries if not (p.is_dir() and not p.is_symlink())]
    for folder in folders:
        target = out / folder.relative_to(staging)
        if target.exists() and not target.is_dir():
            raise IsADirectoryError(
                f"{target}: a file is in the way of the output folder of that name; remove it"
            )
    for file in files:
        target = out / file.relative_to(staging)
        if target.is_dir() and not target.is_symlink():
            raise IsADirectoryError(
                f"{target}: a folder is in the way of the output file of that name; remove it"
            )
    out.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (out / folder.relative_to(staging)).mkdir(parents=True, exist_ok=True)
    for file in files:
        os.replace(file, out / file.relative_to(staging))


def _jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` and arrays / scalars / paths as JSON types.

    Mappings become dicts (keys as ``json`` turns them into strings), sequences lists; NumPy and
    torch scalars and arrays (anything with ``tolist``) their Python values; paths strings.
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(obj.tolist())
    if isinstance(obj, numbers.Real):
        return _jsonable(float(obj))
    if isinstance(obj, (set, frozenset)):
        return [_jsonable(v) for v in obj]
    raise TypeError(f"write_json: cannot write a {type(obj).__name__} as JSON")


def _write_text(path: Path, text: str, newline: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file next to it, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as strict JSON (indent 2, keys in insertion order, UTF-8, final newline).

    NaN, ``inf`` and ``-inf`` floats are written as ``null`` (Python's ``json`` would write the
    non-standard ``NaN`` / ``Infinity``), so any strict JSON reader accepts the file; a reader
    must treat ``null`` as "no value". NumPy and torch scalars and arrays are written as numbers
    and lists, paths as strings, tuples and sets as lists. The file is replaced atomically.

    Raises:
        TypeError: ``obj`` holds something else (a custom object).
    """
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False)
    _write_text(Path(path), text + "\n")


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _csv_cell(value: Any) -> str:
    """A value as CSV text: ``None`` empty, NaN ``nan``, floats in round-trip precision."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # a NumPy / torch scalar
    if isinstance(value, float):
        return repr(value)  # 'nan', 'inf', '-inf' as numpy and pandas read them
    return str(value)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as a CSV file with a header line.

    Columns are the union of the rows' keys in first-seen order; a row missing a column, or
    holding ``None``, leaves the cell empty. Floats are written in full (round-trip) precision,
    NaN as ``nan`` and infinities as ``inf`` / ``-inf``, which ``pandas.read_csv``,
    ``numpy.genfromtxt`` and ``float()`` read back. No rows: an empty file. UTF-8, replaced
    atomically.
    """
    columns = _columns(rows)
    sink = io.StringIO()
    writer = csv.writer(sink, lineterminator="\n")
    if columns:
        writer.writerow([str(c) for c in columns])
        writer.writerows([_csv_cell(row.get(c)) for c in columns] for row in rows)
    _write_text(Path(path), sink.getvalue(), newline="")


def _table_cell(value: Any) -> str:
    """A value as table text: floats with 6 significant digits, ``None`` empty, one line."""
    if value is None:
        return ""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return format(float(value), ".6g")
    return " ".join(str(value).split()) if "\n" in str(value) else str(value)


def _is_number(value: Any) -> bool:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """``rows`` as a plain aligned text table, for printing to a terminal.

    Args:
        rows: one mapping per row.
        columns: the columns, in order; by default the union of the rows' keys in first-seen
            order. A row missing a column, or holding ``None``, leaves the cell empty.

    Returns:
        A header line, a line of dashes, then one line per row (no final newline; ``""`` when
        there are no columns). Cells are separated by two spaces; floats are written with
        ``format(v, ".6g")``; columns holding only numbers are right-aligned, others left.
    """
    columns = list(columns) if columns is not None else _columns(rows)
    if not columns:
        return ""
    cells = [[_table_cell(row.get(c)) for c in columns] for row in rows]
    header = [str(c) for c in columns]
    widths = [max([len(header[j])] + [len(r[j]) for r in cells]) for j in range(len(columns))]
    numeric = [
        all(_is_number(row.get(c)) for row in rows if row.get(c) is not None)
        and any(row.get(c) is not None for row in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)
