"""Exceptions that carry a message an operator can act on.

Library code raises these and never exits; only ``cli.main`` maps them to exit codes.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class for every error ftps-gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration (or a file it names) is unusable.

    Carries every problem found in one pass, each already formatted as
    ``FILE: key.path: problem (got VALUE)``, so the operator fixes them all at once.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__("\n".join([*self.problems, f"{count} configuration {noun}"]))


class StartupError(GatewayError):
    """The configuration is valid but the server could not start (port busy, ...)."""
