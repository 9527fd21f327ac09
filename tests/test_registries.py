"""Tests over the registries (timm's habit): every registered model, trainer and attack, and the
recipe of every shipped weight file.

The parameters are read from the registries when pytest collects this file, so a new model file,
trainer file, attack file or weight file is tested here without anybody editing a test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MixedStandIn
from torch import nn

from robustkit.attacks import ATTACKS, KINDS, attack_from_config, create_attack, list_attacks
from robustkit.core.checkpoint import sha256_file
from robustkit.core.config import config_fields, config_from_dict, config_to_dict, read_recipe, resolve_config
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel
from robustkit.data import dataset_info, list_datasets, load_split
from robustkit.eval import evaluate
from robustkit.models import MODELS, list_models, load_model
from robustkit.models.base import WEIGHTS_DIR, resolve_model_name
from robustkit.train import RunOptions, get_trainer, list_trainers

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "defenses"

MODEL_IDS = list_models()
TRAINER_NAMES = [t.name for t in list_trainers()]
# The producers issue 13 moves into the trainer registry; a smaller registry means one went missing.
BUILT_IN_TRAINERS = {"airbench94", "lightweight_cnn", "pgd_at", "trades", "fast_at", "ltd", "adaptive_smoothing"}
WEIGHT_STEMS = sorted(p.name.removesuffix(".safetensors") for p in WEIGHTS_DIR.glob("*.safetensors"))


def _attack_cases() -> list[str]:
    """Every name users type, plus ``kind:<k>`` for a registered kind no name reaches."""
    names = list_attacks()
    reached = {ATTACKS.get(n).factory()["attack"] for n in names}
    return names + [f"kind:{k}" for k in KINDS.names() if k not in reached]


ATTACK_CASES = _attack_cases()


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_model_builds_loads_its_weights_and_maps_images_to_logits(model_id: str, one_thread: None) -> None:
    info, tag = resolve_model_name(model_id)
    loaded = load_model(model_id)  # a shipped tag is verified against its registry pin on load
    if tag == "init":
        assert loaded.checkpoint_sha256 is None
    else:
        weights = info.tags[tag]
        assert loaded.checkpoint_sha256 == sha256_file(WEIGHTS_DIR / f"{weights.file}.safetensors")
        if not weights.arch_args:  # a tag's arch_args override is pinned by the source, not the file
            assert loaded.function_sha256 == weights.pin
    assert not loaded.model.training
    # a tag's own data (small_cnn's Fashion-MNIST weights take 1 x 28 x 28), else the architecture's
    shape = dataset_info(loaded.dataset).shape if loaded.dataset in list_datasets() else info.input_shape
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.model(x)
    assert logits.shape == (2, info.num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_model_ids_are_every_tag_and_init_of_every_architecture() -> None:
    expected = set()
    for entry in MODELS:
        expected |= {f"{entry.name}.{tag}" for tag in entry.factory().tags} | {f"{entry.name}.init"}
    assert set(MODEL_IDS) == expected and len(MODEL_IDS) == len(expected)


def test_every_shipped_weight_file_is_registered() -> None:
    registered = {w.file for entry in MODELS for w in entry.factory().tags.values()}
    assert set(WEIGHT_STEMS) <= registered, f"weight files no model tag loads: {set(WEIGHT_STEMS) - registered}"


# --------------------------------------------------------------------------- trainers


def test_the_built_in_trainers_are_registered() -> None:
    missing = BUILT_IN_TRAINERS - set(TRAINER_NAMES)
    assert not missing, f"trainers not in the registry: {sorted(missing)}"


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_smoke_run_writes_a_checkpoint_that_evaluates(name: str, tmp_path: Path, one_thread: None) -> None:
    trainer = get_trainer(name)
    synthetic = {"dataset": "synthetic"} if "dataset" in config_fields(trainer.config) else {}
    config = config_from_dict(trainer.config, {**synthetic, **trainer.smoke}, source=f"{name} smoke")
    checkpoint = trainer(config, RunOptions(out=tmp_path / name, progress=False))
    recorded = json.loads(checkpoint.path.with_suffix(".json").read_text())
    assert recorded["trainer"] == name
    config_from_dict(trainer.config, recorded["config"], source="recorded config")  # a valid config
    # The record is the config that ran; a field given as "auto" may be recorded as what it resolved to.
    given = config_to_dict(config)
    assert {k: v for k, v in recorded["config"].items() if given.get(k) != "auto"} == \
        {k: v for k, v in given.items() if v != "auto"}

    loaded = load_model(str(checkpoint.path))
    x, y = load_split("synthetic", "test").tensors(16)
    attack = create_attack("pgd", norm="Linf", eps="8/255", steps=2)
    result = evaluate(loaded.model, attack, x, y, device="cpu", progress=False)
    assert result.n_examples == 16 and result.budget is not None
    assert result.robust_accuracy is not None and result.robust_accuracy <= result.clean_accuracy


# --------------------------------------------------------------------------- attacks


def _model_for(attack: Any, tiny: nn.Module) -> nn.Module:
    """The tiny model, or the mixed one where the attack's own check refuses the tiny model."""
    try:
        getattr(attack, "check_model", lambda model: None)(tiny)
        return tiny
    except ConfigError:
        from robustkit.models import create_model

        return MixedStandIn(tiny, create_model("tiny_cnn.init", seed=1), 3 * 32 * 32, 0.01, 1).eval()


