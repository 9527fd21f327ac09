"""A records file fails closed: a tampered or corrupt batch is recomputed (or the run refuses,
naming the line), never trusted and never dropped together with the good batches after it; the
result, its budget section included, is a function of the records whatever the run's history."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from robustkit import create_attack, evaluate
from robustkit.core.errors import ConfigError
from robustkit.eval.record_check import batch_checksum

EPS = 8 / 255
N, BS = 48, 8


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    x, y = load_split("synthetic", "test").tensors()
    return x[:N], y[:N]


def _run(model, data, path: Path, **kw: Any):
    """The evaluation every test resumes (a short PGD: a clean stage, then one attack stage)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate(model, create_attack("pgd", eps=EPS, steps=3), *data, batch_size=BS,
                        records_path=path, progress=False, **kw)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def good(tiny_model, data, tmp_path_factory):
    """(result, records text) of an untampered run."""
    path = tmp_path_factory.mktemp("good") / "r.records.jsonl"
    res = _run(tiny_model, data, path)
    assert 0 < res.robust_accuracy < res.clean_accuracy  # the attack breaks some points, not all
    return res, path.read_text()


def numbers(res) -> dict[str, Any]:
    """Everything a result says that must not depend on the records' history."""
    return {"clean": res.clean_flags, "robust": res.robust_flags, "acc": (res.clean_accuracy, res.robust_accuracy),
            "budget": res.budget, "passes": res.passes,
            "stages": [(s.name, s.accuracy, s.n_attacked, s.n_broken, s.forward_passes, s.backward_passes)
                       for s in res.stages]}


def lines_where(text: str, **match: Any) -> list[int]:
    """0-based indices of the lines whose JSON has every key/value of ``match`` (type=None: a record)."""
    out = []
    for k, line in enumerate(text.splitlines()):
        obj = json.loads(line)
        if all(obj.get(key) == value for key, value in match.items()):
            out.append(k)
    return out


def resume(tiny_model, data, tmp_path, text: str, expect: str | None):
    """Resume from ``text``; every warning must be one line, one must match ``expect`` (or none)."""
    path = tmp_path / "r.records.jsonl"
    path.write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _run(tiny_model, data, path)
    msgs = [str(w.message) for w in caught]
    assert all("\n" not in m for m in msgs)
    if expect is None:
        assert msgs == []
    else:
        assert any(re.search(expect, m) for m in msgs), msgs
    return res, path


def reforge(text: str) -> str:
    """Recompute every count, prev and checksum, as a forger who knows the format would."""
    lines = [json.loads(s) for s in text.splitlines()]
    prev, pending, out = lines[0]["protocol_hash"], [], [lines[0]]
    for obj in lines[1:]:
        if obj.get("type") != "commit":
            pending.append(obj)
            out.append(obj)
            continue
        mine = [r for r in pending if (r["stage"], r["batch"]) == (obj["stage"], obj["batch"])]
        obj = {**{k: v for k, v in obj.items() if k != "sha256"}, "n": len(mine), "prev": prev}
        obj["sha256"] = prev = batch_checksum(mine, obj)
        out.append(obj)
        pending = []
    return "".join(json.dumps(o, sort_keys=True) + "\n" for o in out)


def edit(text: str, index: int, change) -> str:
    lines = text.splitlines()
    lines[index] = change(lines[index])
    return "\n".join(lines) + "\n"


def set_field(key: str, value: Any):
    return lambda line: json.dumps({**json.loads(line), key: value}, sort_keys=True)


def committed(text: str) -> int:
    return len(lines_where(text, type="commit"))


# --------------------------------------------------------------------------- tampering


def test_missing_record_is_recomputed(tiny_model, data, good, tmp_path):
    res0, text = good
    k = lines_where(text, stage="pgd", batch=1)[2]
    lines = text.splitlines()
    tampered = "\n".join(lines[:k] + lines[k + 1:]) + "\n"
    commit_line = lines_where(text, type="commit", stage="pgd", batch=1)[0]  # now one line up
    res, _ = resume(tiny_model, data, tmp_path, tampered, rf":{commit_line}: batch 1 of pgd has 7 record")
    assert numbers(res) == numbers(res0)
    assert res.timing["resumed_batches"] == committed(text) - 1  # the batches after it are kept


