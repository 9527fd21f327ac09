"""The one config mechanism: dataclass <-> TOML recipe <-> --set overrides, with one-line errors."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from robustkit.cli.train import to_toml
from robustkit.core.config import (
    config_from_dict,
    config_to_dict,
    describe_config,
    parse_override,
    read_recipe,
    resolve_config,
)
from robustkit.core.errors import ConfigError


@dataclass(frozen=True)
class Demo:
    """A config with one field of each kind the trainers use."""

    epochs: int = 10
    lr: float = 0.1
    eps: str = "8/255"
    nesterov: bool = True
    schedule: Literal["onecycle", "piecewise"] = "onecycle"
    milestones: list[int] = field(default_factory=lambda: [5, 8])
    widths: tuple[int, int, int] = (64, 256, 256)
    arch_args: dict[str, int] = field(default_factory=dict)
    teacher: str | None = None


def test_defaults_recipe_overrides_fixed_resolve_in_that_order():
    cfg = resolve_config(Demo, recipe={"epochs": 3, "lr": 1}, overrides=["epochs=5", "eps=2/255"],
                         fixed={"epochs": 7, "not_a_field": 1})
    assert cfg.epochs == 7 and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.eps == "2/255"
    assert cfg.widths == (64, 256, 256) and cfg.teacher is None


def test_to_dict_and_back_is_the_identity():
    cfg = resolve_config(Demo, overrides=["widths=[8, 16, 16]", "arch_args={ width = 4 }", "teacher=t.x"])
    data = config_to_dict(cfg)
    assert data["widths"] == [8, 16, 16] and data["arch_args"] == {"width": 4}
    assert config_from_dict(Demo, data) == cfg


def test_printed_toml_reads_back_to_the_same_config(tmp_path):
    cfg = resolve_config(Demo, overrides=["milestones=[1, 2]", "schedule=piecewise", "arch_args={ width = 4 }"])
    path = tmp_path / "r.toml"
    path.write_text(to_toml("demo", cfg))
    meta, fields = read_recipe(path)
    assert meta == {"trainer": "demo"}
    assert resolve_config(Demo, recipe=fields) == cfg


@pytest.mark.parametrize("data, needles", [
    ({"epoch": 3}, ["unknown key 'epoch'", "did you mean 'epochs'"]),
    ({"epochs": 2.5}, ["epochs = 2.5", "expected an integer"]),
    ({"epochs": True}, ["expected an integer"]),
    ({"lr": "fast"}, ["lr = 'fast'", "expected a number"]),
    ({"nesterov": "yes"}, ["expected true or false"]),
    ({"schedule": "onecycel"}, ["expected 'onecycle' or 'piecewise'", "did you mean 'onecycle'"]),
    ({"milestones": [1, "x"]}, ["milestones[1]"]),
    ({"widths": [1, 2]}, ["expected 3 values"]),
    ({"arch_args": 3}, ["expected a table"]),
])
def test_wrong_keys_and_types_are_one_line_errors(data, needles):
    with pytest.raises(ConfigError) as info:
        config_from_dict(Demo, data, source="recipe r.toml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("recipe r.toml")
    for needle in needles:
        assert needle in msg, msg


def test_override_values_are_read_as_toml_else_as_strings():
    assert parse_override("epochs=5") == ("epochs", 5)
    assert parse_override("eps=8/255") == ("eps", "8/255")
    assert parse_override("flag=true") == ("flag", True)
    assert parse_override("xs=[1, 2]") == ("xs", [1, 2])
    assert parse_override('name="a=b"') == ("name", "a=b")
    for bad in ("epochs", "=5", "1x=2"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="^--set: unknown key 'epoch'"):
        resolve_config(Demo, overrides=["epoch=1"])


def test_a_number_given_for_a_text_field_is_that_text():
    # `--set eps=0.1` must not need shell-proof quotes; the text is kept as typed (not "0.1" from 1e-1).
    cfg = resolve_config(Demo, overrides=["eps=0.10", "teacher=3"])
    assert cfg.eps == "0.10" and cfg.teacher == "3"
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config(Demo, overrides=["epochs=0.5"])  # numbers still type-check where they are numbers


def test_recipe_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        read_recipe(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        read_recipe(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_recipe(bad)
    bad.write_text("trainer = 3\n")
    with pytest.raises(ConfigError, match="trainer = 3: expected a string"):
        read_recipe(bad)


def test_describe_lists_every_field_with_its_default():
    rows = {name: (kind, default) for name, kind, default in describe_config(Demo)}
    assert rows["epochs"] == ("an integer", "10")
    assert rows["milestones"] == ("a list of integers", "[5, 8]")
    assert list(rows) == [f for f in Demo.__dataclass_fields__]
    assert tomllib.loads(to_toml("demo", Demo()))["epochs"] == 10
