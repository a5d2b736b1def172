"""A name -> factory registry, filled by a decorator (as timm's ``register_model``).

The model zoo (:data:`engine.models.MODELS`) and the pruning criteria
(:data:`engine.criteria.CRITERIA`) are each one :class:`Registry`; the scripts list them in
their ``--help`` with :meth:`Registry.help`. Two kinds of entries:

* a plain name (``"resnet20"``): :meth:`Registry.get` returns the registered function;
* a family (``register("timm:<name>", prefix="timm:")``): every name that starts with the
  prefix; :meth:`Registry.get` returns the registered function with the full name bound as its
  first argument (``fn(name, ...)``), so the factory parses the rest (``timm:resnet18``,
  ``curvature-paper-min``). A plain name wins over a family that also matches it.

Example::

    MODELS = Registry("model")

    @MODELS.register("mlp", help="fully connected ReLU network")
    def mlp(in_features=784, hidden=(256, 128), num_classes=10): ...

    MODELS.get("mlp")(in_features=64)
"""
from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional


def lower(name: str) -> str:
    """The default key of a name: stripped, lower case."""
    return name.strip().lower()


@dataclass(frozen=True)
class Entry:
    """One registration: ``name`` as listed, the function, one line of help, and the prefix
    of a family (None for a plain name)."""
    name: str
    fn: Callable
    help: str = ""
    prefix: Optional[str] = None


class Registry:
    """Names of one kind (``"model"``, ``"criterion"``) mapped to their factories.

    ``normalize`` maps a name to its lookup key (default: stripped, lower case); a family's
    factory receives the stripped name as given."""

    def __init__(self, kind: str, normalize: Callable[[str], str] = lower):
        self.kind = kind
        self.normalize = normalize
        self._plain: dict = {}
        self._families: list = []

    def register(self, name: str, help: str = "", *, prefix: Optional[str] = None):
        """Decorator registering ``fn`` under ``name`` (or, with ``prefix``, every name that
        starts with it; ``name`` is then how the family is listed, e.g. ``timm:<name>``).
        Registering a name twice is a ``ValueError``."""
        def add(fn: Callable) -> Callable:
            if prefix is None:
                key = self.normalize(name)
                if key in self._plain:
                    raise ValueError(f"{self.kind} {name!r} is already registered")
                self._plain[key] = Entry(name, fn, help)
            else:
                if any(f.prefix == prefix.lower() for f in self._families):
                    raise ValueError(f"{self.kind} family {prefix!r} is already registered")
                self._families.append(Entry(name, fn, help, prefix.lower()))
            return fn
        return add

    def entry(self, name: str) -> Entry:
        """The entry ``name`` resolves to; ``ValueError`` naming the choices if none."""
        key = self.normalize(name)
        if key in self._plain:
            return self._plain[key]
        low = name.strip().lower()
        family = max((f for f in self._families if low.startswith(f.prefix)),
                     key=lambda f: len(f.prefix), default=None)
        if family is None:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of "
                             f"{', '.join(self.names())}")
        return family

    def get(self, name: str) -> Callable:
        """The factory of ``name`` (a family's with ``name`` bound as first argument)."""
        e = self.entry(name)
        return e.fn if e.prefix is None else functools.partial(e.fn, name.strip())

    def __contains__(self, name: str) -> bool:
        try:
            self.entry(name)
        except ValueError:
            return False
        return True

    def names(self) -> list:
        """Every listed name, in registration order (families as listed, e.g. ``timm:<name>``)."""
        return [e.name for e in self._plain.values()] + [f.name for f in self._families]

    def help(self, indent: int = 2, name_width: int = 18, width: int = 96) -> str:
        """Each entry's name and its help, aligned and wrapped (for a script's ``--help``); a
        name longer than ``name_width`` gets its help on the next lines."""
        lines = []
        pad = " " * (indent + name_width + 2)
        for e in list(self._plain.values()) + self._families:
            head = f"{' ' * indent}{e.name:<{name_width}}  "
            if len(e.name) > name_width:
                lines.append(f"{' ' * indent}{e.name}")
                head = pad
            lines += textwrap.wrap(e.help, width, initial_indent=head,
                                   subsequent_indent=pad) or [head.rstrip()]
        return "\n".join(lines)
