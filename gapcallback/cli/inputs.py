"""Loading the command line's input files into point tensors, with errors a user can act on.

Every problem is an :class:`InputError`: one line that names the file, the option it came from
(``--reference``, ``--generated`` ...) and the fix, so the command line can print it as it is,
without a traceback.

Points are a tensor ``[N, *dims]`` on the CPU: ``N`` points (rows), each of shape ``dims``
(``[N, D]`` for feature vectors, ``[N, C, H, W]`` for images). Files are read safely: NumPy files
without pickle, PyTorch files with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "InputError",
    "check_same_features",
    "load_callable",
    "load_points",
]

#: Suffixes of the array files :func:`load_points` reads (compared case-insensitively).
SUPPORTED_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".pt", ".pth", ".safetensors")

#: Suffixes of the images read from a folder (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: How many row indices / names an error message lists before "...".
_SHOWN = 5

#: Pillow modes of single-channel images with more than 8 bits (values 0 .. 65535).
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

#: Pillow modes read as one channel (grey); every other mode is colour (RGB).
_GREY_MODES = ("1", "L", "LA", "La", "F", *_WIDE_GREY_MODES)


class InputError(ValueError):
    """A user's input cannot be used: one line naming the file, the option and the fix."""


def _one_line(text: str) -> str:
    """``text`` with its line breaks (and the spaces around them) folded into single spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


def _error(option: str, where: object, problem: str, fix: str = "") -> InputError:
    """An :class:`InputError` ``"{option} {where}: {problem}; {fix}"`` on one line."""
    message = f"{option} {where}: {problem}" + (f"; {fix}" if fix else "")
    return InputError(_one_line(message))


def _listed(names: Sequence[object], limit: int = _SHOWN) -> str:
    """``"a, b, c"``, cut after ``limit`` names with ``", ... (N in all)"``."""
    shown = ", ".join(str(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _per_point(shape: Sequence[int]) -> str:
    """``[N, 3]`` for per-point shape ``(3,)``: how a shape of points is written in messages."""
    return "[" + ", ".join(["N", *(str(d) for d in shape)]) + "]"


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[Path, str | None]:
    """``(path, name)`` of ``"path"`` or ``"path:name"``.

    The whole ``spec`` is a path when it exists. Otherwise it is split on its last colon, only
    when the part before it is an existing file (so ``C:\\data\\x.npy`` or ``odd:name.npy`` stay
    paths); else it is returned whole, to be reported missing.
    """
    whole = Path(spec).expanduser()
    if whole.exists() or ":" not in spec:
        return whole, None
    head, _, name = spec.rpartition(":")
    path = Path(head).expanduser()
    if head and path.is_file():
        return path, name or None  # "file.npz:" (an empty name) picks nothing
    return whole, None


def load_points(spec: str, *, option: str) -> Tensor:
    """Load the points of one input file or image folder.

    Args:
        spec: a path, optionally followed by ``:name`` to pick one array of an ``.npz``, a ``.pt``
            / ``.pth`` dict or a ``.safetensors`` file (``feats.npz:train``). The whole ``spec``
            is taken as a path when it exists; otherwise it is split on its last colon when the
            part before it is an existing file.
        option: the command line option the file came from (``"--reference"``), for messages.

    Formats (suffixes compared case-insensitively):

    * ``.npy``: one array, read with ``np.load(allow_pickle=False)``.
    * ``.npz``: the array ``:name``, or the only one.
    * ``.pt`` / ``.pth``: read with ``torch.load(map_location="cpu", weights_only=True)`` only,
      never unpickling other objects: a tensor, or a dict / list / tuple holding tensors (the
      entry ``:name`` (a list index for a list), or the only tensor).
    * ``.safetensors``: the tensor ``:name``, or the only one; needs the ``safetensors`` package.
    * a folder of images (``.png``, ``.jpg``, ``.jpeg``; sub-folders are not searched), read with
      Pillow in file name order (plain string order) into ``[N, C, H, W]`` float32 in ``[0, 1]``:
      ``C = 1`` when every image is grey (modes ``L``, ``1``, ``LA``, 16-bit ``I;16`` ...),
      ``C = 3`` (RGB, grey images repeated) when any is colour (``RGB``, ``RGBA``, ``P``,
      ``CMYK`` ...). Alpha is dropped; 16-bit grey is scaled by 65535, 8-bit by 255. All images
      must have the same size.

    Values: integer dtypes become float32 (values kept, no rescaling), float16 / bfloat16 / 8-bit
    floats become float32, float32 and float64 are kept; bool, complex, string and object arrays
    are refused, as are 0-d and 1-d arrays (reshape to ``[N, 1]`` for one feature per point), no
    rows, no features per point, and rows holding NaN or Inf.

    Returns:
        A tensor ``[N, *dims]`` on the CPU, float32 or float64, ``N >= 1``, every value finite.

    Raises:
        InputError: one line naming the file, ``option`` and the fix.
    """
    if not spec.strip():
        raise _error(option, repr(spec), "no file given", "pass the path of a file or folder")
    path, name = _split_spec(spec)
    where = path if name is None else f"{path}:{name}"
    if not path.exists():
        raise _error(
            option,
            path,
            "no such file or folder",
            f"check the path (relative paths start from {Path.cwd()})",
        )
    if path.is_dir():
        points = _load_image_folder(path, option)
    elif not path.is_file():
        raise _error(option, path, "is not a regular file or folder", "pass an array file")
    else:
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            points = _load_numpy(path, name, option)
        elif suffix in (".pt", ".pth"):
            points = _load_torch(path, name, option)
        elif suffix == ".safetensors":
            points = _load_safetensors(path, name, option)
        elif suffix in IMAGE_SUFFIXES:
            raise _error(
                option,
                path,
                "is a single image",
                f"pass the folder holding the images ({path.parent}) instead",
            )
        else:
            raise _error(
                option,
                path,
                f"unsupported file type {path.suffix or '(no suffix)'!r}",
                f"pass one of {', '.join(SUPPORTED_SUFFIXES)}, or a folder of "
                f"{'/'.join(IMAGE_SUFFIXES)} images",
            )
    return _checked(points, where, option)


def _no_name(path: Path, name: str | None, option: str, what: str) -> None:
    """Refuse a ``:name`` given for a file holding one array (``what`` says which)."""
    if name is not None:
        raise _error(
            option,
            f"{path}:{name}",
            f"{what} holds a single array, there is nothing to pick by name",
            f"drop ':{name}' and pass {path}",
        )


def _load_numpy(path: Path, name: str | None, option: str) -> Tensor:
    """The array of a ``.npy``, or the array ``name`` (or the only one) of a ``.npz``."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:  # a pickle (or an object array): refused, never unpickled
        raise _error(
            option,
            path,
            "holds pickled Python objects, not loaded for safety",
            f"save a numeric array instead, e.g. np.save({path.name!r}, np.asarray(x, "
            "dtype=np.float32))",
        ) from err
    except Exception as err:  # truncated or not a NumPy file
        raise _error(
            option,
            path,
            f"cannot be read as a NumPy file ({type(err).__name__}: {err})",
            "check that the file is complete and was written by np.save / np.savez",
        ) from err
    if isinstance(loaded, np.ndarray):
        _no_name(path, name, option, "a .npy file")
        return _from_numpy(loaded, path, option)
    with loaded:  # an NpzFile
        names = list(loaded.files)
        if name is None:
            if not names:
                raise _error(
                    option, path, "holds no arrays", "save the points with np.savez(path, x=x)"
                )
            if len(names) > 1:
                raise _error(
                    option,
                    path,
                    f"holds {len(names)} arrays ({_listed(names)}) and none was picked",
                    f"pick one with {option} {path}:NAME, e.g. {path}:{names[0]}",
                )
            name = names[0]
        elif name not in names:
            raise _error(
                option,
                f"{path}:{name}",
                f"no array named {name!r} in the file (it holds {_listed(names)})",
                f"pick one of those, e.g. {path}:{names[0]}" if names else "",
            )
        try:
            array = loaded[name]
        except ValueError as err:  # an object array inside the archive
            raise _error(
                option,
                f"{path}:{name}",
                "holds pickled Python objects (an object array), not loaded for safety",
                "save a numeric array instead, e.g. np.savez(path, x=np.asarray(x, "
                "dtype=np.float32))",
            ) from err
        except Exception as err:
            raise _error(
                option,
                f"{path}:{name}",
                f"cannot be read ({type(err).__name__}: {err})",
                "check that the file is complete and was written by np.savez",
            ) from err
    return _from_numpy(array, f"{path}:{name}", option)


