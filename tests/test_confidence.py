"""The confidence-gap measurement (adaptive smoothing's premise about its robust base), checked
against a direct recomputation on a tiny model."""

from __future__ import annotations

import json

import torch

from robustkit.data import load_split
from robustkit.eval import confidence
from robustkit.models import load_model


def test_confidence_gap_matches_a_direct_computation(tmp_path, one_thread: None) -> None:
    out = tmp_path / "tiny_cnn.init"  # a model id as the stem: its dot is not a suffix
    argv = ["--model", "tiny_cnn.init", "--dataset", "synthetic", "--n-examples", "40", "--steps", "3",
            "--eps", "8/255", "--out", str(out)]
    assert confidence.main(argv) == 0
    report = json.loads((tmp_path / "tiny_cnn.init.json").read_text())
    assert (tmp_path / "tiny_cnn.init.png").stat().st_size > 1000
    # clean: the model's own top softmax probabilities and correctness on the first 40 test images
    model = load_model("tiny_cnn.init").model.eval()
    x, y = load_split("synthetic", "test").tensors(40)
    with torch.no_grad():
        conf, pred = model(x).softmax(1).max(1)
    clean = report["per_example"]["clean"]
    torch.testing.assert_close(torch.tensor(clean["confidence"]), conf)
    assert clean["correct"] == (pred == y).tolist()
    # the gaps are the difference of the two groups' means, for clean and attacked inputs
    for key in ("clean", "attacked"):
        d, g = report["per_example"][key], report["gaps"][key]
        right = [c for c, ok in zip(d["confidence"], d["correct"], strict=True) if ok]
        wrong = [c for c, ok in zip(d["confidence"], d["correct"], strict=True) if not ok]
        assert (g["n_correct"], g["n_incorrect"]) == (len(right), len(wrong)) and len(right) + len(wrong) == 40
        if right and wrong:
            assert abs(g["gap"] - (sum(right) / len(right) - sum(wrong) / len(wrong))) < 1e-12
    assert report["gaps"]["attacked"]["n_correct"] <= report["gaps"]["clean"]["n_correct"]
    assert report["command"].startswith("python -m robustkit.eval.confidence --model tiny_cnn.init")
