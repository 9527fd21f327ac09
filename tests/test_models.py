"""Model registry, shipped SmallCNN weights, checkpoint integrity and the rb: adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import robustkit.models.small_cnn as small_cnn
from robustkit.core.checkpoint import save_checkpoint, sha256_file
from robustkit.core.errors import CheckpointError, ConfigError, UnknownNameError
from robustkit.models.base import (
    WEIGHTS_DIR,
    create_model,
    load_checkpoint_model,
    load_model,
)
from robustkit.models.small_cnn import SmallCNN, TinyCNN

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FILE = WEIGHTS_DIR / "small_cnn.cifar10_partial.safetensors"
SHIPPED_META = WEIGHTS_DIR / "small_cnn.cifar10_partial.json"
RB_SMALL = "Ding2020MMA"  # smallest single-checkpoint CIFAR-10 Linf zoo model (WRN-28-4, 5.8 M)


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registry and shipped weights


# Every registered id (each shipped tag and each .init) is built, loaded and run by
# tests/test_registries.py, parametrised from the registry; this file tests one model in depth.


def test_create_small_cnn_loads_verified_shipped_weights() -> None:
    loaded = load_model("small_cnn")
    assert loaded.name == "small_cnn.cifar10_partial"
    assert loaded.function_sha256 == small_cnn.SMALL_CNN_CIFAR10_PARTIAL_PIN
    assert loaded.checkpoint_sha256 == sha256_file(SHIPPED_FILE)
    assert loaded.dataset == "cifar10" and loaded.num_classes == 10
    model = create_model("small_cnn")
    assert isinstance(model, SmallCNN) and not model.training
    out = model(_x(5))
    assert out.shape == (5, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_shipped_file_is_small() -> None:
    assert SHIPPED_FILE.stat().st_size < 3 * 2**20
    n = sum(p.numel() for p in SmallCNN().parameters())
    assert n == 72_954  # width 16, as shipped
    assert 1_000 <= sum(p.numel() for p in TinyCNN().parameters()) <= 10_000


def test_init_models_are_seeded() -> None:
    a, b = create_model("tiny_cnn.init", seed=3), create_model("tiny_cnn.init", seed=3)
    c = create_model("tiny_cnn.init", seed=4)
    x = _x()
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert create_model("tiny_cnn", seed=3)(x).shape == (4, 10)  # no tags -> init


def test_unknown_model_name_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError) as err:
        create_model("smal_cnn")
    assert "small_cnn" in str(err.value)


def test_mean_std_must_match_channels() -> None:
    with pytest.raises(ConfigError):
        SmallCNN(in_channels=1)
    assert TinyCNN(in_channels=1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------- checkpoint round trip


def _save_tiny(path: Path) -> torch.nn.Module:
    model = create_model("tiny_cnn.init", seed=1)
    save_checkpoint(
        model, path, architecture="tiny_cnn", arch_args={"width": 8},
        normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, dataset="synthetic", num_classes=10,
    )
    return model


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    model = _save_tiny(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny.safetensors"))
    assert loaded.checkpoint_sha256 == sha256_file(tmp_path / "tiny.safetensors")
    x = _x(8)
    assert torch.equal(model(x), loaded.model(x))


def test_altered_checkpoint_bytes_fail_sha256(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "tiny")
    f = tmp_path / "tiny.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside a weight tensor: still a parseable file
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint_model(tmp_path / "tiny")


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "tiny")
    f, meta_path = tmp_path / "tiny.safetensors", tmp_path / "tiny.json"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint_model(f)
    # even with metadata that agrees with the truncated file, it must not load
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = sha256_file(f)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_checkpoint_model(f)


def test_shipped_registry_pin_catches_replaced_file(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="registry"):
        load_checkpoint_model(tmp_path / "tiny", expected_pin="0" * 64)


# ---------------------------------------------------------------- its trainer (fast_at) and augmentation


def test_augment_keeps_shape_and_range_and_is_seeded() -> None:
    from robustkit.train._loop import crop_flip

    x = _x(16)
    a = crop_flip(x, 4, torch.Generator().manual_seed(0))
    b = crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    # without padding every image is either itself or its mirror image
    c = crop_flip(x, 0, torch.Generator().manual_seed(1))
    assert all(torch.equal(ci, xi) or torch.equal(ci, xi.flip(2)) for ci, xi in zip(c, x, strict=True))
    assert not torch.equal(c, x)
    # flip=False (digits): no mirror image, and a crop is a window of the padded image
    assert torch.equal(crop_flip(x, 0, torch.Generator().manual_seed(1), flip=False), x)
    d = crop_flip(x, 2, torch.Generator().manual_seed(1), flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    h, w = x.shape[2:]
    for di, pi in zip(d, padded, strict=True):
        assert any(torch.equal(di, pi[:, r:r + h, c:c + w]) for r in range(5) for c in range(5))


def _fast_at(out: Path, **fields: object) -> dict:
    from robustkit.core.config import config_from_dict
    from robustkit.train import RunOptions, get_trainer

    trainer = get_trainer("fast_at")  # small_cnn's trainer (defenses/small_cnn.cifar10_partial.toml)
    checkpoint = trainer(config_from_dict(trainer.config, fields), RunOptions(out=out, progress=False))
    return checkpoint.metadata


def test_train_runs_adversarially_and_is_deterministic(tmp_path: Path, one_thread: None) -> None:
    small = {"arch": "tiny_cnn", "dataset": "synthetic", "n_train": 64, "n_test": 16, "epochs": 2,
             "batch_size": 32, "val_pgd_n": 8}
    metas = [_fast_at(tmp_path / f"run{i}", **small) for i in range(2)]
    logs = metas[0]["training"]["epochs_log"]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(lg["train_loss"])) for lg in logs)
    assert metas[0]["training"]["inner"] == "fgsm-rs"
    assert metas[0]["sha256"] == metas[1]["sha256"]  # the same tensors, bit for bit
    model = load_model(str(tmp_path / "run0.safetensors")).model
    assert not model.training and model(_x(4)).shape == (4, 10)


# ---------------------------------------------------------------- rb: adapter


@pytest.fixture(scope="module")
def rb_zoo():
    from robustkit.models.robustbench_zoo import _import_robustbench

    try:
        rb = _import_robustbench()
    except ConfigError as e:
        pytest.skip(f"robustbench not importable: {e}")
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return rb.model_zoo.model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]


@pytest.fixture(scope="module")
def rb_random_ckpt(rb_zoo, tmp_path_factory):
    """A random-init RobustBench architecture saved in robustbench's folder layout."""
    root = tmp_path_factory.mktemp("rb")
    torch.manual_seed(0)
    model = rb_zoo[RB_SMALL]["model"]().eval()
    path = root / "cifar10" / "Linf" / f"{RB_SMALL}.pt"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return root, path, model


