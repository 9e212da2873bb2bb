"""``himatch-med COMMAND ...`` and ``python -m himatch_med COMMAND ...``: one command for every job of the package.

Each command is the same as its own entry point (``python -m himatch_med.run``, ``python -m himatch_med.bank``,
``python pipelines/screen.py`` ...): this module only picks the command's module and hands it the remaining
arguments. Nothing heavy is imported here, so that ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import importlib
import sys

from himatch_med import __version__

COMMANDS = {
    "run": ("himatch_med.run", "main", "detect anomalies in volumes against a bank or normal references"),
    "bank": ("himatch_med.bank.__main__", "bank_main", "build a bank of normal references (`bank build ...`)"),
    "screen": ("himatch_med.screen", "main", "screen a cohort: one folder per study, scores.csv, report.html"),
    "evaluate": ("himatch_med.evaluate", "main", "evaluate on a BMAD-style set or annotated volumes"),
    "benchmark": ("himatch_med.benchmark", "main", "time the pipeline and bank building (random weights)"),
}
"""Command name: (module, function taking the remaining arguments and returning the exit code, summary)."""


def usage() -> str:
    """The text of ``himatch-med --help``."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return ("usage: himatch-med [-h] [--version] {" + ",".join(COMMANDS) + "} ...\n\n"
            "Training-free anomaly detection for 3D medical images (HiMatch-AD with frozen DINOv3 features).\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n"
            "options:\n  -h, --help  show this help and exit\n  --version   show the version and exit\n\n"
            "`himatch-med COMMAND --help` shows the options of a command; the method and every setting: "
            "docs/method.md.\n")


def main(argv: list[str] | None = None) -> int:
    """Run ``himatch-med COMMAND ...``; returns the command's exit code (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(usage() + "error: a command is required\n")
        return 2
    first = argv[0]
    if first in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    if first == "--version":
        sys.stdout.write(f"himatch-med {__version__}\n")
        return 0
    if first not in COMMANDS:
        sys.stderr.write(usage() + f"error: unknown command {first!r}; choose one of {', '.join(COMMANDS)}\n")
        return 2
    module, function, _ = COMMANDS[first]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
