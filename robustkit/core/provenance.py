"""Where a number came from: package versions, git commit, device, host.

Recorded in every result so a robustness figure can be traced to the exact code and hardware
that produced it (RobustBench entries record none of this; see toolkits.md §1.2).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("robustkit", "torch", "torchvision", "numpy", "pyautoattack", "foolbox", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that can change a result."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the robustkit checkout, or nulls for an installed wheel."""
    root = Path(path) if path else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when available, else CPU; anything else as given (in a torchrun job a
    bare ``cuda`` is this rank's GPU, ``cuda:LOCAL_RANK``)."""
    from robustkit.distributed import rank_device

    if device is None or str(device) == "auto":
        return rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return rank_device(torch.device(device))


def require_device(device: str | torch.device | None) -> torch.device:
    """:func:`resolve_device`, refusing CUDA on a machine without it (bad input, not a crash)."""
    from robustkit.core.errors import ConfigError

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


def describe_device(device: torch.device) -> str:
    """Human-readable device, e.g. ``cuda:0 (NVIDIA H200)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def provenance(device: torch.device) -> dict[str, Any]:
    """Everything about the environment worth recording next to a result."""
    return {
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git": git_commit(),
        "device": describe_device(device),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "command": command_line(),
    }


def command_line() -> list[str] | None:
    """``sys.argv`` with the program as its name, not its path (``robustkit``, ``python -m robustkit``).

    argv[0] is the absolute path of the console script or ``__main__.py``: recorded as is it ties a
    committed result to one machine's install location and says nothing the rest of argv does not.
    """
    if not sys.argv or not sys.argv[0]:
        return None
    prog = Path(sys.argv[0])
    name = f"python -m {prog.parent.name}" if prog.name == "__main__.py" else prog.name
    return [name, *sys.argv[1:]]


def total_wall_s(training: dict[str, Any]) -> float | None:
    """A checkpoint's training wall time over every process that trained it.

    ``wall_time_s`` is the last process's: a run resumed after epoch k measured only the epochs after
    it. The epochs before are in ``epochs_log`` (their ``seconds`` and ``val_seconds``), and the first
    epoch of each resumed process says ``resumed_from_epoch``; work a killed process lost is in neither.
    """
    wall = training.get("wall_time_s")
    logs = [e for e in training.get("epochs_log") or [] if isinstance(e, dict)]
    resumed = [int(e["resumed_from_epoch"]) for e in logs if "resumed_from_epoch" in e]
    if wall is None or not resumed:
        return wall
    earlier = logs[:max(resumed)]  # epochs are logged 1..E in order, so epoch k is logs[k - 1]
    return round(wall + sum(float(e.get("seconds", 0.0)) + float(e.get("val_seconds", 0.0)) for e in earlier), 1)


def training_run(device: object, wall: float, cpu: float) -> dict[str, Any]:
    """Where and how long a training run ran, as every trainer's checkpoint metadata records it.

    ``cpu_time_s`` is summed over threads, so wall time grows while CPU time stays put when the
    machine is shared: both are recorded so a slow run can be told from a contended one.
    """
    return {
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch_version": torch.__version__,
    }
