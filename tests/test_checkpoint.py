"""Foreign checkpoints: container unwrapping, prefix stripping, and no arbitrary unpickling."""

from __future__ import annotations

import collections

import pytest
import torch

from robustkit.core.checkpoint import load_foreign_state_dict
from robustkit.core.errors import CheckpointError


def test_unwraps_nested_containers_and_prefixes(tmp_path):
    w = torch.arange(6.0).view(2, 3)
    path = tmp_path / "zoo.pt"
    torch.save({"last": {"state_dict": {"module.layer.weight": w}}, "epoch": 3}, path)
    state = load_foreign_state_dict(path)
    assert list(state) == ["layer.weight"] and torch.equal(state["layer.weight"], w)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_arbitrary_pickles(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": collections.OrderedDict(w=torch.zeros(1)), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_foreign_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


def test_html_download_is_recognised(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("<!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>")
    with pytest.raises(CheckpointError, match="HTML"):
        load_foreign_state_dict(path)
