"""User-facing errors: each one becomes one line on stderr and an exit code."""

from __future__ import annotations


class OnnxcompError(Exception):
    """Bad input, recipe or arguments: the CLI prints the message and exits 2."""

    exit_code = 2


class GateFailed(OnnxcompError):
    """The compressed model failed the recipe's validation gate: exit 3."""

    exit_code = 3
