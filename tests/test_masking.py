"""Gradient-masking checks: a normal model passes, a gradient-masking one is caught, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel
from robustkit.eval.masking import (
    CLEAN_VERDICT,
    load_report,
    masking_report,
    render_markdown,
    save_report,
    sweep_grid,
    zero_gradient_check,
)
from robustkit.eval.results import EvalResult, StageResult
from robustkit.eval.subject import Subject

N = 32
FAST = {"sweep_params": {"overrides": {"apgd.n_iter": 10}}, "square_queries": 100, "batch_size": 32,
        "confirm_params": {"overrides": {"apgd_targeted.n_iter": 10, "apgd_targeted.n_target_classes": 3}},
        "device": "cpu", "progress": False, "seed": 0}


class Quantised(nn.Module):
    """Input quantisation to 8 bits: harmless on 8-bit images, but torch.round has zero gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 255) / 255)


class Scaled(nn.Module):
    """Logits times a constant: a large one saturates the softmax, a tiny one shrinks every gradient."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    return load_split("synthetic", "test").tensors(N)


@pytest.fixture(scope="module")
def normal_report(tiny_model, data) -> dict:
    x, y = data
    return masking_report(tiny_model, x, y, eps="8/255", subject=Subject(model="tiny", dataset="synthetic"),
                          **FAST)


@pytest.fixture(scope="module")
def masked_report(tiny_model, data) -> dict:
    x, y = data
    return masking_report(Quantised(tiny_model), x, y, eps="8/255", subject=Subject(model="tiny-quantised"),
                          **FAST)


def test_normal_model_raises_no_flag(normal_report, tmp_path):
    r = normal_report
    assert r["schema"] == "robustkit.masking" and r["schema_version"] == 1
    assert r["verdict"] == CLEAN_VERDICT and not r["flagged"] and r["flags"] == []
    checks = r["checks"]
    assert {k: c["status"] for k, c in checks.items()} == {
        "model": "ok", "zero_gradient": "ok", "eps_sweep": "ok", "square_gap": "ok"}
    zero = checks["zero_gradient"]
    assert zero["n_correct"] == round(r["clean_accuracy"] * N) > 0 and zero["no_gradient"] == 0
    sweep = checks["eps_sweep"]
    assert [p["eps_str"] for p in sweep["points"]] == ["0", "2/255", "4/255", "8/255", "16/255", "32/255"]
    accs = [p["accuracy"] for p in sweep["points"]]
    assert sweep["monotone"] and accs == sorted(accs, reverse=True) and accs[0] == r["clean_accuracy"]
    assert sweep["large_eps"]["status"] == "ok" and accs[-1] <= 0.05
    gap = checks["square_gap"]
    assert gap["source"] == "direct" and gap["square_only"] == 0
    assert gap["gradient_accuracy"] == accs[3]  # the sweep's APGD-CE run at eps is reused
    assert r["provenance"]["versions"]["torch"] and r["data"]["fingerprint"]
    path = save_report(r, tmp_path / "m.json")
    assert load_report(path) == json.loads(json.dumps(r))
    md = render_markdown(r)
    assert f"**Verdict: {CLEAN_VERDICT}**" in md and "| 32/255 |" in md and "Flags:" not in md


def test_gradient_masking_model_is_flagged(masked_report):
    r = masked_report
    assert r["flagged"] and r["verdict"] == f"possible gradient masking: {len(r['flags'])} flag(s)"
    checks = r["checks"]
    zero = checks["zero_gradient"]
    assert zero["status"] == "flag" and zero["no_gradient_fraction"] == 1.0 and zero["ce"]["zero"] > 0
    assert "no usable input gradient" in zero["flags"][0]
    sweep = checks["eps_sweep"]  # APGD stalls: accuracy stays high even at 4x eps
    assert sweep["large_eps"]["status"] == "flag" and sweep["large_eps"]["accuracy"] > 0.5
    assert any("survive apgd-ce at eps 32/255" in m for m in sweep["flags"])
    gap = checks["square_gap"]  # the black-box attack breaks what the gradient attack cannot
    assert gap["status"] == "flag" and gap["square_accuracy"] < gap["gradient_accuracy"]
    assert gap["square_only_confirmed"] == gap["square_only"] > 0  # APGD-T fails on them as well
    assert {f["check"] for f in r["flags"]} == {"zero_gradient", "eps_sweep", "square_gap"}
    md = render_markdown(r)
    assert "Flags:" in md and "- **zero_gradient**:" in md and "| flag |" in md


def test_points_apgd_t_breaks_are_a_note_not_a_flag(tiny_model, data):
    """A weak sweep attack (FGSM, 1/255 step) leaves points Square breaks; APGD-T breaks them: no masking."""
    x, y = data
    r = masking_report(tiny_model, x, y, eps="8/255", eps_grid="8/255", sweep_attack="fgsm",
                       **{**FAST, "sweep_params": {"step_size": 1 / 255}})
    gap = r["checks"]["square_gap"]
    assert gap["square_only"] >= 1 and gap["square_only_confirmed"] == 0 and gap["confirm_attack"] == "apgd-t"
    assert gap["status"] == "ok" and not r["flagged"]
    assert any("fgsm alone underestimates the attack" in m for m in r["notes"])
    assert r["checks"]["eps_sweep"]["large_eps"]["status"] == "skipped"  # the grid stops at eps


def test_softmax_saturation_and_tiny_gradients(tiny_model, data):
    x, y = data
    sat = zero_gradient_check(Scaled(tiny_model, 1e4), x, y, device="cpu")
    assert sat["no_gradient"] == 0 and sat["ce_saturated_fraction"] > 0.5
    assert sat["status"] == "flag" and "softmax saturates" in sat["flags"][0]
    # gradients around 1e-15: a Linf sign step is still whole, an L2 normalised step vanishes
    tiny = Scaled(tiny_model, 1e-16)
    assert zero_gradient_check(tiny, x, y, norm="Linf", device="cpu")["status"] == "ok"
    l2 = zero_gradient_check(tiny, x, y, norm="L2", device="cpu")
    assert l2["status"] == "flag" and l2["no_gradient_fraction"] == 1.0 and l2["ce"]["tiny"] > 0


def test_sweep_grid():
    linf = ThreatModel("Linf", 8 / 255)
    assert sweep_grid(linf) == [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255]
    assert sweep_grid(linf, "0,4/255", unbounded=True) == [0.0, 4 / 255, 8 / 255, 1.0]  # eps always in
    assert sweep_grid(ThreatModel("Linf", 0.3)) == [0.0, 0.075, 0.15, 0.3, 0.6, 1.0]  # capped at 1
    with pytest.raises(ConfigError, match="Linf"):
        sweep_grid(ThreatModel("L2", 0.5), unbounded=True)
    with pytest.raises(ConfigError, match="strictly increasing"):
        sweep_grid(linf, "8/255,4/255")


# --------------------------------------------------------------------------- AutoAttack results


def _aa_result(square_broken: int, eps: float = 8 / 255, square: bool = True) -> EvalResult:
    """A standard AutoAttack result on 100 examples, made by hand (running AutoAttack is slow)."""
    acc = [0.9, 0.5, 0.45, 0.44, 0.44 - square_broken / 100]
    names = ["clean", "apgd-ce", "apgd-t", "fab-t", "square"][: 5 if square else 4]
    stages = [StageResult(s, a, 0, 0, 0.0, 0, 0) for s, a in zip(names, acc, strict=False)]
    stages[-1].n_broken = square_broken if square else 1
    return EvalResult(
        model="tiny", attack="autoattack", attack_config={"name": "autoattack"}, dataset="synthetic",
        norm="Linf", eps=eps, seed=0, batch_size=100, n_examples=100, clean_accuracy=0.9,
        robust_accuracy=stages[-1].accuracy, stages=stages, clean_flags="1" * 90 + "0" * 10,
        robust_flags=None, passes={"forward": 0, "backward": 0}, timing={"total_seconds": 0.0}, budget=None,
        checks={}, data={"fingerprint": "x"}, provenance={"checkpoint_sha256": None},
    )


def test_autoattack_result_with_square_breaks_is_flagged(tiny_model, data, tmp_path):
    x, y = data
    path = _aa_result(square_broken=2).save(tmp_path / "aa.json")
    r = masking_report(tiny_model, x, y, eps="8/255", autoattack_result=path, **FAST)
    gap = r["checks"]["square_gap"]
    assert gap["source"] == "autoattack-result" and gap["status"] == "flag" and gap["square_broken"] == 2
    assert gap["accuracy_before_square"] == 0.44 and gap["accuracy_after_square"] == pytest.approx(0.42)
    assert "Square (black-box) broke 2 example(s) after APGD-CE, APGD-T, FAB-T" in gap["flags"][0]
    assert [f["check"] for f in r["flags"]] == ["square_gap"]
    assert "AutoAttack result: 44.00% after the gradient stages" in render_markdown(r)


def test_run_autoattack_flags_square_on_the_masked_model(tiny_model, data, monkeypatch):
    """The report's own AutoAttack run (shrunk here: the standard one takes ~13 s on 32 tiny examples)."""
    import robustkit.eval.masking as masking
    from robustkit.attacks import create_attack

    cheap = {"apgd.n_iter": 5, "apgd_targeted.n_iter": 5, "apgd_targeted.n_target_classes": 2,
             "fab.n_iter": 5, "fab.n_target_classes": 2, "square.n_queries": 100}

    def shrunk(name, **kw):
        return create_attack(name, **kw, **({"overrides": cheap} if name == "autoattack" else {}))

    monkeypatch.setattr(masking, "create_attack", shrunk)
    x, y = data
    r = masking_report(Quantised(tiny_model), x, y, eps="8/255", run_autoattack=True, **FAST)
    gap = r["checks"]["square_gap"]
    assert gap["source"] == "autoattack-run" and gap["status"] == "flag" and gap["square_broken"] > 0
    assert [s["name"] for s in gap["stages"]] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert gap["accuracy_after_square"] < gap["accuracy_before_square"]
    assert not any("Square (black-box) broke" in m for m in r["notes"])  # the harness's warning is the flag


