import pytest

from robustkit.core.errors import ConfigError, UnknownNameError
from robustkit.core.registry import Registry
from robustkit.core.threat import ThreatModel, format_eps, parse_eps, parse_norm


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.5", 0.5), (0.3, 0.3), ("2 / 255", 2 / 255),
                                        (".25", 0.25), ("0", 0.0), (1, 1.0)])
def test_parse_eps_accepts_fractions_and_floats(text, value):
    assert parse_eps(text) == pytest.approx(value, abs=0, rel=1e-15)


@pytest.mark.parametrize("bad", ["8/25x", "", "eight", "8/0", "-0.1", "1e", "8//255", "nan", True, float("inf")])
def test_parse_eps_rejects_malformed(bad):
    with pytest.raises(ConfigError):
        parse_eps(bad)


def test_format_and_defaults():
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(0.5) == "0.5"
    assert ThreatModel.create("linf", None, "cifar10").eps == pytest.approx(8 / 255)
    assert ThreatModel.create("L2", None, "cifar10").eps == 0.5
    assert ThreatModel.create("Linf", None, "mnist").eps == pytest.approx(0.3)
    assert parse_norm("inf") == "Linf"
    with pytest.raises(ConfigError):
        parse_norm("L3")


def test_registry_close_matches():
    reg: Registry[int] = Registry("widget")
    reg.register("autoattack", lambda: 1)
    with pytest.raises(UnknownNameError, match="did you mean 'autoattack'"):
        reg.get("autoatack")
    with pytest.raises(ValueError):
        reg.register("autoattack", lambda: 2)
