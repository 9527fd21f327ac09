"""The LTD comparison/ablation driver builds its tables from what is on disk (no subprocess here:
every checkpoint and result the driver would produce already exists, so it only reads them).
Checkpoints live in the work folder, results and tables in the out folder; a table rebuilds from the
out folder alone once the checkpoints are gone."""

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
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    for (tt, ts), (c, p) in scores.items():
        _ckpt(work / f"ltd_tt{tt:g}_ts{ts:g}.json", "ltd", "trades", c, p, tau_t=tt, tau_s=ts)
    argv = ["--ablation", "--tau-t", "0.5,1", "--tau-s", "1,2", "--out-dir", str(out), "--work-dir", str(work)]
    assert compare.main(argv) == 0
    table = json.loads((out / "ablation.json").read_text())
    # (0.5, 2) and (1, 1) tie on PGD-10 at 25%; the higher clean accuracy (50%) wins.
    assert table["picked"] == {"tau_t": 1.0, "tau_s": 1.0}
    assert [r["holdout_pgd10_acc"] for r in table["rows"]] == [0.20, 0.25, 0.25, 0.10]
    assert table["rows"][0]["holdout_curve"][-1] == {"val_n": 500, "val_clean_acc": 0.40, "val_pgd10_acc": 0.20}
    md = (out / "ablation.md").read_text()
    assert md.count("(picked)") == 1 and "| 1 | 1 | 50.00% | 25.00% **(picked)**" in md
    assert sorted(f.name for f in out.iterdir()) == ["ablation.json", "ablation.md"]  # no checkpoint here

    # without the checkpoints the committed rows are reused (no training), giving the same table
    for f in work.iterdir():
        f.unlink()
    assert compare.main(argv) == 0
    assert json.loads((out / "ablation.json").read_text())["rows"] == table["rows"]


def test_comparison_table_reads_checkpoints_and_results(tmp_path: Path) -> None:
    runs = {"pgd-at": ("pgd-at", "pgd-at", 0.60, 0.30, 0), "pgd-at+ltd": ("ltd", "pgd-at", 0.62, 0.31, 0),
            "trades": ("trades", "trades", 0.55, 0.29, 2), "trades+ltd": ("ltd", "trades", 0.57, 0.32, 0)}
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    for name, (method, fw, clean, robust, sq) in runs.items():
        stem = work / name.replace("+", "_")
        _ckpt(stem.with_suffix(".json"), method, fw, 0, 0, tau_t=0.5, teacher="small_cnn")
        # the name `robustkit eval` gives a result, in the out folder
        _result(out / f"{stem.name}__autoattack__cifar10-n1000-s0.json", clean, robust, sq)
    assert compare.main(["--out-dir", str(out), "--work-dir", str(work)]) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {r["run"]: r for r in table["rows"]}
    assert rows["trades+ltd"]["ltd"] and not rows["trades"]["ltd"]
    assert rows["trades"]["square_broke"] == 2 and rows["pgd-at+ltd"]["autoattack_acc"] == 0.31
    assert rows["trades"]["train_wall_s"] == 12.0 and len(rows["trades"]["val_curve"]) == 2
    md = (out / "table.md").read_text()
    assert "| trades+ltd | 57.00% | **32.00%** | 34.00% | 0 / 0 |" in md
    assert (out / "table.png").stat().st_size > 1000
    # paired test: pgd-at+ltd is robust on 310 = pgd-at's 300 plus 10 more, so 10 discordant pairs, all
    # one way: exact two-sided p = 2 / 2**10.
    t = {x["b"]: x for x in table["paired_tests"]}["pgd-at+ltd"]["robust"]
    assert t == {"only_a": 0, "only_b": 10, "p_value": 2 / 2**10}
    assert "flags" not in " ".join(rows["trades"])  # per-example flags stay in the result files

    # the checkpoints gone (they are never committed), the table rebuilds from table.json + results
    for f in work.iterdir():
        f.unlink()
    assert compare.main(["--out-dir", str(out), "--work-dir", str(work)]) == 0
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]
    # One process per core, each given its own --runs: neither overwrites the other's rows, and the
    # table says how to reproduce all of them.
    assert compare.main(["--out-dir", str(out), "--work-dir", str(work), "--runs", "trades+ltd"]) == 0
    again = json.loads((out / "table.json").read_text())
    assert again["rows"] == table["rows"] and again["paired_tests"] == table["paired_tests"]
    assert "--runs" not in again["command"] and "--runs" not in (out / "table.md").read_text()


