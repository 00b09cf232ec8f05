"""One family of errors. A message says what went wrong, where, and what to do next."""


class TrimformerError(Exception):
    """A user-facing error: the CLI prints `Error: <message>` and exits 1."""


class RecipeError(TrimformerError):
    """A recipe (YAML or CLI flags) that cannot be validated."""


class CheckpointError(TrimformerError):
    """A checkpoint that cannot be loaded."""


class PassError(TrimformerError):
    """A pass that cannot apply, or whose result failed verification."""


class VerificationError(TrimformerError):
    """An exported program whose outputs disagree with the PyTorch program."""
