"""keras-progdist: progressive distillation of diffusion models in Keras 3."""

__version__ = "0.1.0"
