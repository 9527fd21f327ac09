"""Robustness curves: eps grids, monotonicity and its envelope, JSON + PNG, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustkit.attacks import PGD
from robustkit.attacks.base import Attack
from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel
from robustkit.eval import Subject, evaluate, robustness_curve
from robustkit.eval.curve import Curve, CurveWarning, analyse, eps_labels, parse_eps_spec

N = 64


@pytest.mark.parametrize("spec,expected", [
    ("0:0.3:0.05", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]),
    ("0:8/255:2/255", [0.0, 2 / 255, 4 / 255, 6 / 255, 8 / 255]),
    ("1/255:4/255:1/255", [1 / 255, 2 / 255, 3 / 255, 4 / 255]),
    ("0:0.31:0.05", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]),  # stop need not be on the grid
    ("0:0.29999999:0.05", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.29999999]),  # float tolerance, clamped
    ("0:0.99:0.01", [k / 100 for k in range(100)]),  # 100 points: the most allowed
    ("0, 2/255 ,4/255,8/255", [0.0, 2 / 255, 4 / 255, 8 / 255]),
    ("0.5", [0.5]),
])
def test_parse_eps_spec_good(spec, expected):
    got = parse_eps_spec(spec)
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(b > a for a, b in zip(got, got[1:], strict=False))


def test_eps_labels():
    assert eps_labels(parse_eps_spec("0:0.3:0.1")) == ["0", "0.1", "0.2", "0.3"]  # not 51/255
    assert eps_labels(parse_eps_spec("0:8/255:4/255")) == ["0", "4/255", "8/255"]
    assert eps_labels([0.0, 1 / 255, 0.1]) == ["0", "0.00392157", "0.1"]


def test_parse_eps_spec_is_exact_for_fractions():
    assert parse_eps_spec("0:8/255:2/255")[-1] == 8 / 255  # bit-identical to parse_eps("8/255")
    assert parse_eps_spec("0:0.3:0.05")[-1] == 0.3


@pytest.mark.parametrize("spec,needle", [
    ("0:1", "start:stop:step"),
    ("0:1:0.1:2", "start:stop:step"),
    ("0:1:0.1,2", "start:stop:step"),
    ("0:1:0", "step must be > 0"),
    ("1:0:0.1", "stop must be >= start"),
    ("0:1:1e-9", "1000000001 points; at most 100"),  # 1e-9 is a valid eps, the grid is too long
    ("0:1:0.01", "101 points; at most 100"),
    ("8/255,4/255", "strictly increasing"),
    ("0,0", "strictly increasing"),
    ("0,-1", "is negative"),
    ("0,,1", "empty value"),
    ("0,8/0", "division by zero"),
    ("abc", "malformed eps"),
    ("0", "at least one eps > 0"),
    (",".join(str(i) for i in range(101)), "at most 100"),
])
def test_parse_eps_spec_bad(spec, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        parse_eps_spec(spec)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- analysis


def test_analyse_flags_rise_and_fixes_envelope():
    clean = "11111110"  # 7 of 8 correct
    raw = [
        {"eps": 0.0, "flags": clean},
        {"eps": 0.1, "flags": "11110000"},  # 4
        {"eps": 0.2, "flags": "11001100"},  # 4, but #4, #5 were broken at 0.1: inconsistent, no rise
        {"eps": 0.3, "flags": "11101100"},  # 5 > 4: a rise
        {"eps": 0.4, "flags": "10000000"},
    ]
    for r in raw:
        r.update(seconds=0.0, forward=0, backward=0, config=None)
    points, msgs = analyse(clean, raw)
    assert [p.accuracy for p in points] == [7 / 8, 4 / 8, 4 / 8, 5 / 8, 1 / 8]
    assert [p.accuracy_envelope for p in points] == [7 / 8, 4 / 8, 2 / 8, 2 / 8, 1 / 8]
    assert [p.n_inconsistent for p in points] == [0, 0, 2, 3, 0]
    assert len(msgs) == 2
    assert msgs[0].startswith("2 example(s) broken at a smaller eps are robust at eps 0.2 (#4, #5)")
    assert "accuracy rises from 50.00% at eps 0.1 to 62.50% at eps 0.3" in msgs[1]
    assert "at most 25.00%" in msgs[1]


class _FlakyAttack(Attack):
    """PGD everywhere except one eps, where it returns the clean images: a planted attack failure."""

    name = "flaky"

    def __init__(self, eps: float, broken_eps: float) -> None:
        super().__init__(ThreatModel("Linf", eps))
        self.pgd = PGD(self.threat, steps=3)
        self.broken = abs(eps - broken_eps) < 1e-12

    def stages(self) -> list[str]:
        return [self.name]

    def perturb(self, model, x, y, *, stage, seed):
        if self.broken:
            return x.clone()
        return self.pgd.perturb(model, x, y, stage="pgd", seed=seed)


# --------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    return load_split("synthetic", "test").tensors(N)


@pytest.fixture(scope="module")
def pgd_curve(tiny_model, data) -> Curve:
    x, y = data
    return robustness_curve(tiny_model, lambda e: PGD(ThreatModel("Linf", e), steps=3),
                            "0:8/255:2/255", x, y, batch_size=32, device="cpu", seed=3, progress=False,
                            subject=Subject(model="tiny", dataset="synthetic"), attack_name="pgd")


def test_curve_is_monotone_and_starts_at_clean(pgd_curve, tiny_model, data):
    x, y = data
    accs = [p.accuracy for p in pgd_curve.points]
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False)), accs
    assert accs[0] == pgd_curve.clean_accuracy > accs[-1]
    clean = evaluate(tiny_model, None, x, y, batch_size=32, device="cpu", progress=False)
    assert pgd_curve.clean_accuracy == clean.clean_accuracy
    assert pgd_curve.points[0].robust_flags == clean.clean_flags == pgd_curve.clean_flags
    assert pgd_curve.points[0].attack_config is None and pgd_curve.points[0].backward_passes == 0
    assert all(p.backward_passes > 0 for p in pgd_curve.points[1:])
    assert [p.eps_str for p in pgd_curve.points] == ["0", "2/255", "4/255", "6/255", "8/255"]
    assert pgd_curve.attack_config == {"name": "pgd", "norm": "Linf", "steps": 3, "random_start": True,
                                       "restarts": 1, "loss": "ce"}
    assert pgd_curve.norm == "Linf" and pgd_curve.n_examples == N and pgd_curve.provenance["versions"]


def test_point_equals_eval_at_that_eps(pgd_curve, tiny_model, data):
    """Attacking only the clean-correct subset keeps the survivor batches, hence the attack seeds."""
    x, y = data
    res = evaluate(tiny_model, PGD(ThreatModel("Linf", 4 / 255), steps=3), x, y, batch_size=32,
                   device="cpu", seed=3, progress=False)
    assert pgd_curve.points[2].robust_flags == res.robust_flags


def test_json_round_trip_and_png(pgd_curve, tmp_path):
    path = pgd_curve.save(tmp_path / "c.json")
    d = json.loads(path.read_text())
    assert d["schema"] == "robustkit.curve" and d["schema_version"] == 1
    for key in ("model", "attack", "attack_config", "norm", "dataset", "n_examples", "seed", "batch_size",
                "points", "clean_accuracy", "warnings", "provenance"):
        assert key in d, key
    assert set(d["points"][1]) >= {"eps", "eps_str", "accuracy", "accuracy_envelope", "robust_flags",
                                   "seconds", "forward_passes", "backward_passes"}
    assert Curve.load(path) == pgd_curve
    png = pgd_curve.plot(tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1024
    assert "2/255" in pgd_curve.summary() and "envelope" in pgd_curve.summary()


def test_planted_failure_is_flagged_and_envelope_fixed(tiny_model, data, tmp_path):
    x, y = data
    grid = [2 / 255, 4 / 255, 6 / 255]
    with pytest.warns(CurveWarning, match="accuracy rises"):
        curve = robustness_curve(tiny_model, lambda e: _FlakyAttack(e, 4 / 255), grid, x, y,
                                 batch_size=32, device="cpu", progress=False)
    low, bad, high = curve.points
    assert bad.accuracy == curve.clean_accuracy > low.accuracy  # the attack did nothing at 4/255
    assert bad.accuracy_envelope == low.accuracy_envelope == low.accuracy
    assert high.accuracy_envelope <= high.accuracy
    assert curve.rising_points() == [1]
    assert len(curve.warnings) == 1 and "at eps 4/255 is at most" in curve.warnings[0]
    assert "rises" in curve.summary()
    png = curve.plot(tmp_path / "bad.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1024


def test_refuses_records_and_wrong_eps(tiny_model, data):
    x, y = data
    with pytest.raises(TypeError, match="records_path"):
        robustness_curve(tiny_model, lambda e: PGD(ThreatModel("Linf", e)), [0.1], x, y, records_path="r")
    with pytest.raises(ConfigError, match="attack factory built eps"):
        robustness_curve(tiny_model, lambda e: PGD(ThreatModel("Linf", 0.5), steps=1), [0.1], x, y,
                         device="cpu", progress=False)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_plot_at_default_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["curve", "--model", "tiny_cnn.init", "--dataset", "synthetic", "--attack", "pgd",
                 "--attack-arg", "steps=2", "--eps", "0:4/255:2/255", "--n-examples", "32", "--batch-size", "16",
                 "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    stem = "results/curve__tiny_cnn.init__pgd__synthetic-n32-s0"
    d = json.loads(Path(f"{stem}.json").read_text())
    assert [p["eps_str"] for p in d["points"]] == ["0", "2/255", "4/255"]
    assert d["model"] == "tiny_cnn.init" and d["attack_config"]["steps"] == 2 and d["data"]["fingerprint"]
    assert Path(f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert "envelope" in out and f"{stem}.png" in out


@pytest.mark.parametrize("argv,needle", [
    (["--eps", "0:8/255"], "start:stop:step"),
    (["--eps", "8/255,4/255"], "strictly increasing"),
    (["--eps", "0,8/255", "--attack", "none"], "needs an attack"),
    (["--eps", "0,8/255", "--attack", "pgd", "--attack-arg", "steps=0"], "steps must be >= 1"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code = main(["curve", "--model", "tiny_cnn.init", "--dataset", "synthetic", *argv])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("robustkit: error:"), err
    assert needle in lines[0]


def test_curve_resumes_from_its_records(tmp_path, monkeypatch):
    """A second run with the same --out takes every finished point from its records: no attack runs."""
    import json

    from robustkit import cli as cli_mod
    from robustkit.attacks import pgd

    out = tmp_path / "c.json"
    argv = ["curve", "--model", "tiny_cnn.init", "--dataset", "synthetic", "--attack", "pgd",
            "--attack-arg", "steps=2", "--eps", "0:8/255:4/255", "--n-examples", "16", "--batch-size", "8",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli_mod.main(argv) == 0
    first = json.loads(out.read_text())
    assert sorted(p.name for p in (tmp_path / "c.records").iterdir()) == [
        "clean.records.jsonl", "eps_0.015686275.records.jsonl", "eps_0.031372549.records.jsonl"]

    def no_attacks(*args, **kwargs):
        raise AssertionError("a resumed curve attacked again")

    monkeypatch.setattr(pgd.PGD, "perturb", no_attacks)
    assert cli_mod.main(argv) == 0
    second = json.loads(out.read_text())
    assert [p["robust_flags"] for p in second["points"]] == [p["robust_flags"] for p in first["points"]]
    with pytest.raises(AssertionError, match="attacked again"):  # --no-resume starts over
        cli_mod.main([*argv, "--no-resume"])