@pytest.mark.parametrize("result,needle", [
    (_aa_result(0, eps=4 / 255), "measured at Linf eps=4/255"),
    (_aa_result(0, square=False), "no Square stage"),
])
def test_unusable_autoattack_result_is_bad_input(tiny_model, data, result, needle):
    x, y = data
    with pytest.raises(ConfigError, match=needle):
        masking_report(tiny_model, x, y, eps="8/255", autoattack_result=result, **FAST)
    with pytest.raises(ConfigError, match="not both"):
        masking_report(tiny_model, x, y, eps="8/255", autoattack_result=result, run_autoattack=True, **FAST)


# --------------------------------------------------------------------------- CLI


CLI_FAST = ["--n-examples", str(N), "--batch-size", "32", "--square-queries", "100", "--device", "cpu",
            "--attack-arg", 'overrides={"apgd.n_iter"=10}', "--no-progress"]


def test_cli_writes_json_and_markdown(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["check", "masking", "--model", str(tiny_checkpoint), "--out", str(out), *CLI_FAST])
    assert rc == 0, capsys.readouterr().err
    report = load_report(out)
    assert report["verdict"] == CLEAN_VERDICT and report["dataset"] == "synthetic" and report["n_examples"] == N
    assert report["provenance"]["checkpoint_sha256"]
    md = out.with_suffix(".md").read_text()
    assert md == render_markdown(report) and "## Gradient-masking checks" in md
    assert f"markdown: {out.with_suffix('.md')}" in capsys.readouterr().out


