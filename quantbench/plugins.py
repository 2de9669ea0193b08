"""Import the built-in methods, backends and tasks so that they register (``quantbench.registry``)."""
import quantbench.backends  # noqa: F401
import quantbench.methods  # noqa: F401
import quantbench.tasks  # noqa: F401


def load_plugins() -> None:
    """Nothing left to do: importing this module registered everything. Kept as the explicit call sites' verb."""