def test_flipped_flags_are_recomputed(tiny_model, data, good, tmp_path):
    res0, text = good
    robust = lines_where(text, stage="pgd", robust=False)[0]
    flipped = edit(text, robust, set_field("robust", True))
    commit_line = next(k for k in lines_where(text, type="commit") if k > robust) + 1
    res, _ = resume(tiny_model, data, tmp_path, flipped, rf":{commit_line}: .*checksum mismatch")
    assert numbers(res) == numbers(res0)
    # Without the checksum (a forger recomputes it), the flag still contradicts the prediction.
    correct = lines_where(text, stage="clean", correct=True)[3]
    forged = reforge(edit(text, correct, set_field("correct", False)))
    res, _ = resume(tiny_model, data, tmp_path, forged, rf":{correct + 1}: example \d+: 'correct' False contradicts")
    assert numbers(res) == numbers(res0)


def test_garbage_line_mid_file_keeps_the_good_batches_after_it(tiny_model, data, good, tmp_path):
    res0, text = good
    k = lines_where(text, stage="clean", batch=2)[4]
    garbage = edit(text, k, lambda _: "\x00garbage{{")
    res, path = resume(tiny_model, data, tmp_path, garbage, rf":{k + 1}: not valid JSON")
    assert numbers(res) == numbers(res0)
    assert res.timing["resumed_batches"] == committed(text) - 1
    # A line inserted between two batches costs nothing at all.
    lines = text.splitlines()
    inserted = "\n".join([*lines[:k], "not json", *lines[k:]]) + "\n"
    res, _ = resume(tiny_model, data, tmp_path, inserted, rf":{k + 1}: not valid JSON")
    assert numbers(res) == numbers(res0)


def test_changed_linf_is_recomputed_even_with_a_valid_checksum(tiny_model, data, good, tmp_path):
    res0, text = good
    k = lines_where(text, stage="pgd", batch=3)[0]
    over = edit(text, k, set_field("linf", 0.9))
    res, _ = resume(tiny_model, data, tmp_path, over, r"batch 3 of pgd: checksum mismatch")
    assert numbers(res) == numbers(res0) and res.budget["max_linf"] < EPS + 1e-5
    res, _ = resume(tiny_model, data, tmp_path, reforge(over), rf":{k + 1}: example \d+: Linf distance 0.9000000 exceeds")
    assert numbers(res) == numbers(res0)


