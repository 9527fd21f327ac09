"""The one option layer every subcommand shares: each common flag is spelled and defined once.

| flag            | meaning everywhere                                                        |
|-----------------|---------------------------------------------------------------------------|
| ``--device``    | auto (CUDA when available, the default), cpu, cuda, cuda:1, ...          |
| ``--threads``   | CPU threads torch may use (default: torch's own choice)                   |
| ``--seed``      | seed of every random choice the command makes                             |
| ``--data-dir``  | data root (default: $ROBUSTKIT_DATA, else ~/.cache/robustkit/data)        |
| ``--no-download`` | never download data                                                     |
| ``--out``       | the path of the one file the command writes (a folder is ``--out-dir``)   |
| ``--no-progress`` | no progress bars                                                        |
| ``--quiet``     | print only warnings and errors (implies ``--no-progress``)                |
| ``--force``     | replace an existing output file instead of refusing                      |

:func:`add_common` adds the ones a command uses; :func:`apply_common` acts on them before the
command runs (threads, quiet), so no command handles them on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import torch

from robustkit.core.errors import ConfigError

HELP = {
    "device": "auto (CUDA when available; the default), cpu, cuda, cuda:1, ...",
    "threads": "CPU threads torch may use (default: torch's choice, usually one per core)",
    "data_dir": "data root (default: $ROBUSTKIT_DATA, else ~/.cache/robustkit/data)",
    "no_download": "never try to download data",
    "no_progress": "no progress bars",
    "quiet": "print only warnings and errors (implies --no-progress)",
    "force": "replace an existing output file instead of refusing",
}


def add_common(p: argparse.ArgumentParser, *, seed: str | None = "seed of every random choice (default: 0)",
               data: bool = True, out: str | None = None, progress: bool = True, force: bool = False,
               seed_default: int | None = 0) -> None:
    """Add the shared flags to ``p``. ``seed`` and ``out`` are help texts (None: the command has
    no such flag); ``--out`` always names a file, whose default the help text states."""
    g = p.add_argument_group("common options")
    g.add_argument("--device", default="auto", help=HELP["device"])
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N", help=HELP["threads"])
    if seed is not None:
        g.add_argument("--seed", type=int, default=seed_default, help=seed)
    if data:
        g.add_argument("--data-dir", default=None, metavar="DIR", help=HELP["data_dir"])
        g.add_argument("--no-download", action="store_true", help=HELP["no_download"])
    if out is not None:
        g.add_argument("--out", default=None, metavar="PATH", help=out)
    if progress:
        g.add_argument("--no-progress", action="store_true", help=HELP["no_progress"])
        g.add_argument("--quiet", action="store_true", help=HELP["quiet"])
    if force:
        g.add_argument("--force", action="store_true", help=HELP["force"])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextlib.contextmanager
def apply_common(args: argparse.Namespace) -> Iterator[None]:
    """Apply ``--threads`` and ``--quiet`` around a command (and undo them after, for callers
    that run several commands in one process, such as the tests), and join the ``torchrun`` job when
    the command was launched by one (:func:`robustkit.distributed.session`)."""
    from robustkit import distributed

    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    with distributed.session(getattr(args, "device", None)) as job:
        # Under torchrun rank 0 speaks for the job: the others draw no bars, print no summary and
        # repeat no warning (an error still prints on every rank: each says which rank failed).
        follower = job is not None and not job.is_main
        if follower:
            args.quiet = True  # silences its log lines too (log_enabled)
        if getattr(args, "quiet", False):
            args.no_progress = True
        try:
            if getattr(args, "quiet", False) or follower:
                with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
                    if follower:
                        warnings.simplefilter("ignore")
                    yield
            else:
                yield
        finally:
            torch.set_num_threads(threads)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Whether the command may draw progress bars."""
    return not (getattr(args, "no_progress", False) or getattr(args, "quiet", False))


def log_enabled(args: argparse.Namespace) -> bool:
    """Whether the command may print its per-epoch and per-stage lines: ``--no-progress`` drops the
    bars, not these (a run under nohup has nothing else to show); ``--quiet`` drops both."""
    return not getattr(args, "quiet", False)


def check_device_flag(text: str) -> None:
    """``--device`` must name a torch device (``gpu0`` is a one-line error, not a traceback)."""
    if text == "auto":
        return
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N") from None


def warn(message: str) -> None:
    """A one-line warning on stderr, in the same form as errors."""
    print(f"robustkit: warning: {message}", file=sys.stderr)
