"""Name -> object registries for methods, backends and tasks. Entries register themselves on import
(:func:`quantbench.plugins.load_plugins` imports the built-in ones); compositions such as ``gptq+normtweak`` are
resolved by :func:`quantbench.pipeline.resolve`, not here."""
from __future__ import annotations

from quantbench.errors import ConfigError
from quantbench.options import did_you_mean


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def deco(obj):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = obj
            if isinstance(obj, type):
                obj.name = name
            return obj

        return deco

    def get(self, name: str):  # noqa: D102 - a clear error instead of KeyError/None
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(name, self)}; known: {', '.join(sorted(self))}")
        return self[name]


METHODS = Registry("method")
BACKENDS = Registry("backend")
TASKS = Registry("task")
