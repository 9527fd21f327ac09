"""RobustBench-format entries: the 236 real files, validation messages, add/build/check/submit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from robustkit.cli import main
from robustkit.leaderboard import boards, load_entries, read_entry
from robustkit.leaderboard.render import plain_text, sanitize_html

REPO = Path(__file__).resolve().parents[1]
RB_MODEL_INFO = REPO.parent / "shared" / "data" / "robustbench" / "model_info"


@pytest.fixture(scope="module")
def rb_dir() -> Path:
    if not RB_MODEL_INFO.is_dir():
        pytest.skip(f"RobustBench entries not found at {RB_MODEL_INFO} (they ship beside the repo in CI only)")
    return RB_MODEL_INFO


def _warned(entries, field: str, pattern: str) -> set[str]:
    return {f"{e.dataset}/{e.threat_model}/{e.model_id}" for e in entries for p in e.warnings
            if p.field == field and re.search(pattern, p.message)}


# --------------------------------------------------------------------------- the real entries


def test_all_real_entries_load_with_quirks_as_warnings(rb_dir):
    entries = load_entries([rb_dir])
    assert len(entries) == 236
    assert [str(p) for e in entries for p in e.errors] == []
    counts = {}
    for e in entries:
        counts[e.board] = counts.get(e.board, 0) + 1
    assert counts == {("cifar10", "Linf"): 99, ("cifar10", "L2"): 21, ("cifar10", "corruptions"): 23,
                      ("cifar100", "Linf"): 38, ("cifar100", "corruptions"): 13, ("imagenet", "Linf"): 30,
                      ("imagenet", "corruptions"): 12}

    mismatch = _warned(entries, "dataset", r"says 'cifar10' but the file is in the cifar100/ folder")
    assert len(mismatch) == 5
    assert "cifar100/Linf/Hendrycks2019Using" in mismatch
    assert sum(m.startswith("cifar100/corruptions/") for m in mismatch) == 4

    assert _warned(entries, "corruptions_acc", r"appears twice") == {
        "cifar10/corruptions/Diffenderfer2021Winning_LRR_CARD_Deck"}
    assert len(_warned(entries, "reported", r'string "null"')) == 1
    assert len(_warned(entries, "reported", r"empty string")) == 20
    assert len(_warned(entries, "reported", r"^is null")) == 1
    assert len(_warned(entries, "venue", r"HTML")) == 3
    assert len(_warned(entries, "footnote", r"HTML")) == 1
    assert len(_warned(entries, "eps", r"legacy rounded '0.031'")) == 6
    # every warning says how to fix it
    assert all(p.fix for e in entries for p in e.warnings)


def test_strict_mode_turns_quirks_into_errors(rb_dir, capsys):
    strict = load_entries([rb_dir], strict=True)
    invalid = {e.model_id for e in strict if not e.valid}
    assert "Hendrycks2019Using" in invalid and "Diffenderfer2021Winning_LRR_CARD_Deck" in invalid
    assert "Carmon2019Unlabeled" not in invalid  # a clean file stays valid
    assert main(["leaderboard", "validate", str(rb_dir)]) == 0
    assert main(["leaderboard", "validate", str(rb_dir), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "Hendrycks2019Using.json: error: dataset: says 'cifar10'" in out
    assert re.search(r"236 entries: \d+ valid, \d+ invalid", out)


def independent_ranking(folder: Path) -> dict[str, list[str]]:
    """RobustBench's rule written out again from the raw JSON, without robustkit's code."""
    out: dict[str, list[str]] = {}
    for f in sorted(folder.rglob("*.json")):
        d = json.loads(f.read_text())
        tm = f.parent.name
        if tm.startswith("corruptions"):
            key = float(d["corruptions_acc"])
        else:
            key = float(d["external"]) if d.get("external") not in (None, "") else float(d["autoattack_acc"])
        out.setdefault(f"{f.parent.parent.name}/{tm}", []).append((-key, f.stem))
    return {b: [name for _, name in sorted(v)] for b, v in out.items()}


def test_ranking_of_all_real_entries_plus_ours(rb_dir, tmp_path, capsys):
    mine = tmp_path / "entries" / "cifar10" / "Linf"
    mine.mkdir(parents=True)
    ours = json.loads((rb_dir / "cifar10" / "Linf" / "Carmon2019Unlabeled.json").read_text())
    ours.update(name="Ours", autoattack_acc="61.00", clean_acc="90.00", reported="61.00")
    (mine / "Doe2026Ours.json").write_text(json.dumps(ours))
    combined = tmp_path / "combined"
    shutil.copytree(rb_dir, combined)
    shutil.copy(mine / "Doe2026Ours.json", combined / "cifar10" / "Linf")
    expected = independent_ranking(combined)

    ranked = boards(load_entries([rb_dir, tmp_path / "entries"]))
    got = {f"{d}/{t}": [e.model_id for e in v] for (d, t), v in ranked.items()}
    assert got == expected
    linf = got["cifar10/Linf"]
    assert linf[:2] == ["Bartoldson2024Adversarial_WRN-94-16", "Amini2024MeanSparse_S-WRN-94-16"]
    assert linf[5] == "Bai2024MixedNUTS"
    assert len(linf) == 100

    out_dir = tmp_path / "site"
    assert main(["leaderboard", "build", "--entries", str(tmp_path / "entries"), "--with", str(rb_dir),
                 "--out-dir", str(out_dir)]) == 0
    page = (out_dir / "index.html").read_text()
    table = page[page.index('id="t-cifar10-Linf"'):]
    table = table[: table.index("</table>")]
    assert re.findall(r'<tr(?: class="ours")? data-id="([^"]+)"', table) == linf
    assert '<tr class="ours" data-id="Doe2026Ours">' in table
    md = (out_dir / "README.md").read_text()
    section = md[md.index("## CIFAR-10, L∞"):]
    section = section[: section.index("\n## ")]
    assert re.findall(r"`([^`]+)`", "\n".join(line for line in section.splitlines() if line.startswith("| "))) \
        == linf
    assert len(re.findall(r"^\| \d+ \|", md, flags=re.M)) == 237


# --------------------------------------------------------------------------- validation messages


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = {"link": "https://arxiv.org/abs/1905.13736", "name": "A paper", "authors": "A B, C D",
        "additional_data": False, "number_forward_passes": 1, "dataset": "cifar10", "venue": "N/A",
        "architecture": "WideResNet-28-10", "eps": "8/255", "clean_acc": "89.69", "reported": "59.53",
        "autoattack_acc": "59.53"}


def test_bad_entries_name_file_field_and_fix(tmp_path, capsys):
    root = tmp_path / "cifar10" / "Linf"
    broken = _write(root / "Broken2026Json.json", '{"link": "x",\n "name": }')
    missing = _write(root / "Missing2026Fields.json", json.dumps({"link": "https://a.b", "name": "t"}))
    numbers = _write(root / "Numbers2026Acc.json", json.dumps({**GOOD, "clean_acc": 89.69, "autoattack_acc": 0.5953}))
    typo = _write(root / "Typo2026Key.json", json.dumps({**GOOD, "autoatack_acc": "1.00"}))
    wrong_eps = _write(root / "Eps2026Wrong.json", json.dumps({**GOOD, "eps": "4/255"}))
    good = _write(root / "Good2026Entry.json", json.dumps(GOOD))

    e = read_entry(broken)
    assert [(p.field, p.level) for p in e.problems] == [("(file)", "error")]
    assert "not valid JSON" in e.problems[0].message and "line 2" in e.problems[0].message
    e = read_entry(missing)
    assert {p.field for p in e.errors} >= {"authors", "additional_data", "clean_acc", "eps", "autoattack_acc"}
    e = read_entry(numbers)
    msgs = {p.field: str(p) for p in e.errors}
    assert "accuracy as a number (89.69)" in msgs["clean_acc"] and 'write "clean_acc": "89.69"' in msgs["clean_acc"]
    assert 'write "autoattack_acc": "59.53"' in msgs["autoattack_acc"]
    e = read_entry(typo)
    assert "did you mean 'autoattack_acc'?" in str(e.errors[0])
    e = read_entry(wrong_eps)
    assert "not the cifar10/Linf budget 8/255" in str(e.errors[0])
    assert read_entry(good).problems == []

    assert main(["leaderboard", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for f in (broken, missing, numbers, typo, wrong_eps):
        assert str(f) in out
    assert "6 entries: 1 valid, 5 invalid" in out
    assert main(["leaderboard", "validate", str(good), "--strict"]) == 0


def test_validate_unusable_arguments_exit_2(tmp_path, capsys):
    assert main(["leaderboard", "validate", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    wrong_place = _write(tmp_path / "somewhere" / "X2026Y.json", json.dumps(GOOD))
    e = read_entry(wrong_place)
    assert e.errors[0].field == "(path)" and "<dataset>/<threat_model>/<ModelId>.json" in str(e.errors[0])


def test_html_is_sanitised_and_tex_readable():
    html = sanitize_html('x<br>y <a href="https://a.b/c?d=1&e=2">link</a><script>alert(1)</script>'
                         '<a href="javascript:alert(1)">bad</a>')
    assert "<br>" in html and '<a href="https://a.b/c?d=1&amp;e=2">link</a>' in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "javascript:" not in html
    assert plain_text(r"Uses \(\ell_{\infty} \) = 0.031<br>more") == "Uses ℓ∞ = 0.031 more"


# --------------------------------------------------------------------------- add, build, check, submit


@pytest.fixture(scope="module")
def aa_result(tmp_path_factory, tiny_model) -> dict:
    """A real standard-AutoAttack result of the tiny model (8 synthetic images), as JSON."""
    from robustkit.attacks import create_attack
    from robustkit.data import load_split
    from robustkit.eval import Subject, evaluate

    x, y = load_split("synthetic", "test").tensors(8)
    attack = create_attack("autoattack", norm="Linf", eps="8/255")
    subject = Subject(model="tiny", dataset="synthetic", model_info={"architecture": "tiny_cnn"},
                      data_info={"split": "test", "indices": "first-n", "source": "synthetic"})
    result = evaluate(tiny_model, attack, x, y, batch_size=8, device="cpu", progress=False,
                      subject=subject, attack_name="autoattack")
    return result.to_dict()


def _as_full_cifar10(d: dict, tmp_path: Path, name: str = "r.json", **changes) -> Path:
    """Relabel the tiny result as a 10,000-image CIFAR-10 run: the fields `add` reads, nothing else."""
    d = json.loads(json.dumps(d))
    d.update(dataset="cifar10", n_examples=10_000)
    d.update(changes)
    return _write(tmp_path / name, json.dumps(d))


PAPER = ["--paper-title", "Robust Things", "--paper-link", "https://arxiv.org/abs/2611.00001",
         "--authors", "Jane Doe, John Roe", "--venue", "arXiv, Nov 2026", "--additional-data", "false"]


def test_add_build_check_submit(aa_result, tmp_path, capsys):
    entries = tmp_path / "leaderboard" / "entries"
    res = _as_full_cifar10(aa_result, tmp_path)
    assert main(["leaderboard", "add", str(res), "--name", "Doe2026Robust", "--entries", str(entries), *PAPER]) == 0
    path = entries / "cifar10" / "Linf" / "Doe2026Robust.json"
    d = json.loads(path.read_text())
    assert d["clean_acc"] == f"{100 * aa_result['clean_accuracy']:.2f}"
    assert d["autoattack_acc"] == f"{100 * aa_result['robust_accuracy']:.2f}"
    assert d["eps"] == "8/255" and d["dataset"] == "cifar10" and d["number_forward_passes"] == 1
    assert d["architecture"].startswith("tiny_cnn (") and d["additional_data"] is False
    assert d["robustkit"]["subset"] is False and d["robustkit"]["n_examples"] == 10_000
    assert list(d)[:11] == ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
                            "venue", "architecture", "eps", "clean_acc", "reported"]
    assert read_entry(path, strict=True).problems == []
    assert main(["leaderboard", "add", str(res), "--name", "Doe2026Robust", "--entries", str(entries), *PAPER]) == 2
    assert "exists; pass --force" in capsys.readouterr().err

    # build, then --check passes; an edited entry makes it fail until rebuilt
    assert main(["leaderboard", "build", "--entries", str(entries)]) == 0
    assert (entries.parent / "README.md").exists() and (entries.parent / "index.html").exists()
    assert main(["leaderboard", "build", "--entries", str(entries), "--check"]) == 0
    d["clean_acc"] = "99.00"
    path.write_text(json.dumps(d, indent=2))
    capsys.readouterr()
    assert main(["leaderboard", "build", "--entries", str(entries), "--check"]) == 1
    assert f"out of date: {entries.parent / 'README.md'}" in capsys.readouterr().err
    assert main(["leaderboard", "build", "--entries", str(entries)]) == 0
    assert main(["leaderboard", "build", "--entries", str(entries), "--check"]) == 0
    assert "| 99.00 |" in (entries.parent / "README.md").read_text()

    # submit: the issue text on stdout, the RobustBench files on disk
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    assert main(["leaderboard", "submit", str(path), "--out-dir", str(bundle),
                 "--checkpoint-url", "https://example.org/w.safetensors"]) == 0
    issue = capsys.readouterr().out
    assert issue.startswith("[New Model] Doe2026Robust\n")
    assert "- **Paper Title**: Robust Things" in issue and "- **Clean accuracy**: 99.00%" in issue
    assert f"- **Robust accuracy**: {d['autoattack_acc']}%" in issue and "- **Threat Model**: Linf" in issue
    assert "first 10,000 test images with seed 0" in issue
    rb_file = bundle / "model_info" / "cifar10" / "Linf" / "Doe2026Robust.json"
    rb = json.loads(rb_file.read_text())
    assert "robustkit" not in rb and read_entry(rb_file, strict=True).problems == []
    assert (bundle / "issue.md").read_text() == issue.rstrip("\n") + "\n"


def test_add_refuses_non_comparable_results(aa_result, tmp_path, capsys):
    entries = tmp_path / "entries"

    def add(res: Path, *extra: str) -> tuple[int, str]:
        code = main(["leaderboard", "add", str(res), "--name", "Doe2026Robust", "--entries", str(entries),
                     *PAPER, *extra])
        return code, capsys.readouterr().err

    cfg = dict(aa_result["attack_config"], version="custom", stages=["apgd-ce"])
    code, err = add(_as_full_cifar10(aa_result, tmp_path, "custom.json", attack_config=cfg))
    assert code == 2 and "custom.json" in err and "attack_config" in err and "not standard AutoAttack" in err
    code, err = add(_as_full_cifar10(aa_result, tmp_path, "eps.json", eps=4 / 255))
    assert code == 2 and "eps: " in err and "8/255" in err
    code, err = add(_as_full_cifar10(aa_result, tmp_path, "mnist.json", dataset="mnist"))
    assert code == 2 and "no leaderboard for 'mnist'" in err
    code, err = add(_as_full_cifar10(aa_result, tmp_path, "clean.json", robust_accuracy=None, robust_flags=None))
    assert code == 2 and "no attack" in err
    sub = _as_full_cifar10(aa_result, tmp_path, "subset.json", n_examples=1017)
    code, err = add(sub)
    assert code == 2 and "n_examples: 1017 of the 10,000" in err and "--allow-subset" in err
    code, err = add(_write(tmp_path / "junk.json", "{not json"))
    assert code == 2 and "junk.json" in err

    code, err = add(sub, "--allow-subset", "--paper-link", "javascript:alert(1)")
    assert code == 2 and "--paper-link 'javascript:alert(1)'" in err and "http(s)" in err
    assert not entries.exists()  # refused before anything is written

    assert add(sub, "--allow-subset")[0] == 0
    path = entries / "cifar10" / "Linf" / "Doe2026Robust.json"
    assert json.loads(path.read_text())["robustkit"]["subset"] is True
    assert read_entry(path, strict=True).problems == []
    assert main(["leaderboard", "build", "--entries", str(entries)]) == 0
    assert "⚠ subset: first 1,017 of 10,000 test images" in (entries.parent / "README.md").read_text()
    assert main(["leaderboard", "submit", str(path), "--out-dir", str(tmp_path / "b")]) == 2
    assert "RobustBench needs the full test set" in capsys.readouterr().err


def test_build_refuses_invalid_entries_and_duplicates(tmp_path, capsys):
    entries = tmp_path / "entries"
    _write(entries / "cifar10" / "Linf" / "Bad2026Entry.json", json.dumps({**GOOD, "clean_acc": 1}))
    assert main(["leaderboard", "build", "--entries", str(entries)]) == 1
    assert "Bad2026Entry.json: error: clean_acc" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()
    (entries / "cifar10" / "Linf" / "Bad2026Entry.json").write_text(json.dumps(GOOD))
    other = tmp_path / "other"
    _write(other / "cifar10" / "Linf" / "Bad2026Entry.json", json.dumps(GOOD))
    assert main(["leaderboard", "build", "--entries", str(entries), "--with", str(other)]) == 2
    assert "appears twice" in capsys.readouterr().err


# --------------------------------------------------------------------------- the committed leaderboard


def test_committed_leaderboard_is_valid_and_up_to_date(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["leaderboard", "validate", "leaderboard/entries", "--strict"]) == 0
    assert main(["leaderboard", "build", "--check"]) == 0, capsys.readouterr().err