def _from_numpy(array: np.ndarray, where: object, option: str) -> Tensor:
    """``array`` as a tensor: integers to float32, float16 to float32, float32 / float64 kept."""
    kind = array.dtype.kind
    if kind in "iu":
        target = np.dtype(np.float32)
    elif kind == "f":
        size = array.dtype.itemsize
        target = np.dtype(np.float32 if size < 4 else np.float64 if size > 8 else array.dtype)
    else:
        described = {
            "b": "bool",
            "c": "complex",
            "U": "string",
            "S": "bytes",
            "O": "object",
            "V": "structured",
            "M": "datetime",
            "m": "timedelta",
        }.get(kind, "non-numeric")
        raise _error(
            option,
            where,
            f"holds {described} values (dtype {array.dtype}), points need real numbers",
            "save the points as a float array, e.g. np.save(path, x.astype(np.float32))",
        )
    target = target.newbyteorder("=")
    array = array.astype(target, order="C", copy=False)  # keeps 0-d arrays 0-d
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _load_torch(path: Path, name: str | None, option: str) -> Tensor:
    """The tensor of a ``.pt`` / ``.pth`` file, read with ``weights_only=True`` only."""
    resave = (
        "re-save the points as a plain tensor, torch.save(torch.as_tensor(x), path), "
        "or as a NumPy array, np.save(path, x)"
    )
    try:
        with warnings.catch_warnings():  # a bare pickle: the refusal below says all there is
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        message = str(err)
        if "Weights only load failed" in message or type(err).__name__ == "UnpicklingError":
            found = re.search(r"\bGLOBAL ([\w.]+)", message)  # the class / function refused
            holds = (
                f"holds Python objects other than tensors ({found.group(1)})"
                if found
                else "is not a plain tensor file written by torch.save (or is corrupt)"
            )
            raise _error(
                option,
                path,
                f"{holds}; it is not loaded, for safety (only weights_only=True loading is used)",
                resave,
            ) from err
        raise _error(
            option,
            path,
            f"cannot be read as a PyTorch file ({type(err).__name__}: {message})",
            "check that the file is complete and was written by torch.save",
        ) from err
    if isinstance(loaded, Tensor):
        _no_name(path, name, option, "the file")
        return loaded
    if isinstance(loaded, Mapping):
        return _pick(loaded, path, name, option)
    if isinstance(loaded, (list, tuple)):
        return _pick({str(i): v for i, v in enumerate(loaded)}, path, name, option, indexed=True)
    raise _error(
        option,
        path,
        f"holds a {type(loaded).__name__}, not a tensor or a dict / list of tensors",
        resave,
    )


