"""quantbench: a benchmark and reproducibility suite for low-bit post-training quantization of LLMs.

The Python API (:mod:`quantbench.api`, imported on first use so ``import quantbench`` stays light):
``quantize(model, method, scheme, *, tokenizer=None, calibration=None, **options) -> QuantizedModel``,
``QuantizedModel.realize(backend="fake_quant")``, ``QuantizedModel.save_pretrained(dir)`` (compressed-tensors),
``evaluate(model, tasks, ...)``, ``load_results(path)``, ``from_record(record)``.
"""
__version__ = "0.1.0"
__all__ = ["ConfigError", "QuantizedModel", "QuantbenchError", "UnavailableError", "evaluate", "from_record",
           "load_results", "quantize"]

from quantbench.errors import ConfigError, QuantbenchError, UnavailableError  # noqa: E402


def __getattr__(name: str):
    if name in ("quantize", "evaluate", "load_results", "from_record", "QuantizedModel", "api"):
        import importlib

        api = importlib.import_module("quantbench.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'quantbench' has no attribute {name!r}")
