"""The one way every `python -m horse_dist.<command>` starts: user errors as one line and exit code 2.

A bad config key, a malformed data file, a missing or foreign checkpoint, a run folder in use: the user sees
`error: <file or key>: <what is wrong>` on stderr and the process exits with 2 (1 for a failing disk or
permission, or a run that diverged). `--debug` anywhere on the command line shows the full traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from horse_dist.config import CommandLine, ConfigError, RunConfig, load_config, split_cli
from horse_dist.data import DataFormatError
from horse_dist.editor import RidgeSolveError
from horse_dist.lm.export import ExportTargetError
from horse_dist.process import killed_exit_code, setup_logging
from horse_dist.training.checkpoint import CheckpointError, RunFolderError
from horse_dist.training.engine import DivergedError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataFormatError,
    CheckpointError,
    RunFolderError,
    ExportTargetError,
    FileNotFoundError,
)
# a run that stopped for a reason its message names (a diverged run, a singular solve): one line, exit 1
RUN_ERRORS: tuple[type[BaseException], ...] = (DivergedError, RidgeSolveError)
BAD_INPUT_EXIT = 2
SYSTEM_EXIT = 1


def job_config(argv: list[str] | None) -> tuple[CommandLine, RunConfig]:
    """How a job that takes only the config starts: its log set up, its command line and resolved config."""
    setup_logging()
    cli = split_cli(sys.argv[1:] if argv is None else argv)
    return cli, load_config(cli.config_file, cli.overrides)


def one_line(err: BaseException) -> str:
    """The error's message on one line; an OSError names its path."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror} (errno {err.errno})"
    text = " ".join(str(err).split())
    return text or type(err).__name__


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Call `main(args)`; user errors and OS errors end the process with one line, unless --debug. A job
    stopped by SIGTERM exits 128 + 15 even when a library turned the exit into an error of its own."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        main(args)
    except BaseException as err:
        killed = killed_exit_code()
        if killed is not None and not (isinstance(err, SystemExit) and err.code == killed):
            print(f"stopped by signal {killed - 128} ({type(err).__name__} on the way out)", file=sys.stderr)  # noqa: T201
            raise SystemExit(killed) from None
        if debug or not isinstance(err, (*USER_ERRORS, *RUN_ERRORS, OSError)):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)  # noqa: T201
        raise SystemExit(BAD_INPUT_EXIT if isinstance(err, USER_ERRORS) else SYSTEM_EXIT) from None
