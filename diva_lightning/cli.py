"""``diva-cli`` entry point. Subcommands are added as the stages land (see README)."""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    print("diva-cli: no subcommands yet", file=sys.stderr)
    raise SystemExit(2)
