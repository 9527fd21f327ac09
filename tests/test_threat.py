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


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("2.5E-2", 0.025), ("1e-3/2", 5e-4), ("-0", 0.0)])
def test_parse_eps_accepts_scientific_notation(text, value):
    assert parse_eps(text) == pytest.approx(value, abs=0, rel=1e-15)


@pytest.mark.parametrize("bad,needle", [("-1", "is negative"), ("-8/255", "is negative"), (-0.5, "is negative"),
                                        ("nan", "finite"), (float("inf"), "finite"), ("1e400", "too large"),
                                        ("8/25x", "malformed eps")])
def test_parse_eps_says_what_is_wrong(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_eps(bad)


@pytest.mark.parametrize("eps", ["1e9", "1000000000", "2", 1.5])
def test_linf_eps_beyond_the_input_range_is_refused(eps):
    with pytest.raises(ConfigError, match="larger than the input range"):
        ThreatModel.create("Linf", eps)
    assert ThreatModel.create("Linf", "1").eps == 1.0  # the whole image box: allowed (masking's unbounded point)
    assert ThreatModel.create("L2", "2").eps == 2.0  # L2 budgets above 1 are ordinary


def test_no_default_eps_names_the_close_dataset():
    with pytest.raises(ConfigError, match="did you mean 'cifar10'") as e:
        ThreatModel.create("Linf", None, "cifar11")
    assert "pass --eps" not in str(e.value)


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