def test_cli_exit_1_when_flagged(tiny_checkpoint, tmp_path, capsys):
    aa = _aa_result(square_broken=3).save(tmp_path / "aa.json")
    md = tmp_path / "card" / "masking.md"
    rc = main(["check", "masking", "--model", str(tiny_checkpoint), "--autoattack-result", str(aa),
               "--out", str(tmp_path / "m.json"), "--markdown", str(md), *CLI_FAST])
    assert rc == 1
    assert "robustkit: warning: square_gap: Square (black-box) broke 3" in capsys.readouterr().err
    assert "possible gradient masking: 1 flag(s)" in md.read_text()


@pytest.mark.parametrize("extra,needle", [
    (["--eps-grid", "8/255,4/255"], "strictly increasing"),
    (["--autoattack-result", "x.json", "--run-autoattack"], "do not combine"),
    (["--attack", "apgd-cee"], "unknown attack"),
    (["--norm", "L2", "--unbounded"], "needs the Linf norm"),
])
def test_cli_bad_input_exits_2(tiny_checkpoint, extra, needle, capsys):
    rc = main(["check", "masking", "--model", str(tiny_checkpoint), *extra, *CLI_FAST])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_cli_check_needs_a_check_name():
    with pytest.raises(SystemExit) as e:
        main(["check"])
    assert e.value.code == 2


def test_report_file_is_schema_checked(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"schema": "robustkit.curve", "schema_version": 1}))
    with pytest.raises(ConfigError, match="not a robustkit masking report"):
        load_report(p)
