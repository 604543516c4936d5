"""Value types shared with llm-compressor's cache API.

``IntermediateValue`` is accepted wherever the stock cache accepts it (a
``batch_intermediates`` list passed to the constructor); ``OverrideEqMode`` behaves
as documented: inside it, ``tensor == tensor`` compares identity and returns one bool.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["IntermediateValue", "OverrideEqMode", "is_intermediate_value"]


@dataclass
class IntermediateValue:
    """An offloaded value and the device to onload it to.

    :param value: an offloaded tensor, a primitive, or a nested value (possibly made
        of further IntermediateValues)
    :param device: for a tensor, the device to onload it to; otherwise None
    """

    value: torch.Tensor | IntermediateValue | Any
    device: torch.device | None


def is_intermediate_value(node: Any) -> bool:
    """Whether ``node`` is an IntermediateValue: spillcache's, or llm-compressor's own
    (a dataclass of that name with the same two fields), as the stock class's
    ``_offload_value`` makes them."""
    if isinstance(node, IntermediateValue):
        return True
    cls = type(node)
    return (
        cls.__name__ == "IntermediateValue"
        and dataclasses.is_dataclass(cls)
        and [f.name for f in dataclasses.fields(cls)] == ["value", "device"]
    )


class OverrideEqMode(TorchDispatchMode):
    """Make ``torch.eq`` on two tensors an identity check returning a 0-d bool tensor.

    Lets tensors be looked up in lists and sets by identity (``x in values``) without
    the "truth value of a tensor with more than one element is ambiguous" error.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is torch.ops.aten.eq.Tensor:
            return torch.tensor(args[0] is args[1])
        return func(*args, **kwargs)
