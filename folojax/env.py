"""Environment switches: FOLOJAX_* variables that turn a behaviour off (or an opt-in on)."""

import os

OFF_VALUES = ("0", "false", "no", "off")  # compared case-insensitively, spaces stripped
ON_VALUES = ("1", "true", "yes", "on")


def switched_off(name: str) -> bool:
    """Whether the environment variable `name` turns its behaviour off (unset: on)."""
    return os.environ.get(name, "1").strip().lower() in OFF_VALUES


def switched_on(name: str) -> bool:
    """Whether the environment variable `name` turns its (opt-in) behaviour on (unset: off)."""
    return os.environ.get(name, "0").strip().lower() in ON_VALUES
