"""Output paths that never lose data: the one check every command that writes runs first.

An output must not be one of the run's inputs (a checkpoint, its ``.json`` sidecar, a data file,
a result it reads): ``--out ck/run.json`` once replaced the metadata of ``ck/run.safetensors`` and
the model no longer loaded. An existing file that is not an earlier output of the same run is only
replaced with ``--force``. And a path robustkit cannot write (a folder, a folder it may not write
in, a parent that is a file) is a one-line error before any model or data loads, not a traceback
after an hour of attacks.

Each command calls :func:`check_place` and :func:`check_not_input` on the paths it was given as
soon as it has parsed them, and :func:`check_output` on its final paths (some are only known once
the model is loaded) before it starts to evaluate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from robustkit.core.errors import ConfigError

# An input of a run: its path and what it is, for the message that refuses to overwrite it.
Input = tuple[Path, str]
CHECKPOINT_SUFFIXES = (".safetensors", ".json")


def check_output(path: str | Path, *, inputs: Iterable[Input] = (), flag: str = "--out",
                 force: bool = False, kind: str = "an earlier output of this run",
                 replaceable: Callable[[Path], bool] | None = None) -> Path:
    """All three checks: writable place, not an input, and an existing file is only replaced when
    ``replaceable(path)`` says it is ``kind`` or with ``force`` (never when it is an input)."""
    p = Path(path)
    check_place(p, flag)
    check_not_input(p, inputs, flag)
    if p.exists() and not force and not (replaceable is not None and replaceable(p)):
        raise ConfigError(f"{flag} {p} exists and is not {kind}; pass --force to replace it, "
                          f"or choose another {flag}")
    return p


def check_place(path: str | Path, flag: str = "--out", *, folder: bool = False) -> None:
    """The path can be written: not a folder (a file for ``folder``), its nearest existing
    ancestor is a folder robustkit may create files in."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file; give a folder")
    if not folder and p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give a file path, e.g. {p / 'result.json'}")
    start = p if folder else p.parent
    for anc in (start, *start.parents):
        if not os.path.lexists(anc):
            continue
        if not anc.is_dir():
            raise ConfigError(f"{flag} {p}: {anc} is a file, not a folder")
        why = _not_writable(anc)
        if why:
            raise ConfigError(f"{flag} {p}: cannot write in {anc} ({why})")
        return


