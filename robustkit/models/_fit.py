"""Does a checkpoint fit its architecture? One-line answers instead of tracebacks.

A checkpoint's sidecar is user input: hand-written or re-pinned metadata can name arguments the
builder does not take, give them the wrong type, or make a composite load itself. Each case is a
:class:`CheckpointError` naming the file and the problem, so the CLI prints one line (exit 2) and a
traceback keeps meaning a robustkit bug.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.core.errors import CheckpointError, RobustkitError, close_matches_hint

SHOWN = 3  # names listed per kind of mismatch; the counts say how many there are in all

# The checkpoints being loaded, outermost first: a composite names its base models by id or path,
# so a composite that names itself (directly or through another) would recurse until Python gives up.
_LOADING: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("robustkit_loading", default=())


@contextlib.contextmanager
def loading(tensor_path: Path, shown: str | Path) -> Iterator[None]:
    """Mark ``tensor_path`` as being loaded; loading it again inside is a cycle and a CheckpointError."""
    key = Path(tensor_path).resolve()
    chain = _LOADING.get()
    if key in chain:
        cycle = " -> ".join(str(p.name) for p in (*chain[chain.index(key):], key))
        raise CheckpointError(f"checkpoint {shown} references itself ({cycle}); a composite's arch_args "
                              "must name other checkpoints")
    token = _LOADING.set((*chain, key))
    try:
        yield
    finally:
        _LOADING.reset(token)


def build(builder: Callable[..., nn.Module], arch: str, arch_args: Any, path: str | Path) -> nn.Module:
    """``builder(**arch_args)``, with arch_args that are not a JSON object, that name arguments the
    builder does not take, or that it cannot build from refused in one line."""
    if not isinstance(arch_args, Mapping):
        raise CheckpointError(f"checkpoint {path}: arch_args must be a JSON object of {arch}'s arguments, "
                              f"got {_json_type(arch_args)}")
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(str(k) for k in arch_args if k not in accepted)
        if unknown:
            raise CheckpointError(
                f"checkpoint {path}: {arch} takes no argument {', '.join(map(repr, unknown))}"
                f"{close_matches_hint(unknown[0], accepted)} (its arguments: {', '.join(accepted) or 'none'})")
    try:
        return builder(**arch_args)
    except RobustkitError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        shown = json.dumps(arch_args, sort_keys=True, default=str)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise CheckpointError(f"checkpoint {path}: cannot build {arch} from its arch_args {shown} "
                              f"({type(e).__name__}: {_one_line(e)})") from None


def mismatch(model_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor]) -> str:
    """The whole difference between two state dicts on one line: counts of missing and unexpected
    keys and of shape mismatches, each with its first names ("" when they agree)."""
    missing = [k for k in model_state if k not in file_state]
    unexpected = [k for k in file_state if k not in model_state]
    shapes = [f"{k} {_shape(file_state[k])} in the file, {_shape(model_state[k])} in the model"
              for k in model_state if k in file_state and file_state[k].shape != model_state[k].shape]
    parts = [f"{len(items)} {what} ({_first(items)})" for what, items in (
        ("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", shapes)) if items]
    return "; ".join(parts)


def _first(items: list[str]) -> str:
    more = len(items) - SHOWN
    return ", ".join(items[:SHOWN]) + (f", and {more} more" if more > 0 else "")


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _json_type(value: Any) -> str:
    names = {type(None): "null", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return names.get(type(value), type(value).__name__)


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
