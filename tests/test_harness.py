"""The harness: fidelity to pyautoattack, determinism, RNG isolation, clean grads, budget checks."""

from __future__ import annotations

import copy
import json
from importlib import metadata

import numpy as np
import pyautoattack
import pytest
import torch

from robustkit import create_attack, evaluate
from robustkit.attacks.base import Attack
from robustkit.core.errors import BudgetViolationError, ConfigError, InputRangeError
from robustkit.eval import EvalResult, Subject

# All four standard stages, shortened so the test takes seconds (version='custom' keeps
# pyautoattack's constructor defaults, so every setting that matters is stated).
STAGES = ["apgd-ce", "apgd-t", "fab-t", "square"]
OVERRIDES = {"apgd.n_restarts": 1, "apgd.n_iter": 10, "apgd_targeted.n_iter": 10,
             "apgd_targeted.n_target_classes": 2, "fab.n_iter": 5, "fab.n_target_classes": 2,
             "square.n_queries": 40}
EPS = 8 / 255


def reference_flags(model, x, y, *, batch_size, seed, eps=EPS):
    """Per-example robust flags from pyautoattack's own driver, configured like OVERRIDES."""
    aa = pyautoattack.AutoAttack(model, attacks=STAGES, version="custom", eps=eps, norm="Linf", seed=seed,
                                 device="cpu")
    for key, value in OVERRIDES.items():
        obj, attr = key.split(".")
        setattr(getattr(aa, obj), attr, value)
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    with torch.no_grad():
        return (model(x_adv).max(1)[1] == y).tolist()


def short_aa():
    return create_attack("autoattack", norm="Linf", eps=EPS, version="custom", attacks=STAGES, overrides=OVERRIDES)


def test_flags_identical_to_pyautoattack(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:32], synthetic_test[1][:32]
    res = evaluate(tiny_model, short_aa(), x, y, batch_size=12, seed=3, progress=False)
    ours = [c == "1" for c in res.robust_flags]
    ref = reference_flags(tiny_model, x, y, batch_size=12, seed=3)
    assert ours == ref
    # The comparison is only meaningful if the attack did something and something survived.
    assert 0 < sum(ours) < sum(c == "1" for c in res.clean_flags)
    names = [s.name for s in res.stages]
    assert names == ["clean", *STAGES]
    accs = [s.accuracy for s in res.stages]
    assert accs == sorted(accs, reverse=True), "accuracy must not increase along the cascade"
    assert res.robust_accuracy == pytest.approx(accs[-1])


def test_deterministic_and_rng_untouched(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:16], synthetic_test[1][:16]
    torch.manual_seed(1234)
    np.random.seed(99)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = evaluate(tiny_model, short_aa(), x, y, batch_size=8, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), torch_state), "evaluate() changed the caller's torch RNG"
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    b = evaluate(tiny_model, short_aa(), x, y, batch_size=8, seed=0, progress=False)
    assert a.robust_flags == b.robust_flags and a.passes == b.passes


def test_no_gradients_left_in_parameters(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:16], synthetic_test[1][:16]
    model = copy.deepcopy(tiny_model)
    for p in model.parameters():  # the bare pyautoattack call in another test may have left some
        p.grad = None
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    evaluate(model, short_aa(), x, y, batch_size=16, progress=False)  # includes FAB-T's .backward()
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training, "the caller's train/eval mode must be restored"


def test_pass_counts_match_apgd_formula(tiny_model, synthetic_test):
    # APGD-CE with n_iter=10, 1 restart: 1 forward for the initial prediction + 11 forward+backward
    # (initial gradient + 10 iterations) per attacked point; then 1 forward to re-predict.
    x, y = synthetic_test[0][:16], synthetic_test[1][:16]
    attack = create_attack("apgd-ce", eps=EPS, overrides={"apgd.n_iter": 10})
    res = evaluate(tiny_model, attack, x, y, batch_size=16, progress=False)
    stage = res.stages[1]
    assert stage.backward_passes == 11 * stage.n_attacked
    assert stage.forward_passes == (1 + 11 + 1) * stage.n_attacked
    assert res.stages[0].forward_passes == 16 and res.stages[0].backward_passes == 0


def test_clean_only_and_records(tiny_model, synthetic_test, tmp_path):
    x, y = synthetic_test
    rec = tmp_path / "r.jsonl"
    res = evaluate(tiny_model, None, x[:50], y[:50], batch_size=20, records_path=rec, progress=False)
    assert res.robust_accuracy is None and res.attack is None
    with torch.no_grad():
        expected = (tiny_model(x[:50]).argmax(1) == y[:50]).float().mean().item()
    assert res.clean_accuracy == pytest.approx(expected)
    lines = [json.loads(s) for s in rec.read_text().splitlines()]
    assert lines[0]["type"] == "header"
    examples = [r for r in lines if r.get("type") is None]
    assert sorted(r["i"] for r in examples) == list(range(50))
    assert sum(r.get("type") == "commit" for r in lines) == 3



def test_saved_result_records_path_is_relative_to_the_result(tiny_model, synthetic_test, tmp_path,
                                                             monkeypatch):
    """A result names its records relative to itself, never by this machine's absolute path."""
    from robustkit.eval.results import EvalResult

    x, y = synthetic_test
    monkeypatch.chdir(tmp_path)
    res = evaluate(tiny_model, None, x[:8], y[:8], batch_size=8, records_path=tmp_path / "out" / "r.records.jsonl",
                   progress=False)
    assert json.loads(res.save(tmp_path / "out" / "r.json").read_text())["records_path"] == "r.records.jsonl"
    assert json.loads(res.save("elsewhere/r.json").read_text())["records_path"] == "../out/r.records.jsonl"
    assert EvalResult.load(tmp_path / "out" / "r.json").records_path == "r.records.jsonl"


