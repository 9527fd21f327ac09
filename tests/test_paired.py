"""`robustkit paired`: McNemar and the per-example worst case of result JSONs on the same images.

The reference for the statistics is brute force over hand-made flags (counted here, not by the code
under test) and the binomial sum written out; the refusals are the point of the command: a paired
test of different images or budgets is a wrong number, not a warning.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from robustkit.cli import main
from robustkit.eval.paired import compare_results

# A committed result of the shipped Fashion-MNIST composite: a real, schema-valid template.
TEMPLATE = (Path(__file__).resolve().parents[1] / "eval" / "results"
            / "adaptive_smoothing.fashion_mnist_partial__autoattack-adaptive__fashion_mnist-n1000-s0.json")


def _write(path: Path, robust: str, *, clean: str | None = None, model: str | None = None,
           attack: str | None = None, eps: float | None = None, fingerprint: str | None = None) -> str:
    d = json.loads(TEMPLATE.read_text())
    n = len(robust)
    d["n_examples"] = n
    d["clean_flags"] = clean if clean is not None else "1" * n
    d["robust_flags"] = robust
    d["clean_accuracy"] = d["clean_flags"].count("1") / n
    d["robust_accuracy"] = robust.count("1") / n
    for key, value in (("model", model), ("attack", attack), ("eps", eps)):
        if value is not None:
            d[key] = value
    if fingerprint is not None:
        d["data"]["fingerprint"] = fingerprint
    path.write_text(json.dumps(d))
    return str(path)


def _flags(rng: random.Random, n: int, p: float) -> str:
    return "".join("1" if rng.random() < p else "0" for _ in range(n))


def test_worst_case_and_mcnemar_match_brute_force(tmp_path: Path) -> None:
    rng = random.Random(3)
    a, b, c = (_flags(rng, 300, p) for p in (0.6, 0.55, 0.7))
    paths = [_write(tmp_path / f"{k}.json", f, attack=k) for k, f in zip("abc", (a, b, c), strict=True)]
    report = compare_results(paths)
    worst = sum(x == y == z == "1" for x, y, z in zip(a, b, c, strict=True))
    assert report["worst_case"]["n_robust"] == worst
    assert report["worst_case"]["robust_acc"] == worst / 300
    assert report["worst_case"]["robust_acc"] <= report["worst_case"]["lowest_single"]
    pair = next(p for p in report["pairs"] if (p["a"], p["b"]) == ("a", "c"))
    only_a = sum(x == "1" and z == "0" for x, z in zip(a, c, strict=True))
    only_c = sum(x == "0" and z == "1" for x, z in zip(a, c, strict=True))
    assert (pair["robust"]["only_a"], pair["robust"]["only_b"]) == (only_a, only_c)
    n, k = only_a + only_c, min(only_a, only_c)
    assert pair["robust"]["p_value"] == pytest.approx(min(1.0, sum(math.comb(n, i) for i in range(k + 1)) / 2 ** (n - 1)))
    assert len(report["pairs"]) == 3


def test_cli_reproduces_the_fashion_mnist_card(capsys) -> None:
    """The card's quoted numbers: worst case 53.40% of standard and adaptive AA, 40 vs 18, p = 0.0054."""
    root = TEMPLATE.parents[2]
    standard = (root / "eval" / "tradeoff" / "tradeoff__adaptive_smoothing.fashion_mnist_partial__autoattack__"
                "fashion_mnist-n1000-s0.points" / "adaptive.json")
    assert main(["paired", str(standard), str(TEMPLATE)]) == 0
    out = capsys.readouterr().out
    assert "per-example worst case: 53.40% (534 of 1000" in out
    assert "robust only under autoattack 18, only under autoattack-adaptive 40 (p = 0.0054)" in out


def test_different_models_get_no_worst_case(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", "1100", model="m1")
    b = _write(tmp_path / "b.json", "1010", model="m2")
    report = compare_results([a, b])
    assert report["worst_case"] is None and "different models" in report["worst_case_note"]
    assert [r["label"] for r in report["results"]] == ["m1", "m2"]


@pytest.mark.parametrize("change", [{"eps": 0.2}, {"fingerprint": "0" * 64}])
def test_refuses_results_of_other_images_or_budgets(tmp_path: Path, capsys, change: dict) -> None:
    a = _write(tmp_path / "a.json", "1100")
    b = _write(tmp_path / "b.json", "1010", **change)
    assert main(["paired", a, b]) == 2
    err = capsys.readouterr().err
    assert "is not paired with" in err and err.count("\n") == 1
    c = _write(tmp_path / "c.json", "10100")  # another number of examples
    assert main(["paired", a, c]) == 2


def test_labels_and_report_file(tmp_path: Path, capsys) -> None:
    a = _write(tmp_path / "a.json", "1100")
    b = _write(tmp_path / "b.json", "1010")
    assert main(["paired", a, b, "--label", "one"]) == 2  # one label for two results
    assert "--label given 1 times for 2 results" in capsys.readouterr().err
    out = tmp_path / "report.json"
    assert main(["paired", a, b, "--label", "one", "--label", "two", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "robustkit.paired"
    assert [r["label"] for r in report["results"]] == ["one", "two"]
    assert report["worst_case"]["n_robust"] == 1
    assert main(["paired", a, b, "--out", str(out)]) == 0  # its own earlier report: replaced
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert main(["paired", a, b, "--out", str(other)]) == 2  # anything else: refused
    assert other.read_text() == "mine"
    assert main(["paired", a, b, "--out", a]) == 2  # an input: never


def test_comma_list_summary_uses_the_same_worst_case() -> None:
    """`eval --attack a,b` prints the worst case from the same function as `paired`."""
    from types import SimpleNamespace

    from robustkit.cli.eval import _attack_comparison

    results = [SimpleNamespace(attack="a", robust_accuracy=0.5, robust_flags="1100"),
               SimpleNamespace(attack="b", robust_accuracy=0.5, robust_flags="1010")]
    line = _attack_comparison(results)
    assert "report 25.00% (per-example worst case" in line and "gives 50.00%" in line