def _pick(
    entries: Mapping[Any, object],
    path: Path,
    name: str | None,
    option: str,
    *,
    indexed: bool = False,
) -> Tensor:
    """The tensor ``entries[name]``, or the only tensor among ``entries``' values.

    ``indexed``: the entries are a list's items, keyed ``"0"``, ``"1"`` ... (messages say so).
    """
    keys = {str(k): k for k in entries}
    tensor_keys = [k for k, v in keys.items() if isinstance(entries[v], Tensor)]
    what = "list" if indexed else "file"
    if name is None:
        if len(tensor_keys) == 1:
            return entries[keys[tensor_keys[0]]]  # type: ignore[return-value]
        if not tensor_keys:
            raise _error(
                option,
                path,
                f"the {what} holds no tensors",
                "save the points as a tensor, torch.save(torch.as_tensor(x), path)",
            )
        names = "indices" if indexed else "keys"
        raise _error(
            option,
            path,
            f"the {what} holds {len(tensor_keys)} tensors ({names} {_listed(tensor_keys)}) and "
            "none was picked",
            f"pick one with {option} {path}:NAME, e.g. {path}:{tensor_keys[0]}",
        )
    if name not in keys:
        listed = _listed(tensor_keys) if tensor_keys else "none"
        raise _error(
            option,
            f"{path}:{name}",
            f"no entry {name!r} in the {what} (its tensors: {listed})",
            f"pick one of those, e.g. {path}:{tensor_keys[0]}" if tensor_keys else "",
        )
    value = entries[keys[name]]
    if not isinstance(value, Tensor):
        raise _error(
            option,
            f"{path}:{name}",
            f"is a {type(value).__name__}, not a tensor",
            f"pick a tensor entry ({_listed(tensor_keys)})" if tensor_keys else "",
        )
    return value


