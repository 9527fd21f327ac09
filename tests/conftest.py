"""Shared fixtures: the real-data location, and a tiny model trained on synthetic data.

Tests that need ../shared (the real partial datasets) skip with a reason where it is absent —
a user's clone — and run in CI, where ../shared sits beside the checkout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_PARTIAL = REPO.parent / "shared" / "data" / "partial"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (SHARED_PARTIAL / "cifar10" / "test.npz").exists():
        pytest.skip(f"real data not found at {SHARED_PARTIAL} (it ships beside the repo in CI only)")
    return SHARED_PARTIAL


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: on a shared 2-core CPU, extra OpenMP threads wait
    on each other (measured 10x slower with 2 threads on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_tiny(steps: int = 150, seed: int = 0) -> torch.nn.Module:
    """TinyCNN trained briefly on the synthetic set: accurate but not robust, so attacks have work."""
    from robustkit.data import load_split
    from robustkit.models import create_model

    x, y = load_split("synthetic", "train").tensors()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model("tiny_cnn.init", seed=seed)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return train_tiny()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: torch.nn.Module) -> Path:
    """The tiny model as a robustkit checkpoint (for CLI tests)."""
    from robustkit.core.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(tiny_model, path, architecture="tiny_cnn", dataset="synthetic", num_classes=10,
                    training={"recipe": "tests/conftest.py:train_tiny", "steps": 150, "seed": 0})
    return path


@pytest.fixture
def synthetic_test() -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    return load_split("synthetic", "test").tensors()


class MixedStandIn(torch.nn.Module):
    """log((1 - a) softmax(g) + a softmax(h)), a = sigmoid(gamma(x)): the MixedClassifier contract
    (``forward_with_gamma``) with a linear gamma, for attacks that need it, without a trained mixer."""

    number_forward_passes = 2

    def __init__(self, g: torch.nn.Module, h: torch.nn.Module, in_features: int, scale: float, seed: int) -> None:
        super().__init__()
        self.g, self.h = g, h
        self.mix = torch.nn.Linear(in_features, 1)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            self.mix.weight.copy_(torch.randn(self.mix.weight.shape, generator=gen) * scale)
            self.mix.bias.zero_()

    def forward_with_gamma(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        gamma = self.mix(x.flatten(1) - 0.5)[:, 0]
        out = torch.logaddexp(F.logsigmoid(-gamma)[:, None] + F.log_softmax(self.g(x), 1),
                              F.logsigmoid(gamma)[:, None] + F.log_softmax(self.h(x), 1))
        return out, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gamma(x)[0]


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name: state, parent, group, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the running ``proc`` and every process below it. Its session alone is not enough:
    torchrun starts each worker in a session of its own, and a worker outliving its agent runs on."""
    tree, todo = [], [proc.pid] if proc.poll() is None else []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children(pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
