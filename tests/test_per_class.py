"""Per-class accuracy and many/medium/few-shot groups in every evaluation result (issue 15, item 1)."""

from __future__ import annotations

import json

import pytest
import torch

from robustkit.attacks import create_attack
from robustkit.core.checkpoint import save_checkpoint
from robustkit.data import dataset_info
from robustkit.eval import Subject, evaluate
from robustkit.eval.per_class import FEW_SHOT_BELOW, MANY_SHOT_ABOVE, per_class_report, result_per_class
from robustkit.eval.regress import _result_from_file
from robustkit.eval.results import EvalResult
from robustkit.models import load_model


def _brute_force(y: list[int], flags: list[bool], num_classes: int) -> list[float | None]:
    out: list[float | None] = []
    for c in range(num_classes):
        hits = [f for label, f in zip(y, flags, strict=True) if label == c]
        out.append(sum(hits) / len(hits) if hits else None)
    return out


def test_report_matches_a_python_loop_on_random_flags():
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 7, (400,), generator=gen)
    y[y == 4] = 5  # class 4 absent from the test set
    clean = torch.rand(400, generator=gen) < 0.7
    robust = clean & (torch.rand(400, generator=gen) < 0.5)
    rep = per_class_report(y, clean, robust, 7)
    yl, cl, rl = y.tolist(), clean.tolist(), robust.tolist()
    assert rep["classes"] == list(range(7))
    assert rep["n"] == [yl.count(c) for c in range(7)] and rep["n"][4] == 0
    for got, want in ((rep["clean_acc"], _brute_force(yl, cl, 7)), (rep["robust_acc"], _brute_force(yl, rl, 7))):
        assert [g is None for g in got] == [w is None for w in want] and got[4] is None
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None])
    present = [a for a in _brute_force(yl, cl, 7) if a is not None]
    assert rep["balanced_clean_acc"] == pytest.approx(sum(present) / 6)
    assert rep["groups"] is None and rep["train_counts"] is None
    json.dumps(rep, allow_nan=False)  # no NaN anywhere: an absent class is None
    clean_only = per_class_report(yl, cl, None, 7, class_names=list("abcdefg"))
    assert clean_only["robust_acc"] is None and clean_only["balanced_robust_acc"] is None
    assert clean_only["classes"] == list("abcdefg") and clean_only["clean_acc"] == rep["clean_acc"]


