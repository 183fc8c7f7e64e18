"""Turn what users pass as data (tensors, DataLoaders, iterables of batches) into point tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gapcallback.utils.checks import check_point_set

Transform = Callable[[Tensor], Tensor]


def batch_to_tensor(batch: Any, input_key: int | str, name: str) -> Tensor:
    """Pick the input tensor out of a loader batch: a tensor (or numpy array), ``batch[input_key]``
    otherwise."""
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(batch))
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple, Mapping)):
        try:
            item = batch[input_key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError) as err:
            raise TypeError(
                f"Cannot find the input in a batch of `{name}` ({type(batch).__name__}) with "
                f"input_key={input_key!r}; set `input_key=` to its index or key."
            ) from err
        if isinstance(item, (Tensor, np.ndarray)):
            return batch_to_tensor(item, input_key, name)
    raise TypeError(
        f"A batch of `{name}` is a {type(batch).__name__}, not a tensor; set `input_key=` to the "
        "position/key of the input tensor in each batch."
    )


def check_data_source(source: object, name: str, max_points: int | None) -> None:
    """Check at construction that ``source`` can be collected: a tensor, a numpy array, or an
    iterable of batches; an iterable without ``len()`` (a streaming ``IterableDataset``) needs
    ``max_points``, or collecting it would never end."""
    if isinstance(source, (Tensor, np.ndarray)):
        return
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(
            f"`{name}` must be a tensor or numpy array [N, *dims], or a DataLoader/iterable of "
            f"batches, got {type(source).__name__}."
        )
    if max_points is None:
        try:
            len(source)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"`{name}` is an iterable without a length ({type(source).__name__}, e.g. a "
                "streaming IterableDataset): it may never end. Pass `max_points=` to take at "
                "most that many points from it."
            ) from None


def collect_points(
    source: Tensor | Iterable[Any],
    name: str,
    *,
    transform: Transform | None = None,
    input_key: int | str = 0,
    max_points: int | None = None,
) -> Tensor:
    """Materialise ``source`` as one ``[N, *dims]`` CPU tensor in task space.

    Args:
        source: a tensor or numpy array ``[N, *dims]``, or an iterable of batches (e.g. a
            ``DataLoader``); see :func:`check_data_source`.
        name: argument name used in error messages.
        transform: applied to every tensor (batch) before it is stored.
        input_key: index/key of the input tensor in tuple/list/dict batches.
        max_points: stop after this many points (the first ones in iteration order).
    """
    if isinstance(source, np.ndarray):
        source = batch_to_tensor(source, input_key, name)
    if isinstance(source, Tensor):
        chunks = [source]
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        chunks = []
        count = 0
        for batch in source:
            tensor = batch_to_tensor(batch, input_key, name)
            chunks.append(tensor)
            count += tensor.shape[0] if tensor.ndim else 1
            if max_points is not None and count >= max_points:
                break
    else:
        raise TypeError(
            f"`{name}` must be a tensor [N, *dims] or a DataLoader/iterable of batches, got "
            f"{type(source).__name__}."
        )
    if not chunks:
        raise ValueError(f"`{name}` yielded no data; pass a non-empty tensor or DataLoader.")
    out = []
    for chunk in chunks:
        chunk = chunk.detach()
        if transform is not None:
            with torch.no_grad():
                chunk = transform(chunk)
            if not isinstance(chunk, Tensor):
                raise TypeError(f"`transform` must return a tensor, got {type(chunk).__name__}.")
        out.append(chunk.cpu())
    points = torch.cat(out) if len(out) > 1 else out[0]
    if max_points is not None:
        points = points[:max_points]
    if not points.is_floating_point():
        points = points.float()
    return check_point_set(points, name)


def collect_pairs(
    source: Any,
    name: str,
    *,
    input_key: int | str = 0,
    target_key: int | str = 1,
    max_points: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Materialise pairs ``(x, y)`` as two CPU tensors ``[N, *x_dims]``, ``[N, *y_dims]``.

    Args:
        source: a pair of tensors / numpy arrays ``(x, y)`` with the same number of rows, or an
            iterable of batches (a ``DataLoader``) whose batches hold the inputs at
            ``input_key`` and the targets at ``target_key``.
        name: argument name used in error messages.
        input_key, target_key: positions / keys of the inputs and targets in a batch.
        max_points: stop after this many pairs (the first ones in iteration order).
    """
    if (
        isinstance(source, (tuple, list))
        and len(source) == 2
        and all(isinstance(part, (Tensor, np.ndarray)) for part in source)
    ):
        xs = [batch_to_tensor(source[0], 0, f"{name}[0]")]
        ys = [batch_to_tensor(source[1], 0, f"{name}[1]")]
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, Tensor, np.ndarray)):
        xs, ys, count = [], [], 0
        for batch in source:
            if not isinstance(batch, (list, tuple, Mapping)):
                raise TypeError(
                    f"A batch of `{name}` is a {type(batch).__name__}; pairs need batches holding "
                    f"inputs and targets (e.g. (x, y) from a TensorDataset), at `input_key`="
                    f"{input_key!r} and `target_key`={target_key!r}."
                )
            xs.append(batch_to_tensor(batch, input_key, name))
            ys.append(batch_to_tensor(batch, target_key, name))
            if xs[-1].shape[:1] != ys[-1].shape[:1]:
                raise ValueError(
                    f"A batch of `{name}` has {xs[-1].shape[0]} inputs but {ys[-1].shape[0]} "
                    "targets; each input needs its target."
                )
            count += int(xs[-1].shape[0])
            if max_points is not None and count >= max_points:
                break
    else:
        raise TypeError(
            f"`{name}` must be a pair of tensors (x, y) or a DataLoader/iterable of (x, y) "
            f"batches, got {type(source).__name__}."
        )
    if not xs:
        raise ValueError(f"`{name}` yielded no data; pass non-empty (x, y) pairs.")
    x = torch.cat([t.detach().cpu() for t in xs]) if len(xs) > 1 else xs[0].detach().cpu()
    y = torch.cat([t.detach().cpu() for t in ys]) if len(ys) > 1 else ys[0].detach().cpu()
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`{name}` has {x.shape[0]} inputs but {y.shape[0]} targets: pass one target per "
            "input (x and y with the same number of rows)."
        )
    if max_points is not None:
        x, y = x[:max_points], y[:max_points]
    return x, y


def batch_length(batch: Any) -> int | None:
    """The number of rows of a loader batch: of its first tensor with a leading dimension (in a
    tuple, list or dict, searched depth first); ``None`` when it holds none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = batch_length(item)
            if n is not None:
                return n
    return None
