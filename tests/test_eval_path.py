"""The eval path: one Subject made from the loaded model and data, and model sources (rb:) as a registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from robustkit.cli import main
from robustkit.eval import Subject, evaluate
from robustkit.models import MODEL_SOURCES, LoadedModel, load_model, register_model_source

REPO = Path(__file__).resolve().parents[1]


def test_models_base_does_not_import_a_source():
    """No import circle: the registry module knows no source, a source module registers itself."""
    text = (REPO / "robustkit" / "models" / "base.py").read_text()
    assert "robustbench" not in text
    code = ("import sys, robustkit.models.base as b; "
            "assert 'rb' in b.MODEL_SOURCES.names(), b.MODEL_SOURCES.names()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.fixture
def fake_source(monkeypatch, tiny_model):
    """A throw-away ``fake:`` source (the registry is restored afterwards)."""
    monkeypatch.setattr(MODEL_SOURCES, "_entries", dict(MODEL_SOURCES._entries))
    calls: list[tuple[str, dict]] = []

    def loader(rest: str, **options) -> LoadedModel:
        calls.append((rest, options))
        return LoadedModel(tiny_model, f"fake:{rest}", "synthetic", 10, None, {"architecture": "tiny_cnn"})

    register_model_source("fake", loader, usage="fake:<Id>", description="a test source")
    return calls


def test_load_model_dispatches_on_a_registered_prefix(fake_source):
    loaded = load_model("fake:abc", dataset="synthetic")
    assert loaded.name == "fake:abc" and fake_source == [("abc", {"dataset": "synthetic"})]


def test_cli_lists_and_evaluates_a_registered_source(fake_source, capsys, tmp_path):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "fake:<Id>" in out and "rb:<Name>" in out
    code = main(["eval", "--model", "fake:abc", "--dataset", "synthetic", "--attack", "none", "--n-examples", "8",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert fake_source[0][1]["dataset"] == "synthetic"  # the CLI tells a source which benchmark it is for
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "fake:abc"


def test_subject_is_what_the_result_records(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:8], synthetic_test[1][:8]
    loaded = LoadedModel(tiny_model, "tiny.x", "synthetic", 10, "ab" * 32,
                         {"architecture": "tiny_cnn", "arch_args": {"width": 4}, "other": 1})
    subject = Subject.from_loaded(loaded, dataset="synthetic", data_info={"split": "test", "fingerprint": "f0"})
    assert subject.model_info == {"architecture": "tiny_cnn", "arch_args": {"width": 4}}
    r = evaluate(tiny_model, None, x, y, subject=subject, device="cpu", progress=False)
    assert (r.model, r.dataset, r.provenance["checkpoint_sha256"]) == ("tiny.x", "synthetic", "ab" * 32)
    assert r.data == {"split": "test", "fingerprint": "f0"}
    assert r.model_info["architecture"] == "tiny_cnn" and r.model_info["class"] == type(tiny_model).__name__
    # a subset of the examples keeps the model's description but not the data's
    sub = subject.on_subset()
    assert sub.model == "tiny.x" and sub.data_info == {} and sub.fingerprint(x, y) != "f0"
    # without a subject: the class name and a fingerprint of the tensors, as a notebook gets
    plain = evaluate(tiny_model, None, x, y, device="cpu", progress=False)
    assert plain.model == type(tiny_model).__name__ and plain.data["fingerprint"] == Subject().fingerprint(x, y)
    assert plain.clean_flags == r.clean_flags  # the subject describes the run, it does not change it
