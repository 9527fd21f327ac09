"""Acceptance: on real CIFAR-10, `robustkit eval --attack autoattack` equals pyautoattack exactly.

Slow (standard AutoAttack on 200 real images with the shipped model); CI runs it.
"""

from __future__ import annotations

import json

import pytest
import torch

from robustkit.attacks.autoattack import bare_autoattack
from robustkit.cli import main
from robustkit.data import load_split
from robustkit.models import create_model


@pytest.mark.slow
def test_cli_autoattack_matches_pyautoattack_on_real_cifar10(real_data_dir, tmp_path, capsys):
    out = tmp_path / "aa.json"
    # The README quickstart command (default batch size 256, seed 0), pinned to the CPU.
    code = main(["eval", "--model", "small_cnn", "--attack", "autoattack", "--n-examples", "200",
                 "--data-dir", str(real_data_dir), "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    ours = [c == "1" for c in result["robust_flags"]]

    model = create_model("small_cnn")
    x, y = load_split("cifar10", "test", data_dir=real_data_dir).tensors(200)
    ref = bare_autoattack(model, x, y, norm="Linf", eps=8 / 255, version="standard", seed=0, batch_size=256,
                          device=torch.device("cpu"))
    assert ours == ref
    assert result["robust_accuracy"] == sum(ref) / 200
    assert [s["name"] for s in result["stages"]] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert result["batch_size"] == 256 and result["seed"] == 0 and result["eps"] == 8 / 255
    assert result["budget"]["max_linf"] <= 8 / 255 + 1e-5