def _load_safetensors(path: Path, name: str | None, option: str) -> Tensor:
    """The tensor ``name`` (or the only one) of a ``.safetensors`` file."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise _error(
            option,
            path,
            "reading .safetensors files needs the safetensors package, which is not installed",
            'install it with pip install safetensors (or pip install "gapcallback[io]")',
        ) from err
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:
        raise _error(
            option,
            path,
            f"cannot be read as a safetensors file ({type(err).__name__}: {err})",
            "check that the file is complete and was written by safetensors.torch.save_file",
        ) from err
    return _pick(tensors, path, name, option)


def _load_image_folder(path: Path, option: str) -> Tensor:
    """The images of folder ``path`` as ``[N, C, H, W]`` float32 in ``[0, 1]``."""
    try:
        from PIL import Image
    except ImportError as err:
        raise _error(
            option,
            path,
            "reading a folder of images needs Pillow, which is not installed",
            "install it with pip install pillow",
        ) from err
    files = sorted(
        (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )
    if not files:
        raise _error(
            option,
            path,
            f"the folder holds no images ({', '.join(IMAGE_SUFFIXES)}; sub-folders are not "
            "searched)",
            "put the images directly in it, or pass an array file "
            f"({', '.join(SUPPORTED_SUFFIXES)})",
        )

    # First pass, headers only: modes and sizes.
    modes = []
    size = None
    for file in files:
        with _open_image(Image, file, option) as image:
            if size is None:
                size = image.size
            elif image.size != size:
                raise _error(
                    option,
                    file,
                    f"image of size {image.size[0]}x{image.size[1]} (width x height), unlike the "
                    f"{size[0]}x{size[1]} of {files[0].name}",
                    "resize or crop the images of the folder to one size",
                )
            modes.append(image.mode)
    assert size is not None
    colour = any(mode not in _GREY_MODES for mode in modes)
    width, height = size
    out = torch.empty(len(files), 3 if colour else 1, height, width, dtype=torch.float32)

    # Second pass: pixels.
    for i, file in enumerate(files):
        with _open_image(Image, file, option) as image:
            try:
                if image.mode in _WIDE_GREY_MODES:
                    pixels = np.asarray(image, dtype=np.float32) / 65535.0
                elif image.mode in _GREY_MODES:
                    pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
                else:
                    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            except Exception as err:  # truncated data shows only when the pixels are decoded
                raise _error(
                    option,
                    file,
                    f"cannot decode the image ({type(err).__name__}: {err})",
                    "re-save it, or remove it from the folder",
                ) from err
        chw = torch.from_numpy(pixels)
        chw = chw.permute(2, 0, 1) if chw.ndim == 3 else chw.unsqueeze(0)
        out[i] = chw  # a grey image in a colour folder: its channel repeated (broadcast)
    return out


def _open_image(image_module: Any, file: Path, option: str) -> Any:
    """``PIL.Image.open(file)``, its failure as an :class:`InputError` naming the file."""
    try:
        return image_module.open(file)
    except Exception as err:
        raise _error(
            option,
            file,
            f"cannot be read as an image ({type(err).__name__}: {err})",
            "re-save it, or remove it from the folder",
        ) from err


def _as_float(x: Tensor, where: object, option: str) -> Tensor:
    """``x`` dense on the CPU, detached: integers and narrow floats to float32, wider kept."""
    if x.layout != torch.strided:
        x = x.to_dense()
    x = x.detach().cpu()
    if x.is_complex() or x.dtype == torch.bool or x.is_quantized:
        raise _error(
            option,
            where,
            f"holds values of dtype {x.dtype}, points need real numbers",
            "save the points as a float tensor, e.g. torch.save(x.float(), path)",
        )
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)  # integers (values kept), float16, bfloat16, float8


def _checked(x: Tensor, where: object, option: str) -> Tensor:
    """``x`` as float points ``[N, *dims]``: shape and finiteness checked."""
    x = _as_float(x, where, option)
    if x.ndim == 0:
        raise _error(
            option,
            where,
            "holds a single number (shape ()), not points",
            "save an array of shape [N, D] (N points, D features each)",
        )
    if x.ndim == 1:
        raise _error(
            option,
            where,
            f"holds a 1-D array of shape ({x.shape[0]},), points need shape [N, D]",
            "for one feature per point reshape it to [N, 1], e.g. np.save(path, x.reshape(-1, 1))",
        )
    if x.shape[0] == 0:
        raise _error(
            option,
            where,
            f"holds no points (shape {tuple(x.shape)})",
            "pass a file with at least one row",
        )
    if x[0].numel() == 0:
        raise _error(
            option,
            where,
            f"its points have no features (shape {tuple(x.shape)})",
            "save an array of shape [N, D] with D >= 1",
        )
    bad = _non_finite_rows(x)
    if bad.numel():
        rows = _listed(bad.tolist())
        raise _error(
            option,
            where,
            f"{bad.numel()} of its {x.shape[0]} rows hold NaN or Inf (rows {rows})",
            "drop or fix those rows, e.g. x = x[np.isfinite(x).reshape(len(x), -1).all(axis=1)]",
        )
    return x


def _non_finite_rows(x: Tensor, block_elements: int = 1 << 24) -> Tensor:
    """Indices (int64, ascending) of the rows of ``x`` ``[N, *dims]`` holding a NaN or an Inf.

    Checked in blocks of about ``block_elements`` values, so the mask stays small.
    """
    flat = x.reshape(x.shape[0], -1)
    step = max(1, block_elements // flat.shape[1])
    bad = [
        torch.nonzero(~torch.isfinite(flat[i : i + step]).all(dim=1)).flatten() + i
        for i in range(0, flat.shape[0], step)
    ]
    return torch.cat(bad)


def check_same_features(points: dict[str, Tensor]) -> None:
    """Check that every point set has the same per-point shape.

    Args:
        points: label -> points ``[N_i, *dims_i]``; labels name the source, as in
            ``{"--reference r.npy": ref, "--generated g.npy": gen}``.

    Raises:
        InputError: when some ``dims_i`` differs from the first one's, naming both labels and
            both shapes.
    """
    items = list(points.items())
    if not items:
        return
    first_label, first = items[0]
    for label, x in items[1:]:
        if tuple(x.shape[1:]) != tuple(first.shape[1:]):
            raise InputError(
                _one_line(
                    f"{label} has points of shape {_per_point(x.shape[1:])} but {first_label} "
                    f"has {_per_point(first.shape[1:])}; both must hold the same features per "
                    "point (the same embedding, or images of one size and channel count)"
                )
            )


# --------------------------------------------------------------------------------------------
# Callables
# --------------------------------------------------------------------------------------------


def load_callable(spec: str, *, option: str) -> Callable[..., Any]:
    """Import the function (or any callable) named by ``spec``.

    Args:
        spec: ``"package.module:function"`` (an importable module) or
            ``"path/to/file.py:function"`` (a Python file, imported from its path, with its own
            folder on ``sys.path`` while it is imported). The part after the last colon may be
            dotted (``module:Class.method``).
        option: the command line option the spec came from (``"--model"``), for messages.

    Returns:
        The callable.

    Raises:
        InputError: no colon, the module or file cannot be imported (the exception's type and
            message included), the attribute is missing (listing some public names), or it is
            not callable.
    """
    form = "expected MODULE:FUNCTION, e.g. mypackage.models:build or path/to/models.py:build"
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise _error(option, spec, "not a callable spec", form)
    if (
        target.lower().endswith(".py")
        or "/" in target
        or (os.sep in target)
        or (os.altsep and os.altsep in target)
    ):
        module = _import_file(Path(target).expanduser(), spec, option)
    else:
        module = _import_module(target, spec, option)

    obj: Any = module
    walked = [target]
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = _public_names(obj)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            owner = ".".join(walked) if len(walked) > 1 else f"module {target}"
            raise _error(
                option,
                spec,
                f"{owner} has no attribute {part!r}",
                f"{hint}its public names include {_listed(names, 10) or 'none'}",
            )
        obj = getattr(obj, part)
        walked.append(part)
    if not callable(obj):
        raise _error(
            option,
            spec,
            f"{attribute} is not callable (it is of type {type(obj).__name__})",
            "name a function (or a class, or another callable) defined in the module",
        )
    return obj


def _import_module(name: str, spec: str, option: str) -> Any:
    """``importlib.import_module(name)``, its failure as an :class:`InputError`."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing == name or name.startswith(missing + ".") or not missing:
            raise _error(
                option,
                spec,
                f"no module named {missing or name!r} (ModuleNotFoundError: {err})",
                "check the module name, that its folder is on PYTHONPATH, or run from the "
                "project folder (or pass path/to/file.py:FUNCTION)",
            ) from err
        raise _error(
            option,
            spec,
            f"importing module {name!r} failed (ModuleNotFoundError: {err})",
            f"install {missing!r}, or check that the module imports on its own "
            f"(python -c 'import {name}')",
        ) from err
    except (Exception, SystemExit) as err:
        raise _error(
            option,
            spec,
            f"importing module {name!r} failed ({type(err).__name__}: {err})",
            f"check the module name and that it imports on its own (python -c 'import {name}'), "
            "that its folder is on PYTHONPATH, or run from the project folder",
        ) from err


