"""Environment switches: FOLOJAX_* variables that turn a default behaviour off."""

import os

OFF_VALUES = ("0", "false", "no", "off")  # compared case-insensitively, spaces stripped


def switched_off(name: str) -> bool:
    """Whether the environment variable `name` turns its behaviour off (unset: on)."""
    return os.environ.get(name, "1").strip().lower() in OFF_VALUES