def test_comparison_on_another_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--dataset fashion_mnist``: every run gets that data, threat and augmentation, LTD also its
    teacher; results are named and tables labelled for it, and an unknown dataset is a one-line error."""
    from robustkit.core.errors import UnknownNameError

    trained: dict[str, list[str]] = {}

    def train(trainer: str, recipe: str, overrides: list[str], stem: Path, args: object, log: Path) -> None:
        trained[stem.name] = overrides
        _ckpt(stem.parent / (stem.name + ".json"), "ltd" if trainer == "ltd" else "pgd-at", "pgd-at", 0, 0)

    def run(cmd: list[str], log: Path) -> None:
        assert cmd[cmd.index("--dataset") + 1] == "fashion_mnist" and cmd[cmd.index("--threads") + 1] == "1"
        _result(Path(cmd[cmd.index("--out") + 1]), 0.80, 0.60 if "ltd" in cmd[cmd.index("--model") + 1] else 0.55, 0)

    monkeypatch.setattr(compare, "_train", train)
    monkeypatch.setattr(compare, "_run", run)
    monkeypatch.setitem(compare.DATASETS["fashion_mnist"], "shipped", {})  # train both (shipped runs: below)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    argv = ["--dataset", "fashion_mnist", "--runs", "pgd-at,pgd-at+ltd", "--out-dir", str(out), "--work-dir", str(work)]
    monkeypatch.setattr(compare, "_run", lambda cmd, log: pytest.fail("--train-only evaluated"))
    assert compare.main([*argv, "--train-only"]) == 0 and len(trained) == 2
    assert list(out.glob("*.json")) == []
    monkeypatch.setattr(compare, "_run", run)
    assert compare.main([*argv, "--threads", "1"]) == 0  # evaluates the two trained runs, trains nothing more
    assert len(trained) == 2
    common = ["dataset=fashion_mnist", "eps=0.1", "crop_pad=2", "holdout=1000"]
    assert trained == {"pgd-at": common,
                       "pgd-at_ltd": ["framework=pgd_at", *common, "teacher=small_cnn.fashion_mnist_partial"]}
    assert sorted(f.name for f in out.glob("*.json")) == [
        "pgd-at__autoattack__fashion_mnist-n1000-s0.json", "pgd-at_ltd__autoattack__fashion_mnist-n1000-s0.json",
        "table.json"]
    table = json.loads((out / "table.json").read_text())
    assert table["dataset"] == "fashion_mnist" and table["paired_tests"][0]["robust"]["only_b"] == 50
    assert "Linf 0.1, first 1000 real Fashion-MNIST test images" in (out / "table.md").read_text()
    with pytest.raises(UnknownNameError, match="fashion_mnist"):
        compare.main(["--dataset", "fashion-mnist", "--out-dir", str(out)])


@pytest.mark.parametrize("dataset", sorted(compare.DATASETS))
def test_every_dataset_resolves_to_valid_configs_that_differ_only_in_the_framework(dataset: str) -> None:
    """Each run's recipe plus the dataset's shared overrides is a config its trainer accepts (a field a
    trainer lacks, e.g. a misspelt ``flip``, fails here, not an hour into the comparison), with the
    dataset's data and threat; and the LTD runs add nothing but the teacher and the framework."""
    from robustkit.core.config import config_to_dict, read_recipe, resolve_config
    from robustkit.core.threat import parse_eps
    from robustkit.train.base import get_trainer

    configs = {}
    for run, (trainer, recipe, extra) in compare.RUNS.items():
        _, fields = read_recipe(compare.RECIPES / recipe)
        config = resolve_config(get_trainer(trainer).config, recipe=fields,
                                overrides=[*extra, *compare._dataset_overrides(dataset, trainer)])
        assert config.dataset == dataset
        assert parse_eps(str(config.eps)) == pytest.approx(parse_eps(compare.DATASETS[dataset]["eps"]))
        configs[run] = config_to_dict(config)
    shared = ("dataset", "eps", "epochs", "steps", "crop_pad", "flip", "holdout", "eps_warmup", "batch_size",
              "lr_max", "arch", "arch_args", "seed")
    for key in shared:
        assert len({json.dumps(c[key]) for c in configs.values()}) == 1, f"{dataset}: runs differ in {key}"


