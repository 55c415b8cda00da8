"""``check_sizes``: one clear error for a count or size below its minimum, before any work.

Shared by the tools that take counts from the command line or a config (the data module,
``prepare``, ``analyze``, ``plan``), so that each names the option the user gave, in the same
words. A negative batch size once hung a fit while it filled memory.
"""

from __future__ import annotations


def check_sizes(owner: str, minimum: int = 1, **sizes: int | float | None) -> None:
    """Raise ``ValueError("<owner>: <name> must be >= <minimum>, got <value>")`` for the first
    size below ``minimum``; ``None`` means "not given" and passes."""
    for name, value in sizes.items():
        if value is not None and value < minimum:
            raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
