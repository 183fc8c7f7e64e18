r"""Reference files: prepare once, reuse everywhere (``.gapref``).

A reference file is an ``.npz`` archive (a zip of ``.npy`` arrays, read with
``allow_pickle=False``: no code runs on loading) holding

* ``reference``: the reference points ``[m, *dims]`` as measured;
* ``train``: the training points ``[n, *dims]`` (absent when saved without them; then
  ``gap/memorized_fraction`` cannot be computed from the file);
* ``metadata``: one JSON string: ``format`` (``"gapcallback-reference"``),
  ``format_version`` (:data:`FORMAT_VERSION`), the writing library's version, ``data_hash`` and
  ``reference_hash`` (SHA-256 of the reference and training points, and of the reference points
  alone: :func:`~gapcallback.evaluation.prepared.data_hash`) and the
  :meth:`~gapcallback.evaluation.prepared.PreparedReference.summary`: ``p``, the symmetry's
  name, the fitted law (:meth:`GapLaw.state_dict`, with its uncertainty), ``id/data`` with its
  standard error, the memorization line, what failed and the options.

:func:`load_reference` checks the format version, recomputes the hash (a file whose points were
changed is refused) and, when given, compares the data and options asked for with the file's.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gapcallback.evaluation.prepared import (
    PreparedReference,
    data_hash,
    symmetry_name,
)
from gapcallback.symmetry.base import Symmetry

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUFFIX",
    "library_version",
    "load_reference",
    "save_reference",
]

FORMAT = "gapcallback-reference"
FORMAT_VERSION = 1
"""Version of the file layout; a file of another version is refused with a clear error."""
SUFFIX = ".gapref"


def library_version() -> str:
    """The installed gapcallback's version (``"unknown"`` for an uninstalled source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gapcallback")
    except PackageNotFoundError:  # pragma: no cover - a source tree without installation
        return "unknown"


def save_reference(
    prepared: PreparedReference, path: str | os.PathLike[str], *, include_train: bool = True
) -> Path:
    """Write ``prepared`` to ``path`` (conventionally ``*.gapref``), atomically.

    The file is written under a temporary name next to ``path`` and renamed at the end, so an
    interrupted write leaves no partial file. ``include_train=False`` leaves the training points
    out (a smaller file; ``gap/memorized_fraction`` then needs them again).

    Returns:
        the path written.
    """
    if not isinstance(prepared, PreparedReference):
        raise TypeError(
            f"`prepared` must be a PreparedReference (gc.prepare_reference), got "
            f"{type(prepared).__name__}."
        )
    path = Path(path)
    reference = _storable(prepared.reference)
    train = _storable(prepared.train) if prepared.train is not None else None
    summary = prepared.summary()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "data_hash": data_hash(reference, train),
        "reference_hash": data_hash(reference),
        "has_train_points": bool(include_train and train is not None),
        "summary": summary,
    }
    arrays: dict[str, np.ndarray] = {
        "reference": reference.numpy(),
        "metadata": np.array(json.dumps(metadata, allow_nan=True)),
    }
    if include_train and train is not None:
        arrays["train"] = train.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_reference(
    path: str | os.PathLike[str],
    *,
    symmetry: Symmetry | None = None,
    reference: Tensor | None = None,
    train: Tensor | None = None,
    **options: Any,
) -> PreparedReference:
    """Read a reference file written by :func:`save_reference` (or ``gapcallback reference``).

    Args:
        path: the file.
        symmetry: the symmetry object, when the file was prepared with one (the file holds its
            name only); compared with the file's.
        reference, train: optional data to check the file against: their hash must equal the
            hash of the points the file was built from.
        **options: options to check against the file's (``p``, ``dimension_method``,
            ``law_options``, ``seed`` ...); a difference is a ``ValueError`` naming it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a reference file, another format version, points whose hash does not
            match (the file was changed, or ``reference``/``train`` are other data), options
            that differ.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No reference file at {str(path)!r}.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(
            f"{str(path)!r} is not a gapcallback reference file (it cannot be read as one: "
            f"{err}); write one with `gapcallback reference` or gc.save_reference."
        ) from None
    metadata = _metadata(arrays, path)
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has reference-file format version {version} (written by gapcallback "
            f"{metadata.get('library_version', '?')}); this gapcallback {library_version()} "
            f"reads version {FORMAT_VERSION}. Rebuild it with this version: gapcallback "
            "reference --reference R --train T --out FILE."
        )
    if "reference" not in arrays:
        raise ValueError(f"{str(path)!r} holds no `reference` array; it is not complete.")
    ref = torch.from_numpy(np.ascontiguousarray(arrays["reference"]))
    tr = torch.from_numpy(np.ascontiguousarray(arrays["train"])) if "train" in arrays else None
    if metadata.get("has_train_points") and tr is None:
        raise ValueError(f"{str(path)!r} should hold the training points but has none.")
    changed = data_hash(ref) != metadata.get("reference_hash") or (
        tr is not None and data_hash(ref, tr) != metadata.get("data_hash")
    )
    if changed:
        raise ValueError(
            f"{str(path)!r}: its points do not match the hash recorded when it was written (the "
            "file was changed or damaged); rebuild it with `gapcallback reference`."
        )
    _check_given_data(path, metadata, ref, tr, reference, train)
    summary = metadata["summary"]
    if summary.get("symmetry") != symmetry_name(symmetry):
        raise ValueError(
            f"{str(path)!r} was prepared with symmetry={summary.get('symmetry')!r}, but "
            f"symmetry={symmetry_name(symmetry)!r} is given; pass the same symmetry object "
            "(load_reference(path, symmetry=...)) or rebuild the file."
        )
    prepared = PreparedReference.from_summary(ref, tr, summary, symmetry)
    if options:
        prepared.check_options(repr(str(path)), **options)
    return prepared


def _metadata(arrays: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(str(arrays["metadata"][()]))
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"{str(path)!r} is not a gapcallback reference file (no readable metadata); write "
            "one with `gapcallback reference` or gc.save_reference."
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a gapcallback reference file (format "
            f"{metadata.get('format') if isinstance(metadata, dict) else None!r}); write one "
            "with `gapcallback reference` or gc.save_reference."
        )
    return metadata


def _check_given_data(
    path: Path,
    metadata: dict[str, Any],
    ref: Tensor,
    tr: Tensor | None,
    reference: Tensor | None,
    train: Tensor | None,
) -> None:
    """Compare data the caller holds with the file's points (by hash)."""
    if reference is not None and data_hash(_storable(reference)) != metadata.get("reference_hash"):
        raise ValueError(
            f"`reference` does not match the reference points of {str(path)!r} (their hashes "
            f"differ: {tuple(reference.shape)} {reference.dtype} given, {tuple(ref.shape)} "
            f"{ref.dtype} in the file); rebuild the file from this data or pass the data it "
            "was built from."
        )
    if train is not None:
        full = data_hash(ref, _storable(train))
        if full != metadata.get("data_hash"):
            raise ValueError(
                f"`train` does not match the training set {str(path)!r} was built from (their "
                "hashes differ); rebuild the file from this data or pass the data it was built "
                "from."
            )


def _storable(points: Tensor) -> Tensor:
    """The points as stored: CPU, contiguous, a dtype numpy holds (bfloat16 -> float32)."""
    points = points.detach().cpu().contiguous()
    if points.dtype not in (torch.float16, torch.float32, torch.float64):
        points = points.to(torch.float32)
    return points
