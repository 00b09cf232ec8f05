"""trimformer: compile trained transformers into faster programs with graph passes."""

__version__ = "0.1.0"
