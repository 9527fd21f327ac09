"""The committed results a card quotes belong to the shipped weights: same file (sha256) and, on the
real test images, the same clean prediction for every example the result recorded.

Why: a card quotes a result JSON, and the weights can be re-trained or re-deployed after it was
written. A stale result keeps its numbers but no longer describes the file users load; the clean
flags are the cheap, exact fingerprint of "this is the model that was attacked".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustkit.data import load_split
from robustkit.eval.paired import as_bools
from robustkit.models import load_model

REPO = Path(__file__).resolve().parents[1]

# model id -> the result JSONs its card quotes
QUOTED = {
    "small_cnn.cifar10_partial": ["eval/results/small_cnn.cifar10_partial__autoattack__cifar10-n1017-s0.json"],
    "ltd.cifar10_partial": ["defenses/ltd_comparison/trades_ltd__autoattack__cifar10-n1000-s0.json",
                            "eval/results/ltd.cifar10_partial__autoattack__cifar10-n200-s0.json"],
    "ltd.fashion_mnist_partial": [
        "defenses/ltd_comparison_fashion_mnist/pgd-at_ltd__autoattack__fashion_mnist-n1000-s0.json"],
    "small_cnn.fashion_mnist_pgd_at": [
        "defenses/ltd_comparison_fashion_mnist/pgd-at__autoattack__fashion_mnist-n1000-s0.json"],
    "small_cnn.fashion_mnist_trades": [
        "defenses/ltd_comparison_fashion_mnist/trades__autoattack__fashion_mnist-n1000-s0.json"],
    "small_cnn.mnist_pgd_at": ["defenses/ltd_comparison_mnist/pgd-at__autoattack__mnist-n1000-s0.json"],
    "ltd.mnist_partial": ["defenses/ltd_comparison_mnist/pgd-at_ltd__autoattack__mnist-n1000-s0.json"],
    "small_cnn.mnist_trades": ["defenses/ltd_comparison_mnist/trades__autoattack__mnist-n1000-s0.json"],
    "ltd.mnist_trades": ["defenses/ltd_comparison_mnist/trades_ltd__autoattack__mnist-n1000-s0.json"],
    "small_cnn.fashion_mnist_std": ["eval/results/small_cnn.fashion_mnist_std__autoattack__fashion_mnist-n1000-s0.json"],
    "adaptive_smoothing.fashion_mnist_partial": [
        "eval/results/adaptive_smoothing.fashion_mnist_partial__apgd-ce__fashion_mnist-n200-s0.json",
        "eval/tradeoff/tradeoff__adaptive_smoothing.fashion_mnist_partial__autoattack__fashion_mnist-n1000-s0.points/"
        "adaptive.json",
        "eval/results/adaptive_smoothing.fashion_mnist_partial__autoattack__fashion_mnist-n200-s0.json",
        "eval/results/adaptive_smoothing.fashion_mnist_partial__autoattack-adaptive__fashion_mnist-n200-s0.json",
        "eval/results/adaptive_smoothing.fashion_mnist_partial__autoattack-adaptive__fashion_mnist-n1000-s0.json"],
    "adaptive_smoothing.mnist_partial": [
        "eval/results/adaptive_smoothing.mnist_partial__apgd-ce__mnist-n200-s0.json",
        "eval/tradeoff/tradeoff__adaptive_smoothing.mnist_partial__autoattack__mnist-n1000-s0.points/adaptive.json"],
    "small_cnn.mnist_std": ["eval/results/small_cnn.mnist_std__autoattack__mnist-n1000-s0.json"],
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_id, result", [(m, r) for m, rs in QUOTED.items() for r in rs])
def test_quoted_result_is_of_the_shipped_file(model_id: str, result: str, real_data_dir: Path) -> None:
    res = json.loads((REPO / result).read_text())
    loaded = load_model(model_id)
    assert res["provenance"]["checkpoint_sha256"] == loaded.checkpoint_sha256, f"{result} is not of {model_id}'s file"
    n = res["n_examples"]
    assert res["data"]["indices"] == "first-n"
    x, y = load_split(res["dataset"], "test", data_dir=real_data_dir).tensors(n)
    with torch.no_grad():
        pred = torch.cat([loaded.model(xb).argmax(1) for xb in x.split(256)])
    clean = (pred == y).tolist()
    flags = as_bools(res["clean_flags"])
    assert clean == flags, f"{sum(a != b for a, b in zip(clean, flags, strict=True))} of {n} clean predictions differ"
