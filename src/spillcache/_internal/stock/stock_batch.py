"""One batch of ``batch_intermediates``: a ``dict`` over the cache.

The stock class's batch is a plain ``dict[str, IntermediateValue]``; code written for
it checks ``isinstance(batch, dict)``, copies it (``dict(b)``, ``{**b}``, ``b.copy()``),
compares it, walks it. ``BatchView`` is a dict whose keys are the batch's keys in the
cache and whose values are IntermediateValue trees built when read from what the cache
holds (a spilled tensor is read from disk to build one); setting or deleting a key is
``cache.update`` or ``cache.delete``. The trees are read-only (``ShownValue``,
``ShownList``, ``ShownDict``): changing one would change nothing in the cache, so it
raises an error naming the call to make; a copy of one is a plain tree.

A stock batch gives the same object each time a key is read (``b[k] is b[k]``; a copy
of the batch holds the very values, so ``b == b.copy()`` compares tensors by identity).
A tree built here is therefore given again, without reading, to every later read of the
same key of the same batch while it is still in use and the batch unchanged: ``_Trees``
keeps it weakly, under the batch's generation (bumped by every update and delete of the
batch).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import ItemsView, Iterable, Iterator, KeysView, ValuesView
from typing import Any, Protocol
from weakref import WeakKeyDictionary, WeakValueDictionary

from ..tree import IntermediateValue, unflatten


class ViewedCache(Protocol):
    """What the views use of the ``ViewedCache`` they show (typed here rather
    than imported: spillcache.cache imports these views)."""

    _core: Any  # runtime.core.CacheCore

    def __len__(self) -> int: ...
    def update(self, batch_index: int, values: dict[str, Any]) -> None: ...
    def delete(self, batch_index: int, consumed_names: Any = None) -> None: ...
    def append(self, values: dict[str, Any]) -> None: ...


__all__ = ["BatchView", "ShownDict", "ShownList", "ShownValue"]


def _refuse(what: str) -> AttributeError:
    return AttributeError(
        f"{what}: batch_intermediates shows what the cache holds, built when read, so "
        "changing it would change nothing; store the new value with "
        "cache.update(batch_index, {key: value}) (or batch_intermediates[i][key] = value), "
        "or pin a batch with cache.pin_memory(batch_index)"
    )


@dataclasses.dataclass(eq=False)
class ShownValue(IntermediateValue):
    """An IntermediateValue built by ``batch_intermediates``: read-only, equal to an
    IntermediateValue of the same value and device. A copy of it (``copy``, ``pickle``)
    is a plain IntermediateValue: changing a copy changes nothing in the cache."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_shown", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_shown", False):
            raise _refuse(f"setting .{name} of a value in batch_intermediates")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise _refuse(f"deleting .{name} of a value in batch_intermediates")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IntermediateValue):
            return NotImplemented
        return (self.value, self.device) == (other.value, other.device)

    __hash__ = None  # as IntermediateValue's

    def __repr__(self) -> str:
        return f"IntermediateValue(value={self.value!r}, device={self.device!r})"

    def __reduce__(self) -> tuple:
        return IntermediateValue, (self.value, self.device)


