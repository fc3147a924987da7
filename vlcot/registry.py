"""A named registry: what a user varies (advantage estimators, policy losses, aggregation
modes, KL estimators, rewards) is registered under a name and chosen in config; config
validation lists the registered names. A user's own entry registers with the same decorator.
Lives in the shared core so every role can hold registries without importing another."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"{self.kind} {name!r} not in {self.names()}")
        return self._items[name]

    def names(self) -> List[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
