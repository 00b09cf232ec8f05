"""trimformer: compile trained transformers into faster programs with research-grade graph passes."""

__version__ = "0.1.0"