def test_comparison_refuses_a_result_without_training_facts(tmp_path: Path) -> None:
    from robustkit.core.errors import DataError

    _result(tmp_path / "trades__autoattack__cifar10-n1000-s0.json", 0.5, 0.2, 0)
    with pytest.raises(DataError, match="training facts"):
        compare.main(["--runs", "trades", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")])


def test_committed_log_shows_no_machine_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    monkeypatch.chdir(tmp_path)
    cmd = [sys.executable, "-m", "robustkit", "--recipe", str(tmp_path / "defenses" / "x.toml"), "/elsewhere/y"]
    assert compare._shown(cmd) == "python -m robustkit --recipe defenses/x.toml /elsewhere/y"
    # the command's own output too (a warning names its source file by absolute path)
    log = tmp_path / "log.txt"
    compare._run([sys.executable, "-c", f"print({str(tmp_path / 'robustkit' / 'w.py')!r} + ': UserWarning')"], log)
    assert log.read_text().splitlines()[1] == "robustkit/w.py: UserWarning"


@pytest.mark.parametrize("n, k", [(1001, 470), (1500, 700), (6000, 2900)])
def test_mcnemar_exact_on_thousands_of_discordant_pairs(n: int, k: int) -> None:
    """Pooled seeds of 7,000 test images give thousands of discordant pairs: 2.0**n overflows a float,
    so the large-n branch (log space) must agree with exact integer arithmetic."""
    import math
    from fractions import Fraction

    exact = min(Fraction(1), Fraction(2 * sum(math.comb(n, i) for i in range(k + 1)), 2**n))
    r = compare.mcnemar_exact([True] * (n - k) + [False] * k, [False] * (n - k) + [True] * k)
    assert (r["only_a"], r["only_b"]) == (n - k, k)
    assert r["p_value"] == pytest.approx(float(exact), rel=1e-9)


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


def test_runs_train_through_the_trainer_registry(tmp_path: Path, one_thread: None) -> None:
    """A comparison run is the registered trainer with its recipe plus the run's and the shared
    overrides (here the LTD run on PGD-AT, shrunk to seconds on synthetic data), and the table reads
    the facts of the checkpoint that writes (trainer and config, not the pre-registry recipe block)."""
    import argparse

    trainer, recipe, extra = compare.RUNS["pgd-at+ltd"]
    shared = ["--epochs", "1", "--dataset", "synthetic", "--arch", "tiny_cnn", "--n-train", "32", "--n-test", "8",
              "--batch-size", "16", "--steps", "1", "--val-pgd-n", "4", "--teacher", "tiny_cnn.init"]
    args = argparse.Namespace(threads=None, device="cpu", data_dir=None, no_progress=True)
    stem, log = tmp_path / "pgd-at_ltd", tmp_path / "log.txt"
    compare._train(trainer, recipe, [*extra, "arch_args={}", *compare._overrides(shared)], stem, args, log)
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["trainer"] == "ltd" and meta["config"]["framework"] == "pgd_at" and meta["config"]["epochs"] == 1
    assert meta["config"]["tau_t"] == 0.5 and meta["config"]["steps"] == 1  # the recipe's, then the overrides
    facts = compare._checkpoint_facts(stem.with_suffix(".json"))
    assert facts["ltd"] and facts["framework"] == "pgd-at" and facts["tau_s"] == 2.0
    assert facts["teacher"] == "tiny_cnn.init" and len(facts["val_curve"]) == 1
    assert log.read_text().startswith("$ robustkit train ltd --recipe defenses/ltd.toml --set framework=pgd_at")


def test_a_resumed_run_counts_the_training_time_of_its_earlier_processes():
    from robustkit.core.provenance import total_wall_s

    # Trained in three processes: epochs 1-2, 3-4 (resumed after 2), 5 (resumed after 4); the last
    # process measured 50 s of wall time (its epoch and the final measurement).
    logs = [{"epoch": 1, "seconds": 10.0, "val_seconds": 1.0}, {"epoch": 2, "seconds": 12.0, "val_seconds": 1.0},
            {"epoch": 3, "seconds": 20.0, "resumed_from_epoch": 2}, {"epoch": 4, "seconds": 22.0, "val_seconds": 2.0},
            {"epoch": 5, "seconds": 30.0, "resumed_from_epoch": 4}]
    assert total_wall_s({"wall_time_s": 50.0, "epochs_log": logs}) == 50.0 + 11 + 13 + 20 + 24
    assert total_wall_s({"wall_time_s": 50.0, "epochs_log": logs[:2]}) == 50.0  # never resumed
    assert total_wall_s({"epochs_log": logs}) is None


def test_a_shipped_run_is_evaluated_not_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clone (no work folder), a run the dataset maps to a shipped model is evaluated by its
    registered id, with the shipped file's training facts, instead of being retrained (a retrain is not
    bit-identical); a run without a shipped model still trains."""
    from robustkit.models.base import WEIGHTS_DIR

    evaluated: list[str] = []

    def run(cmd: list[str], log: Path) -> None:
        evaluated.append(cmd[cmd.index("--model") + 1])
        _result(Path(cmd[cmd.index("--out") + 1]), 0.99, 0.90, 0)

    monkeypatch.setattr(compare, "_run", run)
    monkeypatch.setattr(compare, "_train", lambda *a, **k: pytest.fail("a shipped run was retrained"))
    out = tmp_path / "out"
    assert compare.main(["--dataset", "mnist", "--runs", "pgd-at,trades", "--out-dir", str(out),
                         "--work-dir", str(tmp_path / "work")]) == 0
    assert evaluated == ["small_cnn.mnist_pgd_at", "small_cnn.mnist_trades"]
    rows = json.loads((out / "table.json").read_text())["rows"]
    shipped = json.loads((WEIGHTS_DIR / "small_cnn.mnist_pgd_at.json").read_text())
    assert rows[0]["checkpoint"] == "small_cnn.mnist_pgd_at.safetensors"
    assert rows[0]["checkpoint_sha256"] == shipped["sha256"] and rows[0]["val_curve"]

    trained: list[str] = []

    def train(trainer: str, recipe: str, overrides: list[str], stem: Path, args: object, log: Path) -> None:
        trained.append(stem.name)
        _ckpt(stem.parent / (stem.name + ".json"), "ltd", "pgd-at", 0, 0)

    monkeypatch.setattr(compare, "_train", train)
    unmapped = {k: v for k, v in compare.DATASETS["mnist"]["shipped"].items() if k != "pgd-at+ltd"}
    monkeypatch.setitem(compare.DATASETS["mnist"], "shipped", unmapped)  # as if pgd-at+ltd were not shipped
    assert compare.main(["--dataset", "mnist", "--runs", "pgd-at+ltd", "--out-dir", str(out),
                         "--work-dir", str(tmp_path / "work")]) == 0
    assert trained == ["pgd-at_ltd"] and evaluated[-1].endswith("pgd-at_ltd.safetensors")


@pytest.mark.parametrize("dataset, run", [(d, r) for d in sorted(compare.DATASETS)
                                          for r in sorted(compare.DATASETS[d].get("shipped", {}))])
def test_a_shipped_run_was_trained_by_the_comparisons_own_config(dataset: str, run: str) -> None:
    """The shipped file that stands in for a run recorded exactly the config the comparison would train
    it with (recipe, run and dataset overrides): it is that run, not a look-alike."""
    from robustkit.core.config import config_to_dict, read_recipe, resolve_config
    from robustkit.models.base import WEIGHTS_DIR
    from robustkit.train.base import get_trainer

    trainer, recipe, extra = compare.RUNS[run]
    _, fields = read_recipe(compare.RECIPES / recipe)
    config = resolve_config(get_trainer(trainer).config, recipe=fields,
                            overrides=[*extra, *compare._dataset_overrides(dataset, trainer)])
    shipped = json.loads((WEIGHTS_DIR / f"{compare.DATASETS[dataset]['shipped'][run]}.json").read_text())
    assert shipped["trainer"] == trainer and shipped["config"] == json.loads(json.dumps(config_to_dict(config)))
