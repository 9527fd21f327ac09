"""The LTD comparison/ablation driver builds its tables from what is on disk (no subprocess here:
every checkpoint and result the driver would produce already exists, so it only reads them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustkit.train import compare


def _ckpt(path: Path, method: str, framework: str, val_clean: float, val_pgd: float, **recipe) -> None:
    meta = {"architecture": "ltd" if method == "ltd" else "small_cnn", "sha256": "ab" * 32,
            "n_parameters": 123, "training": {
                "method": method, "framework": framework, "wall_time_s": 12.0,
                "recipe": {"method": method, **recipe},
                "epochs_log": [{"val_n": 500, "val_clean_acc": 0.1, "val_pgd10_acc": 0.0},
                               {"val_n": 500, "val_clean_acc": val_clean, "val_pgd10_acc": val_pgd}]}}
    path.write_text(json.dumps(meta))


def _result(path: Path, clean: float, robust: float, square_broke: int) -> None:
    stages = [{"name": "clean", "accuracy": clean, "n_broken": 0},
              {"name": "apgd-ce", "accuracy": robust + 0.02, "n_broken": 3},
              {"name": "apgd-t", "accuracy": robust, "n_broken": 1},
              {"name": "fab-t", "accuracy": robust, "n_broken": 0},
              {"name": "square", "accuracy": robust, "n_broken": square_broke}]
    path.write_text(json.dumps({"schema": "robustkit.eval-result", "schema_version": 1, "n_examples": 1000,
                                "clean_accuracy": clean, "robust_accuracy": robust, "stages": stages,
                                "timing": {"total_seconds": 60.0},
                                # per-example flags with exactly these accuracies (first k examples)
                                "clean_flags": "1" * round(1000 * clean) + "0" * (1000 - round(1000 * clean)),
                                "robust_flags": "1" * round(1000 * robust) + "0" * (1000 - round(1000 * robust))}))


def test_ablation_picks_best_holdout_pgd_then_clean(tmp_path: Path) -> None:
    scores = {(0.5, 1.0): (0.40, 0.20), (0.5, 2.0): (0.45, 0.25), (1.0, 1.0): (0.50, 0.25),
              (1.0, 2.0): (0.30, 0.10)}
    for (tt, ts), (c, p) in scores.items():
        _ckpt(tmp_path / f"ltd_tt{tt:g}_ts{ts:g}.json", "ltd", "trades", c, p, tau_t=tt, tau_s=ts)
    assert compare.main(["--ablation", "--tau-t", "0.5,1", "--tau-s", "1,2", "--out-dir", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "ablation.json").read_text())
    # (0.5, 2) and (1, 1) tie on PGD-10 at 25%; the higher clean accuracy (50%) wins.
    assert table["picked"] == {"tau_t": 1.0, "tau_s": 1.0}
    assert [r["holdout_pgd10_acc"] for r in table["rows"]] == [0.20, 0.25, 0.25, 0.10]
    md = (tmp_path / "ablation.md").read_text()
    assert md.count("(picked)") == 1 and "| 1 | 1 | 50.00% | 25.00% **(picked)**" in md


def test_comparison_table_reads_checkpoints_and_results(tmp_path: Path) -> None:
    runs = {"pgd-at": ("pgd-at", "pgd-at", 0.60, 0.30, 0), "pgd-at+ltd": ("ltd", "pgd-at", 0.62, 0.31, 0),
            "trades": ("trades", "trades", 0.55, 0.29, 2), "trades+ltd": ("ltd", "trades", 0.57, 0.32, 0)}
    for name, (method, fw, clean, robust, sq) in runs.items():
        stem = tmp_path / name.replace("+", "_")
        _ckpt(stem.with_suffix(".json"), method, fw, 0, 0, tau_t=0.5, teacher="small_cnn")
        _result(tmp_path / f"{stem.name}__autoattack-n1000.json", clean, robust, sq)
    assert compare.main(["--out-dir", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    rows = {r["run"]: r for r in table["rows"]}
    assert rows["trades+ltd"]["ltd"] and not rows["trades"]["ltd"]
    assert rows["trades"]["square_broke"] == 2 and rows["pgd-at+ltd"]["autoattack_acc"] == 0.31
    md = (tmp_path / "table.md").read_text()
    assert "| trades+ltd | 57.00% | **32.00%** | 34.00% | 0 / 0 |" in md
    assert (tmp_path / "table.png").stat().st_size > 1000
    # paired test: pgd-at+ltd is robust on 310 = pgd-at's 300 plus 10 more, so 10 discordant pairs, all
    # one way: exact two-sided p = 2 / 2**10.
    t = {x["b"]: x for x in table["paired_tests"]}["pgd-at+ltd"]["robust"]
    assert t == {"only_a": 0, "only_b": 10, "p_value": 2 / 2**10}
    assert "flags" not in " ".join(rows["trades"])  # per-example flags stay in the result files


def test_mcnemar_exact_matches_hand_computed_values() -> None:
    assert compare.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pair
    # 3 discordant, split 1 / 2: p = 2 * (C(3,0) + C(3,1)) / 8 = 1, capped at 1
    r = compare.mcnemar_exact([True, False, False, True], [False, True, True, True])
    assert (r["only_a"], r["only_b"], r["p_value"]) == (1, 2, 1.0)
    # 6 discordant all one way: p = 2 / 64
    assert compare.mcnemar_exact([False] * 6, [True] * 6)["p_value"] == 2 / 64


def test_unknown_run_lists_choices(tmp_path: Path) -> None:
    from robustkit.core.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="trades"):
        compare.main(["--runs", "tradez", "--out-dir", str(tmp_path)])
