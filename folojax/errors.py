"""The exceptions folojax raises for bad checkpoints and unsupported models."""


class CheckpointError(ValueError):
    """A checkpoint is missing tensors, has unexpected or misshaped ones, or is truncated."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its features) is not implemented."""