@pytest.mark.parametrize("case", ATTACK_CASES)
def test_attack_runs_on_a_tiny_model_within_its_budget(case: str, tiny_model: nn.Module, one_thread: None) -> None:
    if case.startswith("kind:"):
        kind = case.removeprefix("kind:")
        attack = KINDS.get(kind).factory(ThreatModel.create("Linf", "8/255"), **KINDS.get(kind).meta["smoke"])
    else:
        kind = ATTACKS.get(case).factory()["attack"]
        attack = create_attack(case, norm="Linf", eps="8/255", **KINDS.get(kind).meta["smoke"])
    x, y = load_split("synthetic", "test").tensors(8)
    # The harness raises BudgetViolationError on any example outside the ball or [0, 1].
    result = evaluate(_model_for(attack, tiny_model), attack, x, y, device="cpu", progress=False)
    assert result.budget is not None and result.budget["checked"] > 0  # it attacked something
    assert result.budget["max_linf"] <= attack.eps + result.budget["tolerance"]
    assert result.robust_accuracy is not None and result.robust_accuracy <= result.clean_accuracy
    # What a result records rebuilds the same attack (robustkit regress depends on it).
    config = json.loads(json.dumps(attack.config()))
    assert attack_from_config(config).config() == attack.config()


# --------------------------------------------------------------------------- recipes of shipped weights


@pytest.mark.parametrize("stem", WEIGHT_STEMS)
def test_shipped_weight_file_has_a_recipe(stem: str) -> None:
    assert (RECIPES / f"{stem}.toml").exists(), f"no recipe defenses/{stem}.toml for robustkit/weights/{stem}"


@pytest.mark.parametrize("stem", [s for s in WEIGHT_STEMS if (RECIPES / f"{s}.toml").exists()])
def test_recipe_resolves_to_the_config_its_weights_record(stem: str) -> None:
    meta, fields = read_recipe(RECIPES / f"{stem}.toml")
    assert "trainer" in meta, f"defenses/{stem}.toml names no trainer"
    trainer = get_trainer(meta["trainer"])
    config = resolve_config(trainer.config, recipe=fields, recipe_source=f"defenses/{stem}.toml")
    recorded = json.loads((WEIGHTS_DIR / f"{stem}.json").read_text())
    assert recorded.get("trainer") == trainer.name
    resolved, saved = config_to_dict(config), recorded.get("config")
    # A field added after the weights were trained is absent from their record; it may only hold its
    # default, which must be the behaviour they were trained with (e.g. flip = true).
    defaults = config_to_dict(trainer.config())
    later = {k: v for k, v in resolved.items() if k not in saved}
    assert later == {k: defaults[k] for k in later}, f"defenses/{stem}.toml sets fields its weights never saw"
    assert {k: v for k, v in resolved.items() if k in saved} == saved
