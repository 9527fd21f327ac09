"""The fedloge trainer's outputs are robustkit models: the generic one, the ablation without GLA-FR and
one personalised model per client, which ``robustkit eval --client k`` scores on the client's own local
test set with the accuracy the trainer measured."""

from __future__ import annotations

import json

import pytest
import torch

from robustkit.cli import main
from robustkit.core.config import resolve_config
from robustkit.federated.checkpoints import client_checkpoint
from robustkit.models import load_model
from robustkit.train import RunOptions, get_trainer
from robustkit.train.fedloge import SMOKE, FedLoGeConfig


def _train(tmp_path, **changes):
    config = resolve_config(FedLoGeConfig, overrides=[f"{k}={v}" for k, v in
                                                      {**SMOKE, "dataset": "synthetic", **changes}.items()])
    return get_trainer("fedloge")(config, RunOptions(out=tmp_path / "fl", progress=False))


@pytest.fixture(scope="module")
def fedloge_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("fedloge"))


def test_a_run_writes_the_generic_the_ablation_and_every_client(fedloge_run):
    meta = fedloge_run.metadata
    k = meta["training"]["federated"]["clients"]
    folder = fedloge_run.path.parent
    assert k == 3 and all((folder / f"fl.client{c}.safetensors").exists() for c in range(k))
    generic, ablation = load_model(str(fedloge_run.path)), load_model(str(folder / "fl.no_glafr.safetensors"))
    rows = generic.model.head.weight.norm(dim=1)
    assert torch.allclose(rows, torch.full_like(rows, 1.7), atol=1e-5)  # GLA-FR global: equal row norms
    assert not torch.allclose(ablation.model.head.weight.norm(dim=1), rows)  # the ablation keeps psi as trained
    # Same backbone: only the classifier differs between the generic model and its ablation.
    g, a = generic.model.state_dict(), ablation.model.state_dict()
    assert all(torch.equal(g[key], a[key]) for key in g if not key.startswith("head"))
    for c in range(k):
        local = json.loads((folder / f"fl.client{c}.json").read_text())["training"]
        assert local["local_train_counts"] == meta["training"]["federated"]["split"]["client_counts"][c]
        assert local["client"] == c and local["local_test_positions"] == sorted(local["local_test_positions"])


def test_eval_client_scores_the_local_test_set_as_the_trainer_measured(fedloge_run, tmp_path):
    folder = fedloge_run.path.parent
    per_client = fedloge_run.metadata["metrics"]["local_acc_per_client"]["unmasked"]
    for c in range(3):
        out = tmp_path / f"c{c}.json"
        assert main(["eval", "--model", str(fedloge_run.path), "--client", str(c), "--attack", "none",
                     "--out", str(out), "--no-progress", "--quiet"]) == 0
        res = json.loads(out.read_text())
        local = json.loads((folder / f"fl.client{c}.json").read_text())["training"]
        assert res["n_examples"] == len(local["local_test_positions"]) and res["data"]["client"] == c
        assert res["clean_accuracy"] == pytest.approx(per_client[c])
        assert res["provenance"]["checkpoint_sha256"] == json.loads(
            (folder / f"fl.client{c}.json").read_text())["sha256"]


def test_client_checkpoint_refuses_what_is_not_a_federated_run(fedloge_run, tmp_path):
    from robustkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="clients 0 to 2"):
        client_checkpoint(str(fedloge_run.path), 3)
    with pytest.raises(ConfigError, match="not a federated run"):
        client_checkpoint(str(fedloge_run.path.parent / "fl.no_glafr.safetensors"), 0)


def test_fedavg_personalises_by_fine_tuning_the_global_head(tmp_path):
    ckpt = _train(tmp_path, method="fedavg")
    folder = ckpt.path.parent
    assert not (folder / "fl.no_glafr.safetensors").exists()
    generic = load_model(str(ckpt.path)).model.state_dict()
    client = load_model(str(folder / "fl.client0.safetensors")).model.state_dict()
    assert "head2.weight" not in client
    assert not torch.equal(client["head.weight"], generic["head.weight"])  # fine-tuned on the client's data
    assert all(torch.equal(client[k], generic[k]) for k in generic if not k.startswith("head"))


def _row(run, seed, flags, local, ablation_flags=None):
    metrics = {"balanced_clean_acc": flags.count("1") / len(flags), "groups": {"many": 0.5}, "clean_flags": flags,
               "local_acc_unmasked": local, "local_acc_masked": local + 0.1}
    if ablation_flags is not None:
        metrics["no_glafr"] = {**metrics, "clean_flags": ablation_flags, "local_acc_unmasked": local - 0.1,
                               "balanced_clean_acc": ablation_flags.count("1") / len(ablation_flags)}
    return {"setting": "cifar10-lt100", "run": run, "seed": seed, "metrics": metrics, "train_wall_s": 10.0}


def test_comparison_summary_splits_each_run_into_its_two_methods_and_pairs_with_fedavg():
    from robustkit.train.fedloge_compare import summarise

    rows = [_row("fedavg", 0, "1000", 0.6), _row("fedloge", 0, "1110", 0.8, ablation_flags="1100")]
    by = {s["method"]: s for s in summarise(rows)}
    assert by["fedavg"]["local_unmasked_mean"] is None  # FedAvg alone has no personalised model
    assert by["fedavg+ft"]["local_unmasked_mean"] == pytest.approx(0.6)
    assert by["fedloge"]["generic_acc_mean"] == pytest.approx(0.75)
    assert by["fedloge-no-glafr"]["generic_acc_mean"] == pytest.approx(0.5)
    assert by["fedloge-no-glafr"]["local_unmasked_mean"] == pytest.approx(0.7)
    assert (by["fedloge"]["vs_fedavg"]["only_b"], by["fedloge"]["vs_fedavg"]["only_a"]) == (2, 0)
    assert by["fedloge"]["trains"] and not by["fedloge-no-glafr"]["trains"]