def _import_file(path: Path, spec: str, option: str) -> Any:
    """The module of Python file ``path``, imported under a name of its own.

    The module is registered in ``sys.modules`` (classes and dataclasses defined in it need
    that) under ``gapcallback_user_<stem>_<hash of the path>``, so it never shadows a module of
    the same name. Its folder is first on ``sys.path`` while it runs, as for ``python file.py``.
    """
    if not path.is_file():
        raise _error(
            option,
            spec,
            f"no such file {str(path)!r}",
            f"check the path (relative paths start from {Path.cwd()})",
        )
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode(), usedforsecurity=False).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"gapcallback_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise _error(option, spec, f"{path} cannot be imported as a Python file", "name a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    folder = str(resolved.parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:
        sys.modules.pop(name, None)
        raise _error(
            option,
            spec,
            f"importing {path} failed ({type(err).__name__}: {err})",
            f"fix the file so that it runs on its own (python {path})",
        ) from err
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _public_names(obj: Any) -> list[str]:
    """The public names of a module or class, callables first (then alphabetical)."""
    if isinstance(obj, types.ModuleType):
        names = getattr(obj, "__all__", None) or [n for n in vars(obj) if not n.startswith("_")]
        names = [n for n in names if not isinstance(getattr(obj, n, None), types.ModuleType)]
    else:
        names = [n for n in dir(obj) if not n.startswith("_")]
    return sorted(names, key=lambda n: (not callable(getattr(obj, n, None)), n))
