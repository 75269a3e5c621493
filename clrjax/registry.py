"""One registry per concept (methods, encoders, datasets, evaluators).

A registry maps a name to an *entry*: an object that owns that name's
constructor, defaults and metadata. Built-in entries are listed as
``name -> "module.path:ATTRIBUTE"`` and imported on first use, so listing one
costs one line and importing the registry imports no entry module (which also
keeps the package free of import cycles). Entries defined outside clrjax are
added at run time with :meth:`Registry.register`, or named in a config by
their module path (``--config.method=my_pkg.my_method`` imports ``my_pkg.my_method``
and takes its ``ENTRY``-named attribute), as big_vision chooses models by
module path.

Every error names the registry's kind and the known names, so validation
messages come from here and nowhere keeps a second list of names.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Dict, Iterator, Mapping, Tuple


class UnknownNameError(ValueError):
    """A name is not in a registry; the message lists the known names.

    ``fix`` is the second half of the message alone ("use one of ...") for
    callers that phrase the first half themselves (config validation).
    """

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


class Registry:
    """Names -> entries of one kind.

    Args:
      kind: what the entries are ("method", "encoder", "dataset", "evaluator").
      builtins: ``name -> "module.path:ATTRIBUTE"`` of the entries shipped with clrjax.
      attribute: the attribute a user module names its entry by (for module-path names).
    """

    def __init__(self, kind: str, builtins: Mapping[str, str], attribute: str):
        self.kind = kind
        self.attribute = attribute
        self._paths: Dict[str, str] = dict(builtins)
        self._entries: Dict[str, Any] = {}
        self._by_module_path: Dict[str, Any] = {}  # entries named by module path: usable, not listed

    def register(self, entry: Any, name: str | None = None) -> Any:
        """Adds ``entry`` under ``name`` (default ``entry.name``); returns it, so it can decorate."""
        name = name or entry.name
        if name in self._paths or name in self._entries:
            raise ValueError(f"a {self.kind} called {name!r} is already registered; choose another name.")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Removes a run-time registration (tests register throwaway entries)."""
        self._entries.pop(name, None)

    def names(self) -> Tuple[str, ...]:
        """Built-in names in their listed order, then run-time registrations."""
        return tuple(self._paths) + tuple(n for n in self._entries if n not in self._paths)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self._paths or name in self._entries or self._is_module_path(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: Any) -> Any:
        """The entry called ``name``; :class:`UnknownNameError` naming the known ones."""
        if isinstance(name, str):
            if name in self._entries:
                return self._entries[name]
            if name in self._paths:
                module, _, attribute = self._paths[name].partition(":")
                entry = getattr(importlib.import_module(module), attribute)
                self._entries[name] = entry
                return entry
            if name in self._by_module_path:
                return self._by_module_path[name]
            if self._is_module_path(name):
                return self._from_module(name)
        raise self._unknown(name)

    def fix_for(self, name: Any) -> str:
        """'use one of <known names> (did you mean ...?), or the module path of ...'."""
        close = difflib.get_close_matches(str(name), list(self.names()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"use one of {', '.join(self.names())}{hint}, "
                f"or the module path of a module that defines {self.attribute}")

    def _unknown(self, name: Any, detail: str = "") -> UnknownNameError:
        fix = self.fix_for(name) + detail
        return UnknownNameError(f"unknown {self.kind} {name!r}; {fix}", fix)

    @staticmethod
    def _is_module_path(name: str) -> bool:
        return "." in name and all(part.isidentifier() for part in name.split("."))

    def _from_module(self, path: str) -> Any:
        try:
            module = importlib.import_module(path)
        except ImportError as err:
            raise self._unknown(path, f" (importing {path!r} failed: {err})") from None
        entry = getattr(module, self.attribute, None)
        if entry is None:
            fix = f"a {self.kind} module must define {self.attribute} (see docs/ADDING_A_METHOD.md)"
            raise UnknownNameError(f"module {path!r} defines no {self.attribute}; {fix}", fix)
        self._by_module_path[path] = entry
        return entry
