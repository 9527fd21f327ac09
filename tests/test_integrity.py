"""The function pin: a checkpoint's tensors *and* the metadata that defines what it computes.

Every shipped weight file is checked field by field: an edit of any function field (arch_args,
normalisation, architecture, dataset, class count) is refused on load with one line naming the
field, a descriptive edit (metrics) is not, and the registry pins the function, so a consistently
re-pinned variant (the composite with alpha floor 0.0 instead of 0.8) is still not the shipped model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from robustkit.cli import main
from robustkit.core.checkpoint import field_pins, function_pin, pin_metadata, save_checkpoint
from robustkit.core.errors import CheckpointError
from robustkit.models import base as models_base
from robustkit.models.adaptive_smoothing import build_adaptive_smoothing
from robustkit.models.base import MODELS, WEIGHTS_DIR, load_checkpoint_model, load_model

SHIPPED = sorted(p.name[: -len(".json")] for p in WEIGHTS_DIR.glob("*.json"))


def _registry_pins() -> dict[str, str]:
    """file stem -> the pin every registry tag of that file names (one pin per file)."""
    pins: dict[str, set[str]] = {}
    for entry in MODELS:
        for w in entry.factory().tags.values():
            pins.setdefault(w.file, set()).add(w.pin)
    assert all(len(v) == 1 for v in pins.values()), pins
    return {k: v.pop() for k, v in pins.items()}


def _copy(stem: str, dest: Path) -> Path:
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(WEIGHTS_DIR / (stem + suffix), dest / (stem + suffix))
    return dest / (stem + ".json")


def _edit(meta_path: Path, dotted: str, value: Any = None, *, repin: bool = False) -> None:
    """Set ``meta[dotted]`` (a dotted path) to ``value``, or to a changed value when None."""
    meta = json.loads(meta_path.read_text())
    *parents, leaf = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[leaf] = _changed(node.get(leaf)) if value is None else value
    if repin:
        pin_metadata(meta)
    meta_path.write_text(json.dumps(meta, indent=2))


def _changed(v: Any) -> Any:
    if isinstance(v, bool):
        return not v
    if isinstance(v, int | float):
        return v + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, list):
        return [_changed(v[0]), *v[1:]] if v else [0]
    if isinstance(v, dict):  # only empty dicts are leaves
        return {"added": 1}
    return 1  # None


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_model(path)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


# ------------------------------------------------------------------ shipped files


def test_every_shipped_file_is_pinned_by_its_registry_entry() -> None:
    pins = _registry_pins()
    assert sorted(pins) == SHIPPED  # every shipped file is registered, every registered file ships
    for stem in SHIPPED:
        meta = json.loads((WEIGHTS_DIR / f"{stem}.json").read_text())
        assert meta["function_sha256"] == function_pin(meta) == pins[stem], stem
        assert meta["pins"] == field_pins(meta), stem


@pytest.mark.parametrize("stem", SHIPPED)
def test_every_function_field_edit_is_refused_and_named(stem: str, tmp_path: Path) -> None:
    meta_path = _copy(stem, tmp_path)
    original = meta_path.read_text()
    leaves = [k for k in json.loads(original)["pins"] if k != "sha256"]
    assert {"architecture", "dataset", "num_classes"} <= set(leaves)
    assert any(k.startswith("arch_args.") for k in leaves)
    for leaf in leaves:
        meta_path.write_text(original)
        _edit(meta_path, leaf)
        _refused(meta_path, f"field {leaf} was edited", str(meta_path), "re-train or restore")


@pytest.mark.parametrize(("stem", "field", "value"), [
    ("ltd.cifar10_partial", "arch_args.tau_s", 1.0),
    ("adaptive_smoothing.cifar10_partial", "arch_args.mixing.alpha_min", 0.0),
    ("adaptive_smoothing.cifar10_partial", "arch_args.robust_pin", "0" * 64),
    ("airbench94.cifar10_partial", "arch_args.tta_level", 0),
    ("small_cnn.cifar10_partial", "normalization.mean", [0.5, 0.5, 0.5]),
    ("small_cnn.cifar10_partial", "arch_args.mean", [0.5, 0.5, 0.5]),
    ("small_cnn.cifar10_partial", "architecture", "tiny_cnn"),
    ("small_cnn.cifar10_partial", "architecture", "no_such_arch"),
    ("lightweight_cnn.mnist_partial", "num_classes", 100),
])
def test_named_edits_of_deployed_constants(stem: str, field: str, value: Any, tmp_path: Path) -> None:
    meta_path = _copy(stem, tmp_path)
    _edit(meta_path, field, value)
    _refused(meta_path, f"field {field} was edited after the checkpoint was written")


def test_added_and_removed_fields_are_named(tmp_path: Path) -> None:
    meta_path = _copy("ltd.cifar10_partial", tmp_path)
    original = meta_path.read_text()
    _edit(meta_path, "arch_args.extra", 3)
    _refused(meta_path, "field arch_args.extra was added")
    meta = json.loads(original)
    del meta["arch_args"]["tau_s"]
    meta_path.write_text(json.dumps(meta))
    _refused(meta_path, "field arch_args.tau_s was removed")


@pytest.mark.parametrize("stem", SHIPPED)
def test_descriptive_edits_load(stem: str, tmp_path: Path) -> None:
    meta_path = _copy(stem, tmp_path)
    _edit(meta_path, "metrics", {"note": "re-measured elsewhere"})
    _edit(meta_path, "training", {})
    loaded = load_checkpoint_model(meta_path, expected_pin=_registry_pins()[stem])
    assert loaded.function_sha256 == _registry_pins()[stem]


def test_alpha_floor_variants_have_different_pins_and_the_registry_refuses_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: same mixing-network tensors, alpha floor 0.8 (13% AA) vs 0.0 (0% AA)."""
    stem = "adaptive_smoothing.cifar10_partial"
    meta_path = _copy(stem, tmp_path)
    shipped = json.loads(meta_path.read_text())
    assert shipped["arch_args"]["mixing"]["alpha_min"] == 0.8
    _edit(meta_path, "arch_args.mixing.alpha_min", 0.0, repin=True)  # a consistent, re-pinned variant
    variant = json.loads(meta_path.read_text())
    assert variant["sha256"] == shipped["sha256"]
    assert variant["function_sha256"] != shipped["function_sha256"]
    assert load_checkpoint_model(meta_path).model.config.alpha_min == 0.0  # loads as what it is
    with pytest.raises(CheckpointError, match="differs from the registry's") as err:
        load_checkpoint_model(meta_path, expected_pin=shipped["function_sha256"])
    assert "\n" not in str(err.value)
    # ... and through the registry front door when it sits where the shipped file should be
    monkeypatch.setattr(models_base, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="differs from the registry's"):
        load_model("adaptive_smoothing")


