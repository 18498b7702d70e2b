"""LAFQ: layer-adaptive, Fisher-guided quantization of diffusion models."""
__version__ = "0.2.0"