def test_result_json_roundtrip(tiny_model, synthetic_test, tmp_path):
    x, y = synthetic_test[0][:16], synthetic_test[1][:16]
    res = evaluate(tiny_model, create_attack("pgd", eps=EPS, steps=3), x, y, batch_size=8, seed=5,
                   progress=False, subject=Subject(model="tiny", dataset="synthetic"))
    path = res.save(tmp_path / "res.json")
    d = json.loads(path.read_text())
    for key in ("schema_version", "clean_accuracy", "robust_accuracy", "n_examples", "model", "attack",
                "norm", "eps", "seed", "passes", "timing", "provenance", "stages", "budget"):
        assert key in d
    assert d["eps_str"] == "8/255" and d["n_examples"] == 16 and d["model"] == "tiny"
    assert 0.0 <= d["robust_accuracy"] <= d["clean_accuracy"] <= 1.0
    versions = d["provenance"]["versions"]  # what produced the number, as installed (local tags aside)
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["numpy"] == np.__version__ and versions["pyautoattack"] == metadata.version("pyautoattack")
    again = EvalResult.load(path)
    assert again.to_dict() == d
    assert "robust accuracy" in res.summary()


class _Cheater(Attack):
    name = "cheater"

    def perturb(self, model, x, y, *, stage, seed):
        return (x + 2 * self.eps).clamp(0, 1)


class _OutOfBox(Attack):
    name = "outofbox"

    def perturb(self, model, x, y, *, stage, seed):
        # Within eps of x, but dark pixels pushed just below 0.
        return torch.where(x < self.eps / 2, torch.full_like(x, -1e-4), x)


def test_budget_violations_fail_loudly(tiny_model, synthetic_test):
    from robustkit.core.threat import ThreatModel

    x, y = synthetic_test[0][:8], synthetic_test[1][:8]
    with pytest.raises(BudgetViolationError, match="eps"):
        evaluate(tiny_model, _Cheater(ThreatModel("Linf", EPS)), x, y, progress=False)
    with pytest.raises(BudgetViolationError, match=r"\[0, 1\]"):
        dark = x.clone()
        dark[:, :, 0, 0] = 0.0
        evaluate(tiny_model, _OutOfBox(ThreatModel("Linf", EPS)), dark, y, progress=False)


def test_bad_inputs(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:4], synthetic_test[1][:4]
    with pytest.raises(InputRangeError, match=r"\[0, 1\]"):
        evaluate(tiny_model, None, x * 2 - 1, y, progress=False)
    with pytest.raises(ConfigError):
        evaluate(tiny_model, None, x, y[:3], progress=False)
    with pytest.raises(ConfigError):
        evaluate(tiny_model, None, x, y, batch_size=0, progress=False)


def test_resume_refuses_other_protocol(tiny_model, synthetic_test, tmp_path):
    x, y = synthetic_test[0][:8], synthetic_test[1][:8]
    rec = tmp_path / "r.jsonl"
    evaluate(tiny_model, None, x, y, records_path=rec, progress=False, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        evaluate(tiny_model, None, x, y, records_path=rec, progress=False, seed=1)


def test_inprocess_resume_after_partial_tail(tiny_model, synthetic_test, tmp_path):
    """A records file cut mid-batch (as by SIGKILL) resumes to the same result."""
    x, y = synthetic_test[0][:48], synthetic_test[1][:48]
    attack = create_attack("pgd", eps=EPS, steps=3)
    full = evaluate(tiny_model, attack, x, y, batch_size=8, records_path=tmp_path / "a.jsonl", progress=False)
    text = (tmp_path / "a.jsonl").read_text()
    cut = text[: len(text) * 2 // 3]
    cut = cut[: cut.rfind('"type": "commit"')]  # inside a batch: the last commit is incomplete
    (tmp_path / "b.jsonl").write_text(cut)
    resumed = evaluate(tiny_model, attack, x, y, batch_size=8, records_path=tmp_path / "b.jsonl", progress=False)
    assert resumed.timing["resumed_batches"] > 0
    assert resumed.robust_flags == full.robust_flags and resumed.passes == full.passes
    keys = [(r["stage"], r["i"]) for r in map(json.loads, (tmp_path / "b.jsonl").read_text().splitlines())
            if r.get("type") is None]
    assert len(keys) == len(set(keys))


def test_compiled_model_gives_the_reference_flags_and_resumes_eager_records(tiny_model, synthetic_test, tmp_path):
    """--compile changes how the model runs, not what is measured: the same per-example flags as
    pyautoattack's own driver on the eager model, the same pass counts, and its records resume in an
    eager run (like a change of device); the provenance says which ran."""
    x, y = synthetic_test[0][:24], synthetic_test[1][:24]
    rec = tmp_path / "r.records.jsonl"
    compiled = evaluate(tiny_model, short_aa(), x, y, batch_size=12, seed=3, progress=False, compile=True,
                        records_path=rec)
    eager = evaluate(tiny_model, short_aa(), x, y, batch_size=12, seed=3, progress=False)
    assert [c == "1" for c in compiled.robust_flags] == reference_flags(tiny_model, x, y, batch_size=12, seed=3)
    assert compiled.robust_flags == eager.robust_flags and compiled.passes == eager.passes
    assert 0 < compiled.robust_flags.count("1") < compiled.clean_flags.count("1")
    assert compiled.provenance["torch_compile"] is True and eager.provenance["torch_compile"] is False
    resumed = evaluate(tiny_model, short_aa(), x, y, batch_size=12, seed=3, progress=False, records_path=rec)
    assert resumed.timing["resumed_batches"] > 0 and resumed.robust_flags == compiled.robust_flags