def test_the_composite_pins_its_bases_function(tmp_path: Path) -> None:
    """A re-pinned LTD copy with another tau_s is a different robust base: the composite refuses it."""
    shipped = json.loads((WEIGHTS_DIR / "adaptive_smoothing.cifar10_partial.json").read_text())["arch_args"]
    ltd_copy = _copy("ltd.cifar10_partial", tmp_path).with_suffix(".safetensors")
    pins = {"std_pin": shipped["std_pin"], "robust_pin": shipped["robust_pin"]}
    m = build_adaptive_smoothing(shipped["std"], str(ltd_copy), **pins)  # a faithful copy: same function
    assert m.arch_args["robust_pin"] == shipped["robust_pin"]
    _edit(ltd_copy.with_suffix(".json"), "arch_args.tau_s", 1.0, repin=True)
    with pytest.raises(CheckpointError, match="robust model .* has function pin .* trained with"):
        build_adaptive_smoothing(shipped["std"], str(ltd_copy), **pins)


# ------------------------------------------------------------------ the pin itself, old files, the CLI


def _tiny(path: Path, seed: int = 0) -> Path:
    model = load_model("tiny_cnn.init", seed=seed).model
    save_checkpoint(model, path, architecture="tiny_cnn", arch_args={}, dataset="synthetic", num_classes=10,
                    metrics={"clean_acc": 0.5})
    return path.with_name(path.name + ".json")


def test_save_writes_pins_that_round_trip(tmp_path: Path) -> None:
    meta_path = _tiny(tmp_path / "t")
    meta = json.loads(meta_path.read_text())
    assert meta["pins"]["arch_args"] and meta["function_sha256"] == function_pin(meta)
    assert load_checkpoint_model(meta_path).function_sha256 == meta["function_sha256"]


def test_swapped_tensors_with_a_matching_sha256_are_named(tmp_path: Path) -> None:
    meta_path, other = _tiny(tmp_path / "t"), _tiny(tmp_path / "u", seed=1)
    shutil.copyfile(other.with_suffix(".safetensors"), meta_path.with_suffix(".safetensors"))
    _edit(meta_path, "sha256", json.loads(other.read_text())["sha256"])
    _refused(meta_path, "field sha256 was edited")


def test_an_edited_pin_is_refused(tmp_path: Path) -> None:
    meta_path = _tiny(tmp_path / "t")
    _edit(meta_path, "function_sha256", "0" * 64)
    _refused(meta_path, "function_sha256", "the pin was edited")


def test_old_unpinned_checkpoint_loads_with_a_one_line_warning(tmp_path: Path, capsys) -> None:
    meta_path = _tiny(tmp_path / "t")
    meta = json.loads(meta_path.read_text())
    pin = meta.pop("function_sha256")
    del meta["pins"]
    meta_path.write_text(json.dumps(meta))
    loaded = load_checkpoint_model(meta_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no function pin" in err[0] and str(meta_path) in err[0]
    assert loaded.function_sha256 == pin  # still computed: the same function as when it was pinned
    load_checkpoint_model(meta_path, expected_pin=pin)  # the registry vouches for it: no warning
    assert capsys.readouterr().err == ""
    with pytest.raises(CheckpointError, match="registry"):
        load_checkpoint_model(meta_path, expected_pin="0" * 64)
    # tensors are still verified
    blob = bytearray(meta_path.with_suffix(".safetensors").read_bytes())
    blob[-1] ^= 0xFF
    meta_path.with_suffix(".safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint_model(meta_path)


def test_cli_refuses_a_tampered_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    meta_path = _copy("ltd.cifar10_partial", tmp_path)
    _edit(meta_path, "arch_args.tau_s", 1.0)
    code = main(["eval", "--model", str(meta_path.with_suffix(".safetensors")), "--attack", "none",
                 "--dataset", "synthetic", "--threads", "1", "--no-progress", "--out", str(tmp_path / "r.json")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("robustkit: error:") and "field arch_args.tau_s was edited" in lines[0]
    assert not (tmp_path / "r.json").exists()
