"""Name -> object registries for methods, backends and tasks. Entries register themselves on import."""
from __future__ import annotations

from quantbench.errors import ConfigError


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
        if self is METHODS and "+" in name:
            from quantbench.pipeline import compose

            return compose(name)
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]


METHODS = Registry("method")
BACKENDS = Registry("backend")
TASKS = Registry("task")


def load_plugins() -> None:
    """Import the built-in methods, backends and tasks so they register."""
    import quantbench.backends  # noqa: F401
    import quantbench.methods  # noqa: F401
    import quantbench.tasks  # noqa: F401