def _not_writable(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (None: they can). A real probe, not os.access:
    root passes every permission check yet cannot write on a read-only or immutable folder."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".robustkit-probe-", suffix=".tmp")
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(tmp)
    return None


def check_not_input(path: str | Path, inputs: Iterable[Input], flag: str = "--out") -> None:
    """Refuse an output that is (resolves to, is a hard link of) one of the run's inputs."""
    p = Path(path)
    for src, what in inputs:
        if _same_file(p, src):
            raise ConfigError(f"{flag} {p} is {what}, an input of this run: writing it would destroy it; "
                              f"choose another {flag}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


# --------------------------------------------------------------------------- the inputs of a run


def checkpoint_inputs(path: str | Path) -> list[Input]:
    """A checkpoint's tensor file and its metadata sidecar, whichever of the two was named."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in CHECKPOINT_SUFFIXES else p
    tensors = stem.with_name(stem.name + ".safetensors")
    return [(tensors, f"the checkpoint {tensors}"),
            (stem.with_name(stem.name + ".json"), f"the metadata of the checkpoint {tensors}")]


def model_inputs(name: str, _seen: set[str] | None = None) -> list[Input]:
    """The files loading ``name`` reads: a checkpoint path's or a registered id's pair of files,
    and (a composite's ``arch_args`` naming its base models) theirs. Reads sidecars only, no
    tensors; a name that does not resolve gives nothing (the loader reports it in its own words)."""
    seen = set() if _seen is None else _seen
    pair = _model_pair(name)
    key = os.path.realpath(pair[1][0]) if pair else name
    if not pair or key in seen:  # a composite that names itself: the loader refuses it, here the walk ends
        return []
    seen.add(key)
    meta = read_json(pair[1][0])
    args = meta.get("arch_args") if isinstance(meta, dict) else None
    nested = [v for v in (args.values() if isinstance(args, dict) else ()) if isinstance(v, str)]
    return pair + [i for v in nested for i in model_inputs(v, seen)]


def _model_pair(name: str) -> list[Input]:
    from robustkit.models.base import WEIGHTS_DIR, model_source, resolve_model_name

    if model_source(name) is not None:
        return []
    if name.endswith(CHECKPOINT_SUFFIXES) or "/" in name or "\\" in name:
        return checkpoint_inputs(Path(name).expanduser())
    try:
        info, tag = resolve_model_name(name)
    except (KeyError, ValueError):
        return []
    weights = info.tags.get(tag)
    return checkpoint_inputs(WEIGHTS_DIR / weights.file) if weights is not None else []


def command_inputs(args: argparse.Namespace) -> list[Input]:
    """Every file a parsed command line names as something to read (model, data, results, recipe)."""
    out: list[Input] = []
    if isinstance(getattr(args, "model", None), str):
        out += model_inputs(args.model)
    for attr, what in (("data_file", "the --data-file"), ("autoattack_result", "the --autoattack-result"),
                       ("from_result", "the --from-result"), ("recipe", "the --recipe"),
                       ("result", "the result read"), ("entry", "the entry read")):
        value = getattr(args, attr, None)
        if isinstance(value, (str, Path)) and value:
            out.append((Path(value).expanduser(), f"{what} {value}"))
    return out


def data_inputs(data_info: dict[str, Any]) -> list[Input]:
    """The data file or folder the examples were read from (known once the data has loaded)."""
    source = data_info.get("source")
    if isinstance(source, str) and source and os.path.lexists(source):
        return [(Path(source), f"the data source {source}")]
    return []


# --------------------------------------------------------------------------- what may be replaced


def read_json(path: Path) -> Any:
    """The parsed file, or None when it cannot be read or parsed (a predicate then says no)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_run(schema: str, fields: dict[str, Any], *, section: str | None = None) -> Callable[[Path], bool]:
    """A predicate for :func:`check_output`: the file is a robustkit ``schema`` JSON (``section``:
    whose ``section`` object is) and each of ``fields`` has the given value."""
    def check(path: Path) -> bool:
        d = read_json(path)
        if not isinstance(d, dict) or d.get("schema") != schema:
            return False
        body = d.get(section) if section else d
        return isinstance(body, dict) and all(body.get(k) == v for k, v in fields.items())

    return check


def first_line_is(text: str) -> Callable[[Path], bool]:
    """A predicate: the file's first line is ``text`` (a Markdown or text output robustkit wrote)."""
    def check(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.readline().rstrip("\n") == text
        except OSError:
            return False

    return check


def is_records_file(path: Path) -> bool:
    """The file starts with a robustkit records header (any evaluation's: resume checks which)."""
    try:
        with open(path, "rb") as f:
            head = json.loads(f.readline() or b"null")
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and head.get("type") == "header"


def is_png(path: Path) -> bool:
    """The file is a PNG image (what robustkit writes its plots as)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def companion_of(main: Path, main_is_ours: Callable[[Path], bool],
                 own_format: Callable[[Path], bool]) -> Callable[[Path], bool]:
    """A plot or Markdown beside a report: replaceable when that report is an earlier output of the
    run and the file has the format robustkit writes there (a text file named as the plot is not)."""
    return lambda p: main.exists() and main_is_ours(main) and own_format(p)


def check_outputs(paths: Sequence[tuple[Path, Callable[[Path], bool] | None]], *, inputs: Iterable[Input],
                  force: bool, flag: str = "--out", kind: str = "an earlier output of this run") -> None:
    """:func:`check_output` over several paths of one run, all before its first write."""
    inputs = list(inputs)
    for path, replaceable in paths:
        check_output(path, inputs=inputs, flag=flag, force=force, kind=kind, replaceable=replaceable)


def check_early(args: argparse.Namespace, files: Iterable[tuple[Path, str]], *,
                folders: Iterable[Path] = (), flag: str = "--out") -> None:
    """What can be checked as soon as the command line is parsed, before any model or data loads:
    every output (``files``: path and the flag that named it) can be written and none is a file the
    command line names as an input."""
    inputs = command_inputs(args)
    for p, file_flag in files:
        check_place(p, file_flag)
        check_not_input(p, inputs, file_flag)
    for d in folders:
        check_place(d, flag, folder=True)
        check_not_input(d, inputs, flag)
