"""The one registry of pluggable things: formats, quant schemes, exporters, runtimes and bundle layouts.

Everything pluggable reaches edgekit through Python entry points in the group ``edgekit``. Each
entry point names a ``register(registry)`` function; edgekit's own built-ins are listed in its
``pyproject.toml`` exactly as a third-party package lists its own::

    [project.entry-points.edgekit]
    my-runtime = "my_package.edgekit_plugin:register"

    # my_package/edgekit_plugin.py
    def register(reg):
        reg.add("runtime", "my-runtime", MY_RUNTIME)

The registry loads the entry points on first use (importing a plugin must stay cheap: no torch, no
runtime library at import), so importing this module loads nothing. Every consumer -- CLI choices,
recipe validation, device profiles, doctor, reports -- asks the registry instead of listing names.

Kinds are open-ended strings; edgekit itself uses :data:`KINDS`. A name registered twice for one kind
is an error naming both plugins, so a plugin cannot silently replace a built-in.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edgekit.errors import ConfigError, EdgekitError, one_line

log = logging.getLogger(__name__)

GROUP = "edgekit"
FORMAT, SCHEME, EXPORTER, RUNTIME, LAYOUT = "format", "scheme", "exporter", "runtime", "layout"
KINDS = (FORMAT, SCHEME, EXPORTER, RUNTIME, LAYOUT)


class PluginError(EdgekitError):
    """An entry point in group ``edgekit`` could not be loaded or registered something invalid."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    obj: Any
    origin: str  # the entry point ("edgekit.runtimes.llamacpp:register") or "<code>" for direct calls


class Registry:
    """Named objects by kind, filled from entry points on first use."""

    def __init__(self, group: str = GROUP) -> None:
        self.group = group
        self._entries: dict[tuple[str, str], Entry] = {}
        self._loaded = False
        self._loading = False
        self._lock = threading.RLock()
        self._origin = "<code>"

    # ------------------------------------------------------------------ registering

    def add(self, kind: str, name: str, obj: Any) -> Any:
        """Register ``obj`` as ``name`` of ``kind``; returns ``obj`` (usable as a decorator helper)."""
        if not isinstance(kind, str) or not kind or not isinstance(name, str) or not name:
            raise PluginError(f"{self._origin} registered kind={kind!r} name={name!r}; both must be non-empty "
                              f"strings (edgekit uses the kinds {', '.join(KINDS)})")
        key = (kind, name)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.obj is not obj:
                raise PluginError(f"{kind} {name!r} is registered twice: by {old.origin} and by {self._origin}; "
                                  f"uninstall one of the two packages or rename the plugin's {kind}")
            self._entries[key] = Entry(kind, name, obj, self._origin)
        return obj

    def load(self) -> None:
        """Import every entry point of the group once (idempotent, thread-safe)."""
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                for ep in _entry_points(self.group):
                    self._load_one(ep)
                self._loaded = True
            finally:
                self._loading = False

    def _load_one(self, ep: importlib.metadata.EntryPoint) -> None:
        where = f"{ep.value} (entry point {ep.name!r} of {_dist_name(ep)})"
        try:
            fn = ep.load()
        except Exception as e:
            raise PluginError(f"the edgekit plugin {where} failed to import: {one_line(e, with_type=True)}; "
                              f"fix or uninstall that package (`pip uninstall {_dist_name(ep)}`)") from e
        if not callable(fn):
            raise PluginError(f"the edgekit plugin {where} is not a function; an entry point in group "
                              f"{self.group!r} must name a `register(registry)` function")
        prev, self._origin = self._origin, ep.value
        try:
            fn(self)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(f"the edgekit plugin {where} failed while registering: "
                              f"{one_line(e, with_type=True)}; fix or uninstall that package") from e
        finally:
            self._origin = prev

    # ------------------------------------------------------------------ looking up

    def names(self, kind: str) -> list[str]:
        """Names registered for ``kind``, in registration order (built-ins first, as pyproject lists them)."""
        self.load()
        return [n for (k, n) in self._entries if k == kind]

    def items(self, kind: str) -> dict[str, Any]:
        self.load()
        return {n: e.obj for (k, n), e in self._entries.items() if k == kind}

    def get(self, kind: str, name: str, *, error: type[EdgekitError] = ConfigError, what: str | None = None) -> Any:
        """The object registered as ``name``; else an ``error`` naming the choices and how to add one."""
        self.load()
        entry = self._entries.get((kind, name))
        if entry is None:
            choices = self.names(kind)
            raise error(f"unknown {what or kind} {name!r}: choose one of {', '.join(choices) or '(none registered)'}"
                        f" (a plugin package adds more through the {self.group!r} entry-point group)")
        return entry.obj

    def origin(self, kind: str, name: str) -> str:
        self.load()
        return self._entries[(kind, name)].origin

    def find(self, kind: str, pred: Callable[[Any], bool]) -> list[Any]:
        return [o for o in self.items(kind).values() if pred(o)]


def _entry_points(group: str) -> Iterable[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=group)
    if not eps:
        log.warning("no entry points in group %r: edgekit looks installed without its metadata; "
                    "reinstall it (`pip install -e .` in a checkout)", group)
    # One entry per (distribution, name): an editable install seen twice on sys.path must not register twice.
    seen: set[tuple[str, str]] = set()
    for ep in eps:
        key = (_dist_name(ep), ep.name)
        if key not in seen:
            seen.add(key)
            yield ep


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "an unknown package"


REGISTRY = Registry()


def names(kind: str) -> list[str]:
    return REGISTRY.names(kind)


def items(kind: str) -> dict[str, Any]:
    return REGISTRY.items(kind)


def get(kind: str, name: str, **kw: Any) -> Any:
    return REGISTRY.get(kind, name, **kw)