def test_rb_adapter_reproduces_random_init_model(rb_random_ckpt) -> None:
    from robustkit.models.robustbench_zoo import load_robustbench_model

    root, path, ref = rb_random_ckpt
    loaded = load_robustbench_model(RB_SMALL, model_dir=root, download=False)
    assert loaded.name == f"rb:{RB_SMALL}" and loaded.num_classes == 10
    assert loaded.checkpoint_sha256 == sha256_file(path)
    assert loaded.metadata["source"] == "robustbench" and loaded.metadata["path"] == str(path)
    assert not loaded.model.training
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref(x))
    # the same through the registry front door
    via_registry = load_model(f"rb:{RB_SMALL}", download=False, model_dir=str(root))
    assert via_registry.checkpoint_sha256 == loaded.checkpoint_sha256


def test_rb_adapter_fixes_wrapper_prefixes(rb_random_ckpt, tmp_path: Path) -> None:
    from robustkit.models.robustbench_zoo import load_robustbench_model

    _, _, ref = rb_random_ckpt
    path = tmp_path / "cifar10" / "Linf" / f"{RB_SMALL}.pt"
    path.parent.mkdir(parents=True)
    state = {f"module.model.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": state}, path)
    loaded = load_robustbench_model(RB_SMALL, model_dir=tmp_path, download=False)
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref(x))