def test_groups_split_at_100_and_20_and_pool_their_test_examples():
    assert (MANY_SHOT_ABOVE, FEW_SHOT_BELOW) == (100, 20)
    counts = [101, 100, 20, 19, 0, 5000]
    y = [0, 0, 1, 2, 2, 2, 3, 5, 5, 5]  # class 4 (few) has no test example
    clean = [1, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    robust = [0, 0, 1, 1, 0, 0, 0, 1, 0, 0]
    rep = per_class_report(y, clean, robust, 6, train_counts=counts)
    g = rep["groups"]
    assert [g[k]["classes"] for k in ("many", "medium", "few")] == [[0, 5], [1, 2], [3, 4]]
    assert [g[k]["n"] for k in ("many", "medium", "few")] == [5, 4, 1]
    assert (g["many"]["clean_acc"], g["many"]["robust_acc"]) == pytest.approx((4 / 5, 1 / 5))
    assert (g["medium"]["clean_acc"], g["medium"]["robust_acc"]) == pytest.approx((3 / 4, 2 / 4))
    assert (g["few"]["clean_acc"], g["few"]["robust_acc"]) == (0.0, 0.0)
    assert rep["train_counts"] == counts and "100" in rep["group_rule"] and "20" in rep["group_rule"]
    empty = per_class_report([0, 1], [1, 1], None, 2, train_counts=[500, 500])["groups"]
    assert empty["few"] == {"classes": [], "n": 0, "clean_acc": None, "robust_acc": None}


def test_counts_that_do_not_fit_the_model_are_dropped_with_a_warning():
    with pytest.raises(ValueError, match="3 training class counts for 2 classes"):
        per_class_report([0, 1], [1, 0], None, 2, train_counts=[1, 2, 3])
    rep, notes = result_per_class(torch.tensor([0, 1]), [True, False], None, 2, None, [1, 2, 3])
    assert rep["groups"] is None and rep["train_counts"] is None and len(notes) == 1 and "2 classes" in notes[0]
    rep, notes = result_per_class(torch.tensor([0, 1]), [True, False], None, 2, "synthetic", [30, 10])
    assert notes == [] and rep["groups"]["few"]["classes"] == [1]
    assert rep["classes"] == [0, 1]  # synthetic's 10 names do not describe a 2-class model


def _assert_consistent(r: EvalResult, y: torch.Tensor) -> None:
    pc = r.per_class
    assert pc["n"] == torch.bincount(y, minlength=10).tolist()
    assert pc["classes"] == list(dataset_info("synthetic").classes)
    for acc, overall in ((pc["clean_acc"], r.clean_accuracy), (pc["robust_acc"], r.robust_accuracy)):
        assert sum(k * a for k, a in zip(pc["n"], acc, strict=True) if k) / len(y) == pytest.approx(overall)


def test_evaluate_records_per_class_clean_and_robust(one_thread, tiny_model, synthetic_test):
    x, y = synthetic_test[0][:48], synthetic_test[1][:48]
    subject = Subject(model="tiny", dataset="synthetic")
    clean = evaluate(tiny_model, None, x, y, subject=subject, device="cpu", batch_size=24, progress=False)
    assert clean.per_class["robust_acc"] is None and clean.per_class["groups"] is None
    attack = create_attack("pgd", eps="8/255", dataset="synthetic", steps=2)
    r = evaluate(tiny_model, attack, x, y, subject=subject, device="cpu", batch_size=24, progress=False)
    _assert_consistent(r, y)
    assert r.per_class["clean_acc"] == clean.per_class["clean_acc"]
    assert r.robust_accuracy < r.clean_accuracy  # the attack has work, so robust per-class is not a copy
    assert "balanced accuracy: clean" in r.summary() and "robust accuracy" in r.summary()


def test_checkpoint_class_counts_give_groups(one_thread, tiny_model, synthetic_test, tmp_path):
    counts = [500, 400, 300, 101, 100, 60, 20, 19, 5, 1]
    path = tmp_path / "lt.safetensors"
    save_checkpoint(tiny_model, path, architecture="tiny_cnn", dataset="synthetic", num_classes=10,
                    training={"data": {"class_counts": counts, "profile": "exp:500"}})
    subject = Subject.from_loaded(load_model(str(path)), dataset="synthetic")
    assert subject.model_info["train_class_counts"] == counts
    x, y = synthetic_test[0][:40], synthetic_test[1][:40]
    attack = create_attack("pgd", eps="8/255", dataset="synthetic", steps=2)
    r = evaluate(tiny_model, attack, x, y, subject=subject, device="cpu", batch_size=40, progress=False)
    _assert_consistent(r, y)
    groups = r.per_class["groups"]
    assert [groups[k]["classes"] for k in ("many", "medium", "few")] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    few = (y >= 7)
    assert groups["few"]["n"] == int(few.sum())
    flags = torch.tensor([c == "1" for c in r.clean_flags])
    assert groups["few"]["clean_acc"] == pytest.approx(float(flags[few].float().mean()))
    assert r.per_class["train_counts"] == counts and r.warnings == []
    summary = r.summary()
    assert all(f"\n{k} " in summary for k in ("many", "medium", "few"))
    saved = r.save(tmp_path / "r.json")
    assert EvalResult.load(saved).per_class == r.per_class
    assert _result_from_file(saved).per_class == r.per_class  # the regression gate reads it too


def test_counts_of_another_label_space_are_a_warning_not_groups(one_thread, tiny_model, synthetic_test, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_checkpoint(tiny_model, path, architecture="tiny_cnn", dataset="synthetic", num_classes=10,
                    training={"data": {"class_counts": [50, 5]}})
    subject = Subject.from_loaded(load_model(str(path)), dataset="synthetic")
    x, y = synthetic_test[0][:16], synthetic_test[1][:16]
    with pytest.warns(UserWarning, match="training class counts"):
        r = evaluate(tiny_model, None, x, y, subject=subject, device="cpu", progress=False)
    assert r.per_class["groups"] is None and any("training class counts" in w for w in r.warnings)
    for bad in ({"data": {"class_counts": [1.5, 2]}}, {"data": {"class_counts": "10,20"}}, {"data": [1]}, None):
        meta = {"architecture": "tiny_cnn", **({"training": bad} if bad is not None else {})}
        loaded = load_model(str(path))
        loaded.metadata.clear()
        loaded.metadata.update(meta)
        assert "train_class_counts" not in Subject.from_loaded(loaded, dataset="synthetic").model_info


def test_a_result_written_before_per_class_still_loads(one_thread, tiny_model, synthetic_test, tmp_path):
    x, y = synthetic_test[0][:8], synthetic_test[1][:8]
    attack = create_attack("pgd", eps="8/255", dataset="synthetic", steps=1)
    r = evaluate(tiny_model, attack, x, y, subject=Subject(dataset="synthetic"), device="cpu", progress=False)
    d = r.to_dict()
    del d["per_class"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    loaded = EvalResult.load(old)
    assert loaded.per_class is None and loaded.clean_flags == r.clean_flags
    assert _result_from_file(old).per_class is None
    assert "balanced" not in loaded.summary() and "clean accuracy" in loaded.summary()
