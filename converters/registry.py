"""The one registry shape every extension point uses (converters, emitters, layer types, compression
passes, reference models, import restorers, Caffe layers): a named mapping that refuses to register
a key twice, so two plug-ins can never silently shadow each other.

    PASSES = Registry("compression pass")

    @PASSES.register("prune")
    class PrunePass: ...

    PASSES["prune"]            # -> PrunePass; an unknown key raises RegistryError naming the known ones
"""
from __future__ import annotations

from typing import Callable, Generic, Hashable, Iterator, TypeVar

from .errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[Hashable, T] = {}

    def add(self, key: Hashable, value: T) -> T:
        """Register `value` under `key`; a key registered already is a RegistryError."""
        if key in self._items:
            raise RegistryError(f"{self.kind} {key!r} is registered twice ({self._items[key]!r} and {value!r})")
        self._items[key] = value
        return value

    def register(self, *keys: Hashable) -> Callable[[T], T]:
        """Decorator form of `add`, for one key or several."""

        def deco(value: T) -> T:
            for key in keys:
                self.add(key, value)
            return value

        return deco

    def __getitem__(self, key: Hashable) -> T:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(map(str, self._items))) or "none"
            raise RegistryError(f"unknown {self.kind} {key!r}; available: {known}") from None

    def get(self, key: Hashable, default: T | None = None) -> T | None:
        return self._items.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self):
        return self._items.keys()

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._items)} entries)"