def test_truncated_commit_mid_file(tiny_model, data, good, tmp_path):
    res0, text = good
    k = lines_where(text, type="commit", stage="clean", batch=3)[0]
    cut = edit(text, k, lambda line: line[: len(line) // 2])
    res, path = resume(tiny_model, data, tmp_path, cut, rf":{k + 1}: not valid JSON")
    assert numbers(res) == numbers(res0)
    assert res.timing["resumed_batches"] == committed(text) - 1
    # The re-computed batch is appended; the next resume uses it and reports only the dead line.
    res, _ = resume(tiny_model, data, tmp_path, path.read_text(), rf":{k + 1}: not valid JSON")
    assert numbers(res) == numbers(res0) and res.timing["resumed_batches"] == committed(text)


def test_wrong_commit_count(tiny_model, data, good, tmp_path):
    res0, text = good
    k = lines_where(text, type="commit", stage="pgd", batch=0)[0]
    wrong = edit(text, k, set_field("n", 7))
    res, _ = resume(tiny_model, data, tmp_path, wrong, rf":{k + 1}: batch 0 of pgd has 8 record\(s\) but its commit says n=7")
    assert numbers(res) == numbers(res0)
    # A forger who drops a record and fixes count and checksum: the batch misses an example.
    lines = text.splitlines()
    r = lines_where(text, type=None, stage="pgd", batch=0)[-1]
    forged = reforge("\n".join(lines[:r] + lines[r + 1:]) + "\n")
    res, _ = resume(tiny_model, data, tmp_path, forged, r"batch 0 of pgd holds other examples")
    assert numbers(res) == numbers(res0)


@pytest.mark.parametrize("bad", ['{"i": "three", "stage": "clean", "batch": 1}', "[1, 2, 3]",
                                 '{"type": "commit"}', '{"type": "commit", "stage": "clean", "batch": 1, "n": "8"}',
                                 '{"type": "surprise"}', "null"])
def test_valid_json_but_malformed_line(tiny_model, data, good, tmp_path, bad):
    res0, text = good
    k = lines_where(text, stage="clean", batch=1)[0]
    res, _ = resume(tiny_model, data, tmp_path, edit(text, k, lambda _: bad), rf":{k + 1}: ")
    assert numbers(res) == numbers(res0)
    assert res.timing["resumed_batches"] == committed(text) - 1


def test_recomputed_earlier_stage_invalidates_what_depended_on_it(tiny_model, data, good, tmp_path):
    """A clean batch whose (forged, self-consistent) predictions change the survivors: every attack
    batch cut from the old survivors holds other examples now and is recomputed, not trusted."""
    res0, text = good
    k = lines_where(text, stage="clean", batch=0, correct=True)[0]
    y = json.loads(text.splitlines()[k])["y"]
    forged = reforge(edit(text, k, lambda line: json.dumps({**json.loads(line), "pred": (y + 1) % 10,
                                                             "correct": False}, sort_keys=True)))
    res, _ = resume(tiny_model, data, tmp_path, forged, r"batch 0 of pgd holds other examples")
    assert res.stages[1].n_attacked == res0.stages[1].n_attacked - 1 == res.budget["checked"]
    assert res.clean_flags[k - 1] == res.robust_flags[k - 1] == "0"  # line k holds example k - 1


def test_unreadable_header_is_refused_naming_the_line(tiny_model, data, good, tmp_path):
    _, text = good
    path = tmp_path / "r.records.jsonl"
    for header in ["garbage", '{"type": "header", "version": 99}', "[]"]:
        path.write_text(edit(text, 0, lambda _, h=header: h))
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: "):
            _run(tiny_model, data, path)
        assert path.read_text().startswith(header)  # nothing written


def test_format_1_records_still_resume(tiny_model, data, good, tmp_path):
    """Records written before checksums: every batch is kept after the checks that need none."""
    res0, text = good
    old = [json.loads(line) for line in text.splitlines()]
    old[0]["version"] = 1
    for obj in old[1:]:
        for key in ("sha256", "prev") if obj.get("type") == "commit" else ("batch",):
            del obj[key]
    v1 = "".join(json.dumps(o, sort_keys=True) + "\n" for o in old)
    res, _ = resume(tiny_model, data, tmp_path, v1, rf"{committed(text)} batch\(es\) in records format 1")
    assert numbers(res) == numbers(res0) and res.timing["resumed_batches"] == committed(text)
    k = lines_where(v1, stage="pgd", robust=False)[0]
    res, _ = resume(tiny_model, data, tmp_path, edit(v1, k, set_field("robust", True)),
                    rf":{k + 1}: example \d+: 'robust' True contradicts")
    assert numbers(res) == numbers(res0)


# --------------------------------------------------------------------------- the budget section


def test_budget_is_a_function_of_the_records(tiny_model, data, good, tmp_path):
    res0, text = good
    attacked = sum(s.n_attacked for s in res0.stages[1:])
    assert res0.budget["checked"] == attacked and 0 < res0.budget["max_linf"] <= EPS + 1e-5
    # Killed after two attack batches (simulated: the file cut right after their commit).
    k = lines_where(text, type="commit", stage="pgd", batch=1)[0]
    res, path = resume(tiny_model, data, tmp_path, "\n".join(text.splitlines()[: k + 1]) + "\n", None)
    assert res.budget == res0.budget and res.budget["checked"] == attacked
    assert 0 < res.timing["resumed_batches"] < committed(text)
    # A re-run of the finished command computes nothing and reports the same budget.
    again, _ = resume(tiny_model, data, tmp_path, path.read_text(), None)
    assert again.timing["resumed_batches"] == committed(text)
    assert numbers(again) == numbers(res0)
