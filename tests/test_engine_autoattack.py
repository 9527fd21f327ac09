"""AutoAttack on robustkit's engine (``autoattack-rk``, ``autoattack-fast``) through the harness.

What the engine promises at the level users see: every stage's per-example result is the same at
any batch size, order or shard split; broken points cost no further passes; the result JSON names
the engine, and the leaderboard refuses the screening version. The engine's pieces (APGD, FAB-T,
Square) are checked against pyautoattack in their own test files.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from robustkit.attacks import attack_from_config, create_attack
from robustkit.attacks.autoattack_rk import VERSIONS, malt_targets
from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.eval import evaluate
from robustkit.eval.results import EvalResult
from robustkit.leaderboard.submission import comparability_problems, result_engine

pytestmark = pytest.mark.usefixtures("one_thread")

# The standard protocol, shortened so a test takes seconds: every stage still runs every target.
SHORT = {"n_iter": 6, "fab_iter": 4, "n_queries": 30, "n_target_classes": 3}


def test_every_stage_is_the_same_at_batch_sizes_1_7_64_and_in_any_order(tiny_model, synthetic_test, tmp_path):
    x, y = synthetic_test[0][:40], synthetic_test[1][:40]
    attack = create_attack("autoattack-rk", eps=4 / 255, **SHORT)
    flags, stages = set(), set()
    for batch_size in (1, 7, 64):
        r = evaluate(tiny_model, attack, x, y, batch_size=batch_size, seed=3, device="cpu", progress=False,
                     records_path=tmp_path / f"bs{batch_size}.records.jsonl")
        flags.add(r.robust_flags)
        stages.add(tuple((s.name, s.n_attacked, s.n_broken) for s in r.stages))
    assert len(flags) == 1 and len(stages) == 1
    robust = next(iter(flags))
    assert 0 < robust.count("1") < 40, "the test needs some points broken and some not"
    # Any order, stage by stage: each example's seed travels with it, so shuffling the batch gives
    # every example the same adversarial image (up to the model's rounding) and the same verdict.
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    seeds = torch.arange(1000, 1040)
    for stage in attack.stages():
        plain = attack.perturb(tiny_model, x, y, stage=stage, seed=0, example_seeds=seeds)
        shuffled = attack.perturb(tiny_model, x[perm], y[perm], stage=stage, seed=0, example_seeds=seeds[perm])
        assert torch.allclose(shuffled, plain[perm], atol=1e-5), stage
        assert torch.equal(tiny_model(shuffled).argmax(1), tiny_model(plain[perm]).argmax(1)), stage


def test_broken_points_cost_nothing_more_and_passes_add_up(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:32], synthetic_test[1][:32]
    strong = evaluate(tiny_model, create_attack("autoattack-rk", eps=0.5, **SHORT), x, y, batch_size=32, seed=0,
                      device="cpu", progress=False)
    ce = next(s for s in strong.stages if s.name == "apgd-ce")
    # eps 0.5 breaks every clean-correct point within the first couple of iterations: a full run
    # would cost n_iter + 1 gradient passes per point.
    assert ce.n_broken == ce.n_attacked > 0
    assert ce.backward_passes <= 2 * ce.n_attacked < (SHORT["n_iter"] + 1) * ce.n_attacked
    assert all(s.n_attacked == 0 and s.forward_passes == 0 for s in strong.stages if s.name not in ("clean", "apgd-ce"))
    assert strong.passes["backward"] == sum(s.backward_passes for s in strong.stages)


def test_result_names_the_engine_and_the_config_round_trips(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:8], synthetic_test[1][:8]
    engines = {}
    for name in ("autoattack-rk", "autoattack-fast"):
        attack = create_attack(name, eps=0.03)
        engines[name] = attack.engine
        again = attack_from_config(attack.config())
        assert again.config() == attack.config() and again.engine == attack.engine
    assert engines == {"autoattack-rk": "rk", "autoattack-fast": "fast"}
    assert create_attack("autoattack", eps=0.03).engine == "reference"
    assert create_attack("autoattack-rk", eps=0.03, n_iter=10).engine == "custom"
    short = evaluate(tiny_model, create_attack("autoattack-fast", eps=0.03, n_iter=3), x, y, batch_size=8,
                     seed=0, device="cpu", progress=False)
    assert short.to_dict()["engine"] == "custom" and short.attack_config["target_ranking"] == "malt"
    pgd = evaluate(tiny_model, create_attack("pgd", eps=0.03, steps=2), x, y, batch_size=8, seed=0, device="cpu",
                   progress=False)
    assert "engine" not in pgd.to_dict()


def _as_leaderboard_result(result: EvalResult, engine: str | None) -> EvalResult:
    """A result that passes every other comparability check, with the given engine."""
    result.dataset, result.n_examples, result.engine = "cifar10", 10000, engine
    result.data = {"split": "test", "indices": "first-n"}
    result.attack_config = {**(result.attack_config or {}), "version": "standard",
                            "stages": ["apgd-ce", "apgd-t", "fab-t", "square"]}
    return result


def test_leaderboard_takes_reference_and_rk_and_refuses_fast(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:4], synthetic_test[1][:4]
    r = evaluate(tiny_model, create_attack("autoattack-rk", eps=8 / 255, **SHORT), x, y, batch_size=4, seed=0,
                 device="cpu", progress=False)
    for engine, ok in (("reference", True), ("rk", True), ("fast", False), ("custom", False)):
        problems = comparability_problems(_as_leaderboard_result(r, engine))
        assert (not problems) == ok, (engine, problems)
        if not ok:
            assert any(p.startswith("engine:") for p in problems)
    # Results written before the engine existed carry no engine field: they were the reference's.
    old = _as_leaderboard_result(r, None)
    old.attack_config = {**old.attack_config, "name": "autoattack"}
    assert result_engine(old) == "reference"


def test_malt_ranking_is_the_linearised_distance(tiny_model, synthetic_test):
    x, y = synthetic_test[0][:6], synthetic_test[1][:6]
    keep = tiny_model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    for norm, dual in (("Linf", 1), ("L2", 2)):
        got = malt_targets(tiny_model, x, y, 4, norm=norm, n_candidates=9)
        for e in range(len(y)):  # brute force: the full Jacobian of one example, class by class
            jac = torch.autograd.functional.jacobian(lambda v: tiny_model(v[None])[0], x[e]).flatten(1)
            z = tiny_model(x[e][None])[0]
            dist = {t: float((z[y[e]] - z[t]).detach() / (jac[y[e]] - jac[t]).norm(p=dual)) for t in range(10) if t != y[e]}
            want = sorted(dist, key=dist.get)[:4]
            assert got[e].tolist() == want, (norm, e)


def test_adaptive_variant_needs_a_mixer_and_attacks_it(tiny_model, synthetic_test):
    from conftest import MixedStandIn

    x, y = synthetic_test[0][:16], synthetic_test[1][:16]
    attack = create_attack("autoattack-rk-adaptive", eps=0.03, **SHORT)
    assert attack.w == 0.5 and attack.engine == "custom"
    with pytest.raises(ConfigError, match="forward_with_gamma"):
        attack.check_model(tiny_model)
    mixed = MixedStandIn(tiny_model, tiny_model, x[0].numel(), 0.05, seed=0)
    r = evaluate(mixed, attack, x, y, batch_size=16, seed=0, device="cpu", progress=False)
    assert r.robust_accuracy is not None and r.robust_accuracy <= r.clean_accuracy


@pytest.mark.parametrize("bad, match", [
    ({"version": "quick"}, "version"), ({"stages": ["square", "apgd-ce"]}, "order"),
    ({"stages": ["apgd-x"]}, "unknown"), ({"n_iter": 0}, "n_iter"), ({"target_ranking": "random"}, "ranking"),
    ({"w": -1}, "w must"), ({"n_queries": 0}, "n_queries"),
])
def test_bad_parameters_are_one_line_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        create_attack("autoattack-rk", eps=0.03, **bad)


def test_versions_are_the_documented_protocols():
    assert VERSIONS["standard"]["stages"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert VERSIONS["standard"]["n_target_classes"] == 9 and VERSIONS["standard"]["n_queries"] == 5000
    assert VERSIONS["standard"]["fab_target_classes"] == 9 and VERSIONS["standard"]["target_ranking"] == "logit"
    fast = VERSIONS["fast"]
    assert fast["stages"] == ["apgd-ce", "apgd-t", "fab-t"] and fast["target_ranking"] == "malt"
    assert fast["n_target_classes"] == 5 and fast["fab_target_classes"] == 1


def test_cli_fast_and_shards_merge_to_the_single_run(tiny_checkpoint, tmp_path, capsys):
    common = ["eval", "--model", str(tiny_checkpoint), "--dataset", "synthetic", "--n-examples", "24",
              "--attack", "autoattack-fast", "--attack-arg", "n_iter=4", "--eps", "0.05", "--no-progress",
              "--device", "cpu"]
    assert main([*common, "--batch-size", "24", "--out", str(tmp_path / "one.json")]) == 0
    for i in range(2):
        assert main([*common, "--batch-size", "5", "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}.json")]) == 0
    assert main(["merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out",
                 str(tmp_path / "merged.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert one["robust_flags"] == merged["robust_flags"] and one["engine"] == "custom"
    assert math.isclose(one["robust_accuracy"], merged["robust_accuracy"])


def test_the_model_gets_its_weights_back_untouched(tiny_model, synthetic_test):
    """The engine runs a stage on channels-last weights (faster on CPU) and must hand the user's
    model back as it was: same storage, same strides, no gradients."""
    x, y = synthetic_test[0][:8], synthetic_test[1][:8]
    before = {n: (p.data_ptr(), p.stride(), p.grad) for n, p in tiny_model.named_parameters()}
    attack = create_attack("autoattack-rk", eps=4 / 255, **SHORT)
    for stage in attack.stages():
        attack.perturb(tiny_model, x, y, stage=stage, seed=0)
    assert {n: (p.data_ptr(), p.stride(), p.grad) for n, p in tiny_model.named_parameters()} == before


def test_regress_never_gates_one_engine_with_another(tiny_model, synthetic_test, tmp_path):
    import dataclasses

    from robustkit.eval.regress import MISMATCH, OK, Baseline, compare

    x, y = synthetic_test[0][:8], synthetic_test[1][:8]
    r = evaluate(tiny_model, create_attack("autoattack-fast", eps=4 / 255, n_iter=4), x, y, batch_size=8, seed=0,
                 device="cpu", progress=False)
    baseline = Baseline(tmp_path / "b.json", "auto", 0.05, "robustkit eval ...", r)
    assert compare(baseline, r).verdict == OK
    other = dataclasses.replace(r, engine="fast")
    verdict = compare(baseline, other)
    assert verdict.verdict == MISMATCH and "custom" in verdict.reason and "fast" in verdict.reason
    # A result written before results named their engine: AutoAttack's was the reference's.
    old = dataclasses.replace(r, engine=None, attack_config={**r.attack_config, "name": "autoattack"})
    assert compare(Baseline(tmp_path / "o.json", "auto", 0.05, "cmd", old), other).verdict == MISMATCH


def _script(folder: str, name: str):
    """A script of ``eval/<folder>/`` imported as a module (they are not in the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "eval" / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eval_{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strength_script():
    return _script("engines", "strength")


def test_strength_statistics_against_scipy():
    from scipy.stats import binomtest

    strength = _strength_script()
    for b, c in [(0, 0), (0, 3), (5, 1), (7, 7), (2, 11), (30, 12)]:
        want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
        assert math.isclose(strength.mcnemar_two_sided(b, c), want, rel_tol=1e-9), (b, c)
    assert strength.agreement("1100", "1010") == {"both_robust": 1, "only_reference_robust": 1,
                                                 "only_other_robust": 1, "both_broken": 1}
    results = {e: {"robust_flags": f, "clean_flags": "1111", "clean_accuracy": 1.0, "robust_accuracy": f.count("1") / 4,
                   "timing": {"total_seconds": 1.0}, "passes": {}, "_path": e}
               for e, f in (("reference", "1100"), ("rk", "1100"), ("fast", "1110"))}
    row = strength.summarise("m", "standard", 4, results)
    assert row["worst_case_accuracy"] == 0.5 and row["versus_reference"]["rk"]["target_met"]
    assert row["versus_reference"]["fast"]["points_above_reference"] == 25.0
    assert not row["versus_reference"]["fast"]["target_met"]


def _bench_script():
    return _script("benchmarks", "engines")


def test_speed_benchmark_resumes_a_killed_run(tmp_path, monkeypatch):
    """Each finished run is on disk at once: a second invocation redoes only what the first did not
    finish, and runs made under other settings are refused rather than mixed in."""
    bench = _bench_script()
    calls: list[tuple[str, str]] = []

    def fake(model, attack, n, out, args):
        calls.append((model, attack))
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed in the middle of the fourth run
        t = {"autoattack": 10.0}.get(attack, 4.0 if "rk" in attack else 1.0)
        return {"wall_s": t + 1, "attack_s": t, "robust_accuracy": 0.5, "forward_passes": 10,
                "backward_passes": 5, "stage_seconds": {}}

    monkeypatch.setattr(bench, "time_one", fake)
    out = tmp_path / "bench.json"
    argv = ["--models", "small_cnn.cifar10_partial,ltd.cifar10_partial", "--repeats", "2", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    assert len(calls) == 4 and not out.exists()
    # another process (core) runs repeat 1 alone: its 6 runs, no figures yet
    assert bench.main([*argv, "--repeat", "1"]) == 0 and len(calls) == 4 + 6 and not out.exists()
    assert bench.main(argv) == 0  # every target met: rk at 0.4x (<= 0.5x), fast at 0.1x (<= 0.2x)
    # 2 models x 3 engines x 2 repeats = 12 runs; the first 3 and repeat 1 were kept, the 4th was redone.
    assert len(calls) == 4 + 6 + 3
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 12
    row = report["rows"][0]
    assert row["fraction_of_reference"] == {"rk": 0.4, "fast": 0.1}
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--threads", "2"])
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "--repeat", "2"])
    assert e.value.code == 2
