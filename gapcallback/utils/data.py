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
