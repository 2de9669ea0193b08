"""quantbench: a benchmark and reproducibility suite for low-bit post-training quantization of LLMs."""
__version__ = "0.1.0"