def test_rb_adapter_shape_mismatch(rb_random_ckpt, tmp_path: Path) -> None:
    from robustkit.models.robustbench_zoo import load_robustbench_model

    _, _, ref = rb_random_ckpt
    state = dict(ref.state_dict())
    fc = next(k for k in state if k.endswith("weight") and state[k].ndim == 2)
    state[fc] = torch.zeros(7, state[fc].shape[1])
    path = tmp_path / "cifar10" / "Linf" / f"{RB_SMALL}.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_robustbench_model(RB_SMALL, model_dir=tmp_path, download=False)


def test_rb_missing_file_without_download_names_path(rb_zoo, tmp_path: Path) -> None:
    from robustkit.models.robustbench_zoo import load_robustbench_model

    with pytest.raises(CheckpointError) as err:
        load_robustbench_model(RB_SMALL, model_dir=tmp_path, download=False)
    assert str(tmp_path / "cifar10" / "Linf" / f"{RB_SMALL}.pt") in str(err.value)


def test_rb_html_file_is_refused(rb_zoo, tmp_path: Path) -> None:
    from robustkit.models.robustbench_zoo import load_robustbench_model

    path = tmp_path / "cifar10" / "Linf" / f"{RB_SMALL}.pt"
    path.parent.mkdir(parents=True)
    path.write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>")
    with pytest.raises(CheckpointError, match="HTML"):
        load_robustbench_model(RB_SMALL, model_dir=tmp_path, download=False)


def test_rb_failed_download_is_a_checkpoint_error(rb_zoo, tmp_path: Path, monkeypatch) -> None:
    import robustbench.utils

    from robustkit.models.robustbench_zoo import load_robustbench_model

    def offline(gdrive_id, fname_save):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    monkeypatch.setenv("ROBUSTKIT_RB_MODEL_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="download") as err:
        load_robustbench_model(RB_SMALL)
    assert str(tmp_path / "cifar10" / "Linf") in str(err.value)
    assert not list((tmp_path / "cifar10" / "Linf").iterdir())  # no partial file left behind


def test_rb_unknown_names(rb_zoo, tmp_path: Path) -> None:
    from robustkit.models.robustbench_zoo import load_robustbench_model

    with pytest.raises(UnknownNameError) as err:
        load_robustbench_model("Ding2020MM", model_dir=tmp_path)
    assert RB_SMALL in str(err.value)
    with pytest.raises(ConfigError, match="dataset"):
        load_robustbench_model(RB_SMALL, dataset="svhn", model_dir=tmp_path)
    with pytest.raises(ConfigError, match="threat"):
        load_robustbench_model(RB_SMALL, threat_model="L1", model_dir=tmp_path)


# ---------------------------------------------------------------- real data


def test_shipped_model_clean_accuracy_on_real_cifar10_matches_card(real_data_dir: Path) -> None:
    from robustkit.data import load_split

    meta = json.loads(SHIPPED_META.read_text())
    expected = 105  # measured when the weights were trained (defenses/cards/small_cnn.cifar10_partial.md)
    assert meta["metrics"]["clean_correct_first200"] == expected
    x, y = load_split("cifar10", "test", data_dir=real_data_dir, download=False).tensors(200)
    model = create_model("small_cnn")
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert correct == expected


def test_training_cli_writes_loadable_checkpoint(real_data_dir: Path, tmp_path: Path) -> None:
    from robustkit.cli import main

    out = tmp_path / "smoke"
    code = main(["train", "--recipe", str(REPO / "defenses" / "small_cnn.cifar10_partial.toml"),
                 "--data-dir", str(real_data_dir), "--out", str(out), "--set", "arch_args={ width = 4 }",
                 "--set", "epochs=1", "--set", "n_train=64", "--set", "n_test=32", "--set", "val_pgd_n=8",
                 "--threads", "1", "--no-progress"])
    assert code == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "small_cnn" and meta["arch_args"]["width"] == 4
    assert meta["training"]["data"]["n_train"] == 64 and meta["metrics"]["n"] == 32
    assert meta["trainer"] == "fast_at" and meta["config"]["eps"] == "8/255"
    loaded = load_checkpoint_model(out)
    assert loaded.model(_x(2)).shape == (2, 10)