class ShownList(list):
    """A list node of a shown tree: read-only; a copy of it is a plain list."""

    def _changed(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse("changing a list in batch_intermediates")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _changed
    append = extend = insert = pop = remove = clear = sort = reverse = _changed

    def __reduce__(self) -> tuple:
        return list, (list(self),)


class ShownDict(dict):
    """A dict node of a shown tree: read-only; a copy of it is a plain dict."""

    def _changed(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse("changing a dict in batch_intermediates")

    __setitem__ = __delitem__ = __ior__ = _changed
    pop = popitem = clear = update = setdefault = _changed

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


def _shown(node: Any) -> ShownValue:
    """A built node of a stored value (its children already shown) as the stock tree
    holds it."""
    if type(node) is list:
        node = ShownList(node)
    elif type(node) is dict:
        node = ShownDict(node)
    return ShownValue(node, None)


class _Trees:
    """The trees in use, of every cache's batches: per cache, (batch index, key,
    generation) -> tree, held weakly (a tree no longer used is forgotten)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_cache: WeakKeyDictionary[Any, WeakValueDictionary] = WeakKeyDictionary()

    def find(self, cache: ViewedCache, labels: list[tuple]) -> dict[tuple, ShownValue]:
        with self._lock:
            trees = self._by_cache.get(cache, {})
            found = {label: trees.get(label) for label in labels}
        return {label: tree for label, tree in found.items() if tree is not None}

    def keep(self, cache: ViewedCache, built: dict[tuple, ShownValue]) -> dict:
        """``built`` kept; for a label another thread kept first, that thread's tree."""
        with self._lock:
            trees = self._by_cache.setdefault(cache, WeakValueDictionary())
            return {label: trees.setdefault(label, tree) for label, tree in built.items()}


_TREES = _Trees()


class _Placeholder:
    """What a batch's own dict storage holds (see BatchView)."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return f"<{self._text}>"


_NOT_READ = _Placeholder("value not read: batch[key] reads it from the cache")
_NO_KEY = _Placeholder("no key: the batch is empty")


class BatchView(dict):
    """One batch of a cache as the stock class's ``dict[str, IntermediateValue]``: a
    ``dict`` that reads and writes the cache.

    Keys, ``in`` and ``len`` read the cache's index (no I/O); a value is built when
    read (``b[key]``, ``get``, ``items()``, ``values()``, ``copy()``, ``dict(b)``), which
    loads its tensors from wherever they are (a spilled one from disk, as ``fetch``
    would), unless the same tree is still in use (see the module). Setting a key is
    ``cache.update``, deleting one ``cache.delete``.

    The values live in the cache, so every dict method is overridden. C code may read a
    dict's own storage instead of calling its methods. CPython copies a dict's storage
    directly only when ``__iter__`` is dict's own, so ``dict(b)``, ``{**b}``,
    ``d.update(b)``, ``b | d``, ``d | b`` and ``f(**b)`` go through ``keys()`` and
    ``b[key]`` here; ``==``, ``!=``, ``repr``, ``copy`` and pickling, which would read
    the storage, are overridden to give what they give for the stock class's dict. What
    C code still reads is whether the storage is empty: json's encoder writes ``{}`` for
    an empty one, and ``b | d`` copies nothing from it, without asking the batch. The
    storage holds the batch's keys, in order, each with a placeholder, brought up to
    date by every call on the batch; but a batch may gain keys through the cache
    (``cache.update``) with no call on it, so an empty batch's storage is never empty:
    it holds one placeholder key, and those readers ask the batch itself.
    """

    __slots__ = ("_cache", "_index", "_lock")

    def __init__(self, cache: ViewedCache, index: int) -> None:
        self._cache = cache
        self._index = index
        self._lock = threading.Lock()  # over the storage
        self._keys()

    def _keys(self) -> list[str]:
        """The batch's keys in the cache, the storage brought up to date with them
        (never empty meanwhile either: another thread may be reading it)."""
        with self._lock:
            keys = self._cache._core.keys(self._index)
            if list(dict.keys(self)) != (keys or [_NO_KEY]):
                dict.__setitem__(self, _NO_KEY, _NOT_READ)
                for stale in list(dict.keys(self)):
                    if stale is not _NO_KEY:
                        dict.__delitem__(self, stale)
                if keys:
                    dict.update(self, dict.fromkeys(keys, _NOT_READ))
                    dict.__delitem__(self, _NO_KEY)
            return keys

    def _read(self, keys: list[str]) -> dict[str, ShownValue]:
        """The trees of those of ``keys`` the batch has: those in use, the rest read
        from the cache in one call."""
        core = self._cache._core
        # Read before the values: a tree is never labelled newer than its value.
        generation = core.generation(self._index)
        labels = {key: (self._index, key, generation) for key in keys}
        found = _TREES.find(self._cache, list(labels.values()))
        missing = [key for key, label in labels.items() if label not in found]
        stored = core.fetch_stored(self._index, missing) if missing else {}
        built = {}
        for key, (entry, tensors) in stored.items():
            devices = [leaf.onload_device for leaf in entry.leaves]
            leaves = [ShownValue(t, device) for t, device in zip(tensors, devices, strict=True)]
            built[labels[key]] = unflatten(entry.spec, leaves, entry.opaques, wrap=_shown)
        found.update(_TREES.keep(self._cache, built))
        return {key: found[label] for key, label in labels.items() if label in found}

    # reading

    def __getitem__(self, key: str) -> IntermediateValue:
        shown = self._read([key])
        if key not in shown:
            raise KeyError(key)
        return shown[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: object) -> bool:
        hash(key)  # an unhashable key raises, as in a dict
        return key in self._keys()

    def keys(self) -> KeysView:
        return _Keys(self)

    def values(self) -> ValuesView:
        return _Values(self)

    def items(self) -> ItemsView:
        return _Items(self)

    def copy(self) -> dict[str, IntermediateValue]:
        """A plain dict of the batch's values, read in one call."""
        return self._read(self._keys())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict):
            return NotImplemented
        if len(self) != len(other):
            return False
        return self.copy() == (other.copy() if isinstance(other, BatchView) else other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # as dict's

    def __repr__(self) -> str:
        return repr(self.copy())

    def __reduce__(self) -> tuple:
        """``copy.copy``, ``copy.deepcopy`` and ``pickle`` make a plain dict of the
        values, as they do of the stock class's batch."""
        return dict, (self.copy(),)

    @classmethod
    def fromkeys(cls, keys: Iterable[Any], value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)  # a batch exists only in a cache

    # writing through to the cache

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        try:
            self._cache.delete(self._index, [key])
        finally:
            self._keys()

    def pop(self, key: str, *default: Any) -> Any:
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = self[key]
        del self[key]
        return value

    def popitem(self) -> tuple[str, Any]:
        keys = self._keys()
        if not keys:
            raise KeyError("popitem(): dictionary is empty")
        return keys[-1], self.pop(keys[-1])

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def update(self, other: Any = (), /, **values: Any) -> None:
        """One ``cache.update`` for all of them."""
        try:
            self._cache.update(self._index, dict(other, **values))
        finally:
            self._keys()

    def __ior__(self, other: Any) -> BatchView:
        self.update(other)
        return self

    def clear(self) -> None:
        try:
            self._cache.delete(self._index)
        finally:
            self._keys()


class _Keys(KeysView):
    """``batch.keys()``: live, as a dict's view is."""

    __slots__ = ()

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._mapping)

    def __repr__(self) -> str:
        return f"dict_keys({list(self)!r})"


class _Values(ValuesView):
    """``batch.values()``: live; each value read when reached."""

    __slots__ = ()

    def __reversed__(self) -> Iterator[Any]:
        return (self._mapping[key] for key in reversed(self._mapping))

    def __repr__(self) -> str:
        return f"dict_values({list(self)!r})"


class _Items(ItemsView):
    """``batch.items()``: live; each value read when reached."""

    __slots__ = ()

    def __reversed__(self) -> Iterator[tuple[str, Any]]:
        return ((key, self._mapping[key]) for key in reversed(self._mapping))

    def __repr__(self) -> str:
        return f"dict_items({list(self)!r})"
