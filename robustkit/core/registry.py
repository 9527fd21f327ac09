"""One generic registry, used for models, attacks and datasets.

Names are lower-case strings; model names may carry a weights tag after a dot
(``"small_cnn.cifar10_partial"``). Lookups of unknown names raise :class:`UnknownNameError`
listing close matches, because a typo should cost a user seconds, not a search through the docs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from robustkit.core.errors import UnknownNameError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """A registered factory plus free-form metadata shown by ``robustkit list``."""

    name: str
    factory: Callable[..., T]
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name -> factory map with close-match errors."""

    def __init__(self, kind: str, *, before_lookup: Callable[[], object] | None = None) -> None:
        """``before_lookup`` runs before every lookup (get, ``in``, iteration, names): the model and
        attack registries import the configured plug-ins there, lazily, so a broken plug-in is a
        one-line error of the command that looks a name up, never an import error of robustkit."""
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._before_lookup = before_lookup

    def _load(self) -> None:
        if self._before_lookup is not None:
            self._before_lookup()

    def register(
        self, name: str, factory: Callable[..., T], description: str = "", **meta: Any
    ) -> Callable[..., T]:
        """Register ``factory`` under ``name``; re-registering a name is a bug, so it raises."""
        key = name.lower()
        if key in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[key] = Entry(key, factory, description, dict(meta))
        return factory

    def decorator(self, name: str | None = None, description: str = "", **meta: Any):
        """``@REG.decorator()`` form of :meth:`register` (name defaults to the function name)."""

        def wrap(fn: Callable[..., T]) -> Callable[..., T]:
            doc = description or (fn.__doc__ or "").strip().splitlines()[0:1]
            text = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return self.register(name or fn.__name__, fn, text, **meta)

        return wrap

    def get(self, name: str) -> Entry[T]:
        """Return the entry for ``name`` or raise with close matches."""
        self._load()
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._load()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load()
        return sorted(self._entries)
