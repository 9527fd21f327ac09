"""The accuracy-robustness trade-off: verdict arithmetic, per-point resume, JSON + PNG, and the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from robustkit.attacks import PGD
from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel
from robustkit.eval import Subject
from robustkit.eval import tradeoff as tradeoff_mod
from robustkit.eval.tradeoff import Tradeoff, accuracy_tradeoff, parse_alphas, verdict
from robustkit.models.adaptive_smoothing import MixedClassifier, MixingNet, auto_taps

N = 16


# --------------------------------------------------------------------------- verdict arithmetic

# (clean, robust) in alpha order: g accurate and brittle, h robust and less accurate
CURVE = [(0.90, 0.00), (0.80, 0.30), (0.60, 0.50)]


def test_verdict_above_interpolates_between_points():
    v = verdict(CURVE, (0.70, 0.45), n_examples=200)
    assert v["status"] == "above"
    assert v["curve_robust_acc"] == pytest.approx(0.40)  # halfway from (0.8, 0.3) to (0.6, 0.5)
    assert v["gap_points"] == pytest.approx(5.0)
    assert v["one_example_points"] == pytest.approx(0.5)
    assert "+5.00 points" in v["text"]


def test_verdict_below_and_on():
    v = verdict(CURVE, (0.85, 0.10))
    assert v["status"] == "below" and v["gap_points"] == pytest.approx(-5.0)
    assert v["curve_robust_acc"] == pytest.approx(0.15)
    assert verdict(CURVE, (0.80, 0.30))["status"] == "on"  # exactly a curve point


@pytest.mark.parametrize("clean", [0.95, 0.55])
def test_verdict_outside_the_clean_range(clean):
    v = verdict(CURVE, (clean, 0.9))
    assert v["status"] == "outside" and v["gap_points"] is None and v["curve_robust_acc"] is None
    assert v["curve_clean_range"] == [0.60, 0.90]
    assert "outside the curve's clean range" in v["text"]


def test_verdict_non_monotone_curve_uses_the_best_crossing():
    wiggly = [(0.90, 0.00), (0.70, 0.40), (0.80, 0.45), (0.60, 0.50)]  # crosses clean 0.75 three times
    v = verdict(wiggly, (0.75, 0.42))
    assert v["curve_robust_acc"] == pytest.approx(0.4625)  # max(0.3, 0.425, 0.4625)
    assert v["status"] == "below"
    assert verdict([(0.8, 0.1), (0.8, 0.3)], (0.8, 0.2))["status"] == "below"  # vertical: its top


def test_parse_alphas():
    assert parse_alphas("1, 0,0.5") == [0.0, 0.5, 1.0]
    for bad, needle in (("0,1.5", "outside"), ("0,,1", "empty"), ("a", "not a number"), ("0.5,0.5", "twice")):
        with pytest.raises(ConfigError, match=needle):
            parse_alphas(bad)


# --------------------------------------------------------------------------- on tiny models


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    return load_split("synthetic", "test").tensors(N)


def _bases(tiny_model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """g: the trained tiny model (a copy: a mixture freezes its base models); h: a weaker one."""
    from conftest import train_tiny

    return copy.deepcopy(tiny_model), train_tiny(steps=30, seed=1)


@pytest.fixture(scope="module")
def mixed(tiny_model) -> MixedClassifier:
    return build_mixed(tiny_model)


def build_mixed(tiny_model: torch.nn.Module) -> MixedClassifier:
    """The real composite; an untrained mixing net still gives an input-dependent alpha (also built by
    the distributed tests' torchrun script)."""
    g, h = _bases(tiny_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = MixingNet(16, 16, width=8)
    return MixedClassifier(g, h, mixing_net=net, taps_g=auto_taps(g, (3, 32, 32)),
                           taps_h=auto_taps(h, (3, 32, 32))).eval()


def _pgd() -> PGD:
    return PGD(ThreatModel("Linf", 2 / 255), steps=2)


def test_tradeoff_rows_json_png_and_resume(mixed, data, tmp_path, monkeypatch):
    x, y = data
    kwargs = dict(points_dir=tmp_path / "pts", batch_size=8, device="cpu", seed=1, progress=False,
                  subject=Subject(model="mix", dataset="synthetic"), attack_name="pgd",
                  command="robustkit tradeoff ...")
    t = accuracy_tradeoff(mixed, _pgd, "0,0.5,1", x, y, **kwargs)
    assert [(r.kind, r.alpha, r.label) for r in t.rows] == [
        ("g", 0.0, "g"), ("h", 1.0, "h"), ("fixed", 0.5, "alpha_0.5"), ("adaptive", None, "adaptive")]
    assert not any(r.reused for r in t.rows)
    assert [r.label for r in t.curve_rows()] == ["g", "alpha_0.5", "h"]
    adaptive = t.rows[-1]
    assert t.verdict == verdict([(r.clean_acc, r.robust_acc) for r in t.curve_rows()],
                                (adaptive.clean_acc, adaptive.robust_acc), n_examples=N)
    # On these 16 images the adaptive model scores exactly like g, the curve's end point: "on" the curve.
    assert (adaptive.clean_acc, adaptive.robust_acc) == (t.rows[0].clean_acc, t.rows[0].robust_acc) == (15 / 16, 13 / 16)
    assert t.verdict["status"] == "on" and t.verdict["gap_points"] == 0.0 and "on the fixed-alpha curve" in t.verdict["text"]
    for r in t.rows:
        assert 0.0 <= r.robust_acc <= r.clean_acc <= 1.0
        res = json.loads((tmp_path / "pts" / f"{r.label}.json").read_text())
        assert res["schema"] == "robustkit.eval-result" and res["n_examples"] == N
        assert (tmp_path / "pts" / f"{r.label}.records.jsonl").exists()
    # g's row is g itself: same clean accuracy as evaluating the base model directly
    from robustkit.eval import evaluate
    direct = evaluate(mixed.g, None, x, y, batch_size=8, device="cpu", progress=False)
    assert t.rows[0].clean_acc == direct.clean_accuracy

    d = json.loads(t.save(tmp_path / "t.json").read_text())
    assert d["schema"] == "robustkit.tradeoff" and d["schema_version"] == 1
    for key in ("model", "attack", "attack_config", "norm", "eps", "dataset", "n_examples", "seed", "alphas",
                "rows", "verdict", "command", "provenance", "data", "timing"):
        assert key in d, key
    assert set(d["rows"][0]) >= {"kind", "alpha", "clean_acc", "robust_acc", "result", "seconds"}
    assert Tradeoff.load(tmp_path / "t.json") == t
    png = t.plot(tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1024
    assert "verdict:" in t.summary() and "alpha(x)" in t.summary()

    def no_eval(*args, **kw):
        raise AssertionError("a finished point was evaluated again")

    monkeypatch.setattr(tradeoff_mod, "evaluate", no_eval)
    again = accuracy_tradeoff(mixed, _pgd, "0,0.5,1", x, y, **kwargs)
    assert all(r.reused for r in again.rows)
    assert [(r.clean_acc, r.robust_acc) for r in again.rows] == [(r.clean_acc, r.robust_acc) for r in t.rows]
    with pytest.raises(AssertionError, match="evaluated again"):  # a different seed is a new evaluation
        accuracy_tradeoff(mixed, _pgd, "0,0.5,1", x, y, **{**kwargs, "seed": 2})


def _hold_lock(path):
    """Another process holding ``path``'s flock (as a second `robustkit tradeoff` evaluating that point
    would), returned once it holds it; kill it to release."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_two_processes_share_the_points(mixed, data, tmp_path, monkeypatch):
    """A point whose records another process holds (the same command started on another core) is left
    to it: this process evaluates the rest and says so (exit 3 on the CLI); a re-run once that process
    has ended evaluates only what is missing and writes the usual rows, in the usual order."""

    from robustkit.eval.lock import lock_path
    from robustkit.eval.tradeoff import PointsInProgress

    x, y = data
    pts = tmp_path / "pts"
    pts.mkdir()
    kwargs = dict(points_dir=pts, batch_size=8, device="cpu", seed=1, progress=False,
                  subject=Subject(model="mix", dataset="synthetic"), attack_name="pgd")
    holder = _hold_lock(lock_path(pts / "h.records.jsonl"))
    try:
        evaluated: list[str] = []
        real = tradeoff_mod.evaluate

        def counting(model, *a, **kw):
            evaluated.append(kw["subject"].model)
            return real(model, *a, **kw)

        monkeypatch.setattr(tradeoff_mod, "evaluate", counting)
        with pytest.raises(PointsInProgress, match=r"1 point\(s\) \(h\)") as info:
            accuracy_tradeoff(mixed, _pgd, "0.5", x, y, **kwargs)
        assert info.value.exit_code == 3
        assert evaluated == ["mix:g", "mix:alpha_0.5", "mix"] and not (pts / "h.json").exists()
    finally:
        holder.kill()
        holder.wait()
    evaluated.clear()
    t = accuracy_tradeoff(mixed, _pgd, "0.5", x, y, **kwargs)
    assert evaluated == ["mix:h"]
    assert [r.label for r in t.rows] == ["g", "h", "alpha_0.5", "adaptive"]
    assert [r.reused for r in t.rows] == [True, False, True, True]

    # The other process finishing its point while this one works: that point is taken as finished.
    import shutil

    pts2 = tmp_path / "pts2"
    pts2.mkdir()
    holder = _hold_lock(lock_path(pts2 / "h.records.jsonl"))
    try:
        def finishing(model, *a, **kw):
            if kw["subject"].model == "mix":  # the last point: by now the other process has written h
                shutil.copy(pts / "h.json", pts2 / "h.json")
            return real(model, *a, **kw)

        monkeypatch.setattr(tradeoff_mod, "evaluate", finishing)
        t2 = accuracy_tradeoff(mixed, _pgd, "0.5", x, y, **{**kwargs, "points_dir": pts2})
    finally:
        holder.kill()
        holder.wait()
    assert [r.label for r in t2.rows] == ["g", "h", "alpha_0.5", "adaptive"]
    assert [(r.clean_acc, r.robust_acc) for r in t2.rows] == [(r.clean_acc, r.robust_acc) for r in t.rows]


def test_paired_point_matches_the_adaptive_clean_accuracy_and_tests_robust_flags(mixed, data, tmp_path):
    """``paired``: the extra fixed mixture is the largest alpha (to 1e-4) that classifies at least as
    many images correctly as the adaptive model, and the test counts the discordant images exactly
    (checked here by brute force on the saved points' flags)."""
    x, y = data
    # A mixer whose alpha leans towards g, so the adaptive model sits strictly inside the curve (the
    # shared fixture's constants are restored after: a deep copy would lose its feature hooks).
    model, before = mixed, mixed.config
    model.config = dataclasses.replace(model.config, eval_bias=-1.0)
    try:
        _check_paired(model, x, y, tmp_path)
    finally:
        model.config = before


def _check_paired(model, x, y, tmp_path):
    import math

    from robustkit.eval.tradeoff import matched_alpha

    def correct(m):
        with torch.no_grad():
            return int((m.eval()(x).argmax(1) == y).sum())

    found = matched_alpha(model, x, y, batch_size=8)
    a, target = found["alpha"], correct(model)
    assert found["adaptive_clean_correct"] == target and found["clean_correct"] == correct(model.fixed_alpha(a))
    assert correct(model.fixed_alpha(a)) >= target
    assert 0.0 < a < 1.0  # an inner point here (measured: alpha 0.6464, 15 of 16 correct like the adaptive model)
    assert correct(model.fixed_alpha(a + 2e-4)) < target  # the largest such alpha, to the rounding
    t = accuracy_tradeoff(model, _pgd, "0.5", x, y, paired=True, points_dir=tmp_path, batch_size=8, device="cpu",
                          seed=1, progress=False, subject=Subject(model="mix"), attack_name="pgd")
    p = t.paired
    assert p is not None and p["alpha"] == a
    label = "g" if a == 0 else "h" if a == 1 else f"alpha_{a:.6g}"
    fixed = json.loads((tmp_path / f"{label}.json").read_text())
    adaptive = json.loads((tmp_path / "adaptive.json").read_text())
    pairs = list(zip(fixed["robust_flags"], adaptive["robust_flags"], strict=True))
    assert p["only_adaptive"] == sum(1 for f, ad in pairs if ad == "1" and f == "0")
    assert p["only_fixed"] == sum(1 for f, ad in pairs if f == "1" and ad == "0")
    k, n = min(p["only_adaptive"], p["only_fixed"]), p["only_adaptive"] + p["only_fixed"]
    assert p["p_value"] == pytest.approx(min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0)
    assert "paired:" in t.summary() and Tradeoff.load(t.save(tmp_path / "t.json")).paired == p
    assert t.plot(tmp_path / "t.png").stat().st_size > 1024


def test_an_endpoint_can_be_imported_from_an_existing_evaluation_of_that_base(mixed, data, tmp_path, monkeypatch):
    """``endpoint_results``: h's point is taken from an evaluation of h alone (as the LTD comparison
    already ran it) instead of attacking h again; the row equals the one the trade-off computes itself,
    and an evaluation of another checkpoint, seed, size or a shard is refused, naming what differs."""
    from robustkit.eval import evaluate

    x, y = data
    kw = dict(batch_size=8, device="cpu", seed=1, progress=False)
    own = accuracy_tradeoff(mixed, _pgd, "0.5", x, y, subject=Subject(model="mix", dataset="synthetic"),
                            attack_name="pgd", **kw)
    alone = evaluate(mixed.h, _pgd(), x, y, subject=Subject(model="h_base", checkpoint_sha256="ab" * 32,
                                                            dataset="synthetic"), attack_name="pgd", **kw)
    alone.save(tmp_path / "h.json")
    attacked = []
    real = tradeoff_mod.evaluate
    monkeypatch.setattr(tradeoff_mod, "evaluate", lambda m, *a, **k: attacked.append(m) or real(m, *a, **k))
    t = accuracy_tradeoff(mixed, _pgd, "0.5", x, y, subject=Subject(model="mix", dataset="synthetic"),
                          attack_name="pgd", endpoint_results={"h": (tmp_path / "h.json", "ab" * 32)}, **kw)
    assert mixed.h not in attacked and len(attacked) == 3  # g, alpha 0.5, adaptive
    h = next(r for r in t.rows if r.kind == "h")
    assert h.imported and h.result == str(tmp_path / "h.json") and "imported" in t.summary()
    assert [(r.label, r.clean_acc, r.robust_acc) for r in t.rows] == [
        (r.label, r.clean_acc, r.robust_acc) for r in own.rows]
    assert t.verdict == own.verdict and not t.warnings

    def refused(path, sha="ab" * 32, label="h"):
        with pytest.raises(ConfigError) as e:
            accuracy_tradeoff(mixed, _pgd, "0.5", x, y, subject=Subject(model="mix", dataset="synthetic"),
                              attack_name="pgd", endpoint_results={label: (path, sha)}, **kw)
        return str(e.value)

    assert "differs in: checkpoint" in refused(tmp_path / "h.json", sha="cd" * 32)
    evaluate(mixed.h, _pgd(), x, y, attack_name="pgd", **{**kw, "seed": 2}).save(tmp_path / "seed2.json")
    assert "seed" in refused(tmp_path / "seed2.json", sha=None)
    evaluate(mixed.h, _pgd(), x, y, attack_name="pgd", shard=(0, 2), **kw).save(tmp_path / "part.json")
    assert "number of images" in refused(tmp_path / "part.json", sha=None)
    assert "shard" in refused(tmp_path / "part.json", sha=None)
    assert "no such file" in refused(tmp_path / "none.json")
    assert "g or h" in refused(tmp_path / "h.json", label="adaptive")


def test_check_endpoints_evaluates_mixed_alpha_0_and_1(mixed, data):
    x, y = data
    t = accuracy_tradeoff(mixed, _pgd, [0.0, 1.0], x, y, check_endpoints=True, batch_size=16,
                          device="cpu", progress=False, subject=Subject(model="mix"))
    assert [r.label for r in t.rows] == ["g", "h", "alpha_0", "alpha_1", "adaptive"]
    assert [r.label for r in t.curve_rows()] == ["alpha_0", "alpha_1"]
    assert [c["reference"] for c in t.endpoint_checks] == ["g", "h"]
    assert all(c["clean_flags_equal"] for c in t.endpoint_checks)  # same argmax on every input


def test_refuses_a_plain_model(tiny_model, data):
    x, y = data
    with pytest.raises(ConfigError, match="not a MixedClassifier"):
        accuracy_tradeoff(tiny_model, _pgd, "0.5", x, y, device="cpu", progress=False)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_json_png_and_points(mixed, tmp_path, monkeypatch, capsys):
    from robustkit import models
    from robustkit.models.base import LoadedModel

    monkeypatch.setattr(models, "load_model", lambda name, **kw: LoadedModel(
        mixed, name, "synthetic", 10, None, {"architecture": "adaptive_smoothing"}))
    out_dir = tmp_path / "tr"
    code = main(["tradeoff", "--model", "mix_test", "--alphas", "0.5", "--attack", "pgd", "--attack-arg",
                 "steps=1", "--eps", "2/255", "--n-examples", "8", "--batch-size", "8", "--device", "cpu",
                 "--no-progress", "--out-dir", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads((out_dir / "tradeoff__mix_test__pgd__synthetic-n8-s0.json").read_text())
    assert [r["kind"] for r in d["rows"]] == ["g", "h", "fixed", "adaptive"]
    assert d["command"].startswith("robustkit tradeoff --model mix_test --alphas 0.5 --attack pgd")
    assert "--attack-arg=steps=1" in d["command"] and d["attack_config"]["steps"] == 1
    assert (out_dir / "tradeoff__mix_test__pgd__synthetic-n8-s0.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out_dir / "tradeoff__mix_test__pgd__synthetic-n8-s0.points").glob("*.json")) == [
        "adaptive.json", "alpha_0.5.json", "g.json", "h.json"]
    assert "verdict:" in out


def test_a_point_run_by_eval_in_shards_is_a_point_of_the_tradeoff(mixed, tmp_path, monkeypatch, capsys):
    """``robustkit eval --fixed-alpha A`` evaluates the fixed mixture under the trade-off's name for it;
    run as shards and merged into the points folder, the trade-off takes it as finished (a point too long
    for one session can be spread over several), and its numbers equal the trade-off's own."""
    from robustkit import models
    from robustkit.models.base import LoadedModel

    monkeypatch.setattr(models, "load_model", lambda name, **kw: LoadedModel(
        mixed, name, "synthetic", 10, "ab" * 32, {"architecture": "adaptive_smoothing"}))
    common = ["--model", "mix_test", "--attack", "pgd", "--attack-arg", "steps=1", "--eps", "2/255",
              "--n-examples", "8", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    stem = "tradeoff__mix_test__pgd__synthetic-n8-s0"
    points = tmp_path / "tr" / f"{stem}.points"
    for i in (0, 1):
        assert main(["eval", *common, "--fixed-alpha", "0.5", "--shard", f"{i}/2",
                     "--out", str(tmp_path / f"part{i}.json")]) == 0
    assert main(["merge", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"),
                 "--out", str(points / "alpha_0.5.json")]) == 0
    merged = json.loads((points / "alpha_0.5.json").read_text())
    assert merged["model"] == "mix_test:alpha_0.5"
    capsys.readouterr()
    attacked = []
    real = tradeoff_mod.evaluate
    monkeypatch.setattr(tradeoff_mod, "evaluate", lambda m, *a, **k: attacked.append(k["subject"].model) or real(m, *a, **k))
    assert main(["tradeoff", *common, "--alphas", "0.5", "--out-dir", str(tmp_path / "tr")]) == 0
    assert attacked == ["mix_test:g", "mix_test:h", "mix_test"]  # not alpha 0.5: it was finished
    row = next(r for r in json.loads((tmp_path / "tr" / f"{stem}.json").read_text())["rows"] if r["label"] == "alpha_0.5")
    assert row["reused"] and (row["clean_acc"], row["robust_acc"]) == (merged["clean_accuracy"], merged["robust_accuracy"])
    own = accuracy_tradeoff(mixed, lambda: PGD(ThreatModel("Linf", 2 / 255), steps=1), "0.5", *_first(8),
                            batch_size=8, device="cpu", progress=False, subject=Subject(model="mix_test"))
    assert next(r for r in own.rows if r.label == "alpha_0.5").robust_acc == row["robust_acc"]
    # a model without a mixing network has no fixed mixtures: one line, exit 2
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["eval", "--model", "tiny_cnn.init", "--fixed-alpha", "0.5", "--dataset", "synthetic",
                 "--device", "cpu", "--no-progress", "--n-examples", "4"]) == 2
    assert "not a MixedClassifier" in capsys.readouterr().err


def _first(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    return load_split("synthetic", "test").tensors(n)


@pytest.mark.parametrize("argv,needle", [
    (["--model", "tiny_cnn.init", "--dataset", "synthetic"], "not a MixedClassifier"),
    (["--model", "tiny_cnn.init", "--alphas", "0,2"], "outside [0, 1]"),
    (["--model", "tiny_cnn.init", "--attack", "none"], "needs an attack"),
    (["--model", "tiny_cnn.init", "--endpoint-result", "adaptive=r.json"], "takes g=RESULT or h=RESULT"),
    (["--model", "tiny_cnn.init", "--endpoint-result", "h=a.json", "--endpoint-result", "h=b.json"], "given twice"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code = main(["tradeoff", *argv, "--device", "cpu", "--no-progress"])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("robustkit: error:"), err
    assert needle in lines[0]
