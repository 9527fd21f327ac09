"""The regression gate: baselines, exact and paired comparison, planted regressions, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from robustkit.attacks import attack_from_config, create_attack
from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.eval.regress import compare, create_baseline, load_baseline, mcnemar_p_value

N = 64


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def result_json(tiny_checkpoint, tmp_path_factory) -> Path:
    """One real evaluation of the tiny model (PGD, 5 steps, eps 4/255: about half the examples break)."""
    out = tmp_path_factory.mktemp("regress") / "tiny_pgd.json"
    code = main(["eval", "--model", str(tiny_checkpoint), "--dataset", "synthetic", "--attack", "pgd",
                 "--attack-arg", "steps=5", "--eps", "4/255", "--n-examples", str(N), "--batch-size", "32",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture
def baseline(result_json, tmp_path) -> Path:
    path = tmp_path / "baselines" / "tiny_pgd.json"
    create_baseline(result_json, path)
    return path


def edit(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=2))


def plant_robust(path: Path, k: int) -> None:
    """Make the baseline claim k more robust examples (clean-correct ones the attack breaks)."""
    def fn(d):
        r = d["result"]
        flags = list(r["robust_flags"])
        pairs = enumerate(zip(r["clean_flags"], flags, strict=True))
        idx = [i for i, (c, f) in pairs if c == "1" and f == "0"]
        assert len(idx) >= k, "the tiny model should leave enough broken examples to plant"
        for i in idx[:k]:
            flags[i] = "1"
        r["robust_flags"] = "".join(flags)
        r["robust_accuracy"] = r["robust_flags"].count("1") / r["n_examples"]
    edit(path, fn)


# --------------------------------------------------------------------------- baseline files


def test_from_result_creates_loadable_baseline(capsys, result_json, tmp_path):
    path = tmp_path / "b.json"
    code, out, err = run_main(capsys, "regress", path, "--from-result", result_json, "--significance", "0.01")
    assert code == 0, err
    assert "wrote baseline" in out
    d = json.loads(path.read_text())
    assert list(d) == ["schema", "schema_version", "tolerance", "command", "result"]
    assert d["schema"] == "robustkit.baseline" and d["schema_version"] == 1
    assert d["tolerance"] == {"mode": "auto", "alpha": 0.01}
    assert d["command"].startswith("robustkit eval ") and "--attack-arg steps=5" in d["command"]
    assert d["result"] == json.loads(result_json.read_text())
    b = load_baseline(path)
    assert b.mode == "auto" and b.alpha == 0.01 and b.result.n_examples == N


def test_from_result_needs_one_path(capsys, result_json, tmp_path):
    code, _, err = run_main(capsys, "regress", tmp_path / "a.json", tmp_path / "b.json",
                            "--from-result", result_json)
    assert code == 2 and "exactly one PATH" in err


def test_attack_config_round_trips():
    cases = [("pgd", {"steps": 7, "loss": "margin"}), ("fgsm", {"random_start": True}), ("apgd-ce", {}),
             ("autoattack", {})]
    for name, kw in cases:
        a = create_attack(name, norm="Linf", eps="8/255", **kw)
        cfg = json.loads(json.dumps(a.config()))
        assert attack_from_config(cfg).config() == a.config()
    with pytest.raises(ConfigError, match="round-trip"):
        attack_from_config({**create_attack("pgd", eps=0.1).config(), "steps": 3, "step_size": None})


# --------------------------------------------------------------------------- the gate on real re-runs


def test_unchanged_model_is_ok(capsys, baseline):
    before = baseline.read_text()
    code, out, err = run_main(capsys, "regress", baseline.parent, "--no-progress")
    assert code == 0, out + err
    row = [ln for ln in out.splitlines() if ln.startswith("tiny_pgd")]
    assert len(row) == 1 and row[0].split()[-1] == "ok" and "exact" in row[0] and "-0/+0" in row[0]
    assert baseline.read_text() == before  # a plain run never writes


def test_planted_regression_fails_exact(capsys, baseline):
    plant_robust(baseline, 3)
    code, out, err = run_main(capsys, "regress", baseline, "--no-progress")
    assert code == 1, out + err
    row = next(ln for ln in out.splitlines() if ln.startswith("tiny_pgd"))
    assert "REGRESSION" in row and "-3/+0" in row and "exact" in row
    assert f"robustkit regress --update {baseline}" in out
    assert "3 example(s) robust in the baseline are broken now" in out


def test_exact_gain_is_changed(capsys, baseline):
    def lose_one(d):  # the baseline claims one robust example fewer: the re-run "gains" it
        r = d["result"]
        i = r["robust_flags"].index("1")
        r["robust_flags"] = r["robust_flags"][:i] + "0" + r["robust_flags"][i + 1:]
    edit(baseline, lose_one)
    code, out, _ = run_main(capsys, "regress", baseline, "--no-progress")
    assert code == 1
    assert "CHANGED" in out and "-0/+1" in out


def test_paired_small_drop_is_noise_big_drop_fails(capsys, baseline, tmp_path):
    # auto picks paired when the baseline ran on a GPU
    small = tmp_path / "small.json"
    shutil.copy(baseline, small)
    plant_robust(small, 2)
    edit(small, lambda d: d["result"]["provenance"].update(device="cuda:0 (NVIDIA H200)"))
    code, out, err = run_main(capsys, "regress", small, "--no-progress")
    assert code == 0, out + err
    assert "ok (within noise)" in out and "p=0.25" in out and "-2/+0" in out

    big = tmp_path / "big.json"
    shutil.copy(baseline, big)
    plant_robust(big, 12)
    code, out, _ = run_main(capsys, "regress", big, "--tolerance", "paired", "--no-progress")
    assert code == 1
    assert "REGRESSION" in out and "-12/+0" in out and f"p={2**-12:.4g}" in out


def test_update_accepts_the_change(capsys, baseline):
    plant_robust(baseline, 3)
    edit(baseline, lambda d: d.update(tolerance={"mode": "paired", "alpha": 0.2}, command="robustkit eval X"))
    code, out, _ = run_main(capsys, "regress", "--update", baseline, "--no-progress", "--tolerance", "exact")
    assert code == 0
    assert "REGRESSION" in out and "updated" in out
    b = load_baseline(baseline)
    assert (b.mode, b.alpha, b.command) == ("paired", 0.2, "robustkit eval X")  # settings kept
    code, out, _ = run_main(capsys, "regress", baseline, "--no-progress", "--tolerance", "exact")
    assert code == 0 and "-0/+0" in out


# --------------------------------------------------------------------------- statistics (no re-runs)


def test_mcnemar_known_values():
    assert mcnemar_p_value(10, 0) == 1 / 1024
    assert mcnemar_p_value(0, 0) == 1.0 and mcnemar_p_value(0, 7) == 1.0
    assert mcnemar_p_value(1, 0) == 0.5
    assert mcnemar_p_value(3, 1) == pytest.approx(5 / 16)
    assert mcnemar_p_value(8, 2) == pytest.approx(56 / 1024)
    for b in range(1, 30):
        assert mcnemar_p_value(b, b) >= 0.5
    assert 0 < mcnemar_p_value(2000, 1000) < 1e-30  # big counts stay exact, no overflow
    with pytest.raises(ValueError):
        mcnemar_p_value(-1, 0)


def test_compare_paired_clean_drop_and_mismatch(baseline):
    b = load_baseline(baseline)
    r = b.result
    clean = r.clean_flags.replace("1", "0", 10)  # 10 examples misclassified now (and so not robust)
    robust = "".join("0" if c == "0" else f for c, f in zip(clean, r.robust_flags, strict=True))
    now = dataclasses.replace(r, clean_flags=clean, robust_flags=robust)
    cmp = compare(b, now, mode="paired", alpha=0.05)
    assert cmp.verdict == "REGRESSION" and cmp.clean_lost == 10 and "clean accuracy dropped" in cmp.reason
    assert compare(b, dataclasses.replace(r), mode="paired").verdict == "ok"
    shorter = dataclasses.replace(r, n_examples=N - 1, clean_flags=r.clean_flags[:-1],
                                  robust_flags=r.robust_flags[:-1])
    assert compare(b, shorter).verdict == "MISMATCH"
    assert compare(b, dataclasses.replace(r, robust_flags=None)).verdict == "MISMATCH"


# --------------------------------------------------------------------------- bad input: exit 2


def assert_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustkit: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_path_and_empty_folder(capsys, tmp_path):
    assert_error(*run_main(capsys, "regress", tmp_path / "nope.json")[::2], "not found", "nope.json")
    (tmp_path / "empty").mkdir()
    assert_error(*run_main(capsys, "regress", tmp_path / "empty")[::2], "no baseline files", "empty")


@pytest.mark.parametrize("mutate, needles", [
    (lambda p: p.write_text("{not json"), ["malformed JSON"]),
    (lambda p: edit(p, lambda d: d.pop("result")), ["field 'result' is missing"]),
    (lambda p: edit(p, lambda d: d.update(schema="robustkit.eval-result")), ["field 'schema'"]),
    (lambda p: edit(p, lambda d: d["tolerance"].update(mode="fuzzy")), ["tolerance.mode", "fuzzy"]),
    (lambda p: edit(p, lambda d: d["tolerance"].update(alpha=1.5)), ["tolerance.alpha", "1.5"]),
    (lambda p: edit(p, lambda d: d["tolerance"].pop("alpha")), ["tolerance.alpha", "missing"]),
    (lambda p: edit(p, lambda d: d["result"].update(robust_flags=None)), ["'result.robust_flags'", "clean-only"]),
    (lambda p: edit(p, lambda d: d["result"].update(seed="0")), ["'result.seed'", "int"]),
    (lambda p: edit(p, lambda d: d["result"].update(clean_flags="01")), ["'result.clean_flags'", "64"]),
])
def test_malformed_baseline(capsys, baseline, mutate, needles):
    mutate(baseline)
    with pytest.raises(ConfigError):
        load_baseline(baseline)
    assert_error(*run_main(capsys, "regress", baseline, "--no-progress")[::2], str(baseline), *needles)


def test_data_fingerprint_mismatch(capsys, baseline):
    edit(baseline, lambda d: d["result"]["data"].update(fingerprint="0" * 64))
    assert_error(*run_main(capsys, "regress", baseline, "--no-progress")[::2], str(baseline),
                 "fingerprint differs", "different images")


def test_unknown_model(capsys, baseline):
    edit(baseline, lambda d: d["result"].update(model="tiny_cnnn"))
    assert_error(*run_main(capsys, "regress", baseline, "--no-progress")[::2], str(baseline),
                 "unknown model", "tiny_cnn")


def test_bad_alpha_option(capsys, baseline):
    assert_error(*run_main(capsys, "regress", baseline, "--significance", "0")[::2], "--significance")


def test_exact_clean_loss_is_a_regression(capsys, baseline):
    def claim_one_more_correct(d):  # the baseline says one more example was classified correctly
        r = d["result"]
        i = r["clean_flags"].index("0")
        r["clean_flags"] = r["clean_flags"][:i] + "1" + r["clean_flags"][i + 1:]
    edit(baseline, claim_one_more_correct)
    code, out, _ = run_main(capsys, "regress", baseline, "--no-progress")
    assert code == 1
    assert "REGRESSION" in out and "1 example(s) correct in the baseline are misclassified now" in out
