"""``diva-cli``: LightningCLI for the stages, plus tools that need no Trainer.

    diva-cli fit --config configs/stage2.yaml          # any Trainer subcommand: fit, validate, ...
    diva-cli prepare --help                            # image folder or synthetic world -> shards
    diva-cli analyze --out runs/analyze                 # Sec. 2 divergence curves, Fig. 2 plots
    diva-cli export --run_config RUN.yaml --checkpoint X.ckpt --out DIR
    diva-cli plan --config configs/showo/stage2.yaml   # per-GPU memory, before any weight loads
    diva-cli generate --pretrained DIR --backbone showo --prompts P --out OUT   # GenEval / DPG

Stages and backbones are chosen by ``class_path`` in the YAML (``model:`` and
``model.init_args.backbone:``); the data module likewise (``data:``).
"""

from __future__ import annotations

import os
import sys

from diva_lightning.lightning_cli import DivaCLI, build_cli

__all__ = ["DivaCLI", "build_cli", "main"]

TOOLS = ("prepare", "export", "analyze", "generate", "plan")


def _run_tool(name: str, args: list[str]) -> None:
    from jsonargparse import auto_cli

    if name == "prepare":
        from diva_lightning.data.prepare import prepare

        auto_cli(prepare, args=args)
    elif name == "analyze":
        from diva_lightning.analysis.tool import analyze

        auto_cli(analyze, args=args)
    elif name == "export":
        from diva_lightning.export import export

        auto_cli(export, args=args)
    elif name == "plan":
        from diva_lightning.planning.tool import main as plan

        plan(args)
    elif name == "generate":
        from diva_lightning.evaluation.generate import generate

        auto_cli(generate, args=args)


# The user's errors: a refused setting, a missing or existing file. Anything else (a bug, a
# failing kernel) keeps its full traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def user_error(error: BaseException) -> BaseException:
    """The error the user caused: the innermost ``__cause__`` (jsonargparse re-raises a
    constructor's error inside its own union message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def main(args: list[str] | None = None) -> None:
    """Entry point; ``args`` as on the command line (default: ``sys.argv[1:]``). A refused
    setting ends the run with its message as the last line printed (exit code 1); set
    ``DIVA_TRACEBACK=1`` for the full traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in TOOLS:
            _run_tool(argv[0], argv[1:])
            return
        build_cli(None if args is None else argv)  # None: LightningCLI reads sys.argv itself
    except USER_ERRORS as error:
        if os.environ.get("DIVA_TRACEBACK"):
            raise
        root = user_error(error)
        command = " ".join(argv[:1]) or "fit"
        print(f"diva-cli {command} stopped (full traceback: DIVA_TRACEBACK=1):", file=sys.stderr)
        print(f"{type(root).__name__}: {root}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
