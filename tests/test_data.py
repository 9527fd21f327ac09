"""robustkit.data: real partial datasets, the cache and its torchvision fallback, user files, synthetic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import robustkit.data as data
from robustkit.core.errors import ConfigError, DataError, InputRangeError, UnknownNameError
from robustkit.data import (
    ArraySplit,
    dataset_info,
    default_data_dir,
    list_datasets,
    load_array_file,
    load_examples,
    load_split,
    resolve_data_dir,
)

PARTIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "partial"


@pytest.fixture
def partial() -> Path:
    if not (PARTIAL / "cifar10" / "test.npz").is_file():
        pytest.skip(f"real partial datasets not found at {PARTIAL} (they sit beside the repo in CI only)")
    return PARTIAL


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own $ROBUSTKIT_DATA must not change what these tests see."""
    monkeypatch.delenv("ROBUSTKIT_DATA", raising=False)


# --------------------------------------------------------------------------- real data


def test_cifar10_test_first_n_in_order(partial: Path) -> None:
    split = load_split("cifar10", "test", data_dir=partial, download=False)
    assert len(split) == 1017 and split.source == str(partial / "cifar10" / "test.npz")
    x, y = split.tensors(50)
    assert x.dtype == torch.float32 and x.shape == (50, 3, 32, 32) and x.is_contiguous()
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0 and x.max().item() > 0.5
    assert y.dtype == torch.int64 and y.shape == (50,)
    np.testing.assert_array_equal(split.indices[:50], np.arange(50))
    all_labels = np.load(partial / "cifar10" / "test.npz")["all_labels"]
    np.testing.assert_array_equal(y.numpy(), all_labels[split.indices[:50]])
    # HWC -> CHW kept the pixels where they were
    assert x[3, :, 5, 7].mul(255).round().to(torch.uint8).tolist() == split.images[3, 5, 7].tolist()


def test_mnist_test_is_complete(partial: Path) -> None:
    x, y, split = load_examples("mnist", data_dir=partial, download=False)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,) and len(split) == 10000
    assert set(y.unique().tolist()) == set(range(10))


def test_cifar100_class_names_agree_with_superclasses(partial: Path) -> None:
    """The fine->coarse map of all 50,000 official labels pins every fine name to its superclass."""
    groups = [
        "beaver dolphin otter seal whale", "aquarium_fish flatfish ray shark trout",
        "orchid poppy rose sunflower tulip", "bottle bowl can cup plate",
        "apple mushroom orange pear sweet_pepper", "clock keyboard lamp telephone television",
        "bed chair couch table wardrobe", "bee beetle butterfly caterpillar cockroach",
        "bear leopard lion tiger wolf", "bridge castle house road skyscraper",
        "cloud forest mountain plain sea", "camel cattle chimpanzee elephant kangaroo",
        "fox porcupine possum raccoon skunk", "crab lobster snail spider worm",
        "baby boy girl man woman", "crocodile dinosaur lizard snake turtle",
        "hamster mouse rabbit shrew squirrel", "maple_tree oak_tree palm_tree pine_tree willow_tree",
        "bicycle bus motorcycle pickup_truck train", "lawn_mower rocket streetcar tank tractor",
    ]
    classes = dataset_info("cifar100").classes
    assert len(classes) == 100 and list(classes) == sorted(set(classes))
    with np.load(partial / "cifar100" / "train.npz") as f:
        fine, coarse = f["all_labels"], f["all_coarse_labels"]
    for superclass, names in enumerate(groups):
        for name in names.split():
            assert set(coarse[fine == classes.index(name)].tolist()) == {superclass}, name


# --------------------------------------------------------------------------- locations and names


def test_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_dir() == default_data_dir() == Path.home() / ".cache" / "robustkit" / "data"
    monkeypatch.setenv("ROBUSTKIT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_env_var_is_used_by_load_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _write_npz(tmp_path / "env" / "mnist" / "test.npz", n=4, shape=(28, 28, 1))
    _write_npz(tmp_path / "arg" / "mnist" / "test.npz", n=6, shape=(28, 28, 1))
    monkeypatch.setenv("ROBUSTKIT_DATA", str(tmp_path / "env"))
    assert len(load_split("mnist", download=False)) == 4
    assert len(load_split("mnist", data_dir=tmp_path / "arg", download=False)) == 6


def test_unknown_dataset_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError, match="'cifar10'") as err:
        load_split("cifar1O", download=False)
    assert "cifar10" in err.value.close_matches
    with pytest.raises(UnknownNameError):
        dataset_info("imagenet")


def test_unknown_split() -> None:
    with pytest.raises(ConfigError, match="'val'"):
        load_split("synthetic", "val")


def test_registry_and_stats() -> None:
    assert list_datasets() == ["cifar10", "cifar100", "cinic10", "fashion_mnist", "mnist", "synthetic"]
    c10 = dataset_info("cifar10")
    assert c10.shape == (3, 32, 32) and c10.mean == (0.4914, 0.4822, 0.4465) and c10.classes[0] == "airplane"
    assert dataset_info("MNIST").std == (0.3081,) and dataset_info("fashion_mnist").classes[-1] == "Ankle boot"
    for name in list_datasets():
        info = dataset_info(name)
        assert len(info.classes) == info.num_classes and len(info.mean) == len(info.std) == info.shape[0]


# --------------------------------------------------------------------------- errors a user can cause


def test_n_larger_than_data() -> None:
    split = load_split("synthetic", "test")
    with pytest.raises(DataError, match="600") as err:
        split.tensors(600)
    assert "512" in str(err.value)
    with pytest.raises(DataError, match="512"):
        load_examples("synthetic", 600)
    with pytest.raises(ConfigError):
        split.tensors(-1)


def test_missing_data_lists_paths_tried(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_split("cifar10", "test", data_dir=root, download=False)
    msg = str(err.value)
    assert str(root / "cifar10" / "test.npz") in msg and str(root / "cifar-10-batches-py") in msg
    assert "ROBUSTKIT_DATA" in msg and "--data-dir" in msg and "\n" not in msg
    assert not root.exists()  # nothing was created on the way


def test_download_failure_is_one_data_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(data, "_torchvision_class", lambda name: Offline)
    with pytest.raises(DataError, match="download failed: OSError.*name resolution"):
        load_split("mnist", "train", data_dir=tmp_path, download=True)


def test_corrupt_cache(tmp_path: Path) -> None:
    bad = tmp_path / "cifar10" / "test.npz"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError, match="corrupt") as err:
        load_split("cifar10", data_dir=tmp_path, download=False)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"images": np.zeros((2, 28, 28, 1), np.uint8), "labels": np.zeros(2, np.int64),
          "indices": np.arange(2)}, "expected uint8 N x 32 x 32 x 3"),
        ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.zeros(2, np.int64)}, "indices"),
        ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.array([0, 10]),
          "indices": np.arange(2)}, "10 classes"),
        ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.array([0, 1]), "indices": np.arange(2),
          "all_labels": np.zeros(10000, np.int64)}, "all_labels"),
    ],
)
def test_wrong_cache_contents(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "cifar10" / "test.npz"
    path.parent.mkdir()
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=needle) as err:
        load_split("cifar10", data_dir=tmp_path, download=False)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- torchvision fallback


class FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10, whose real files are md5-checked."""

    calls = 0

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls += 1
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 10, size=12)]


def test_torchvision_fallback_writes_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    FakeCIFAR10.calls = 0
    monkeypatch.setattr(data, "_torchvision_class", lambda name: FakeCIFAR10)
    first = load_split("cifar10", "test", data_dir=tmp_path, download=False)
    cache = tmp_path / "cifar10" / "test.npz"
    assert cache.is_file() and FakeCIFAR10.calls == 1
    assert first.source == str(tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(first.indices, np.arange(12))
    assert not list(cache.parent.glob("*.tmp"))  # the atomic write left nothing behind

    again = load_split("cifar10", "test", data_dir=tmp_path, download=False)
    assert FakeCIFAR10.calls == 1 and again.source == str(cache)  # read from the cache this time
    for key in ("images", "labels", "indices"):
        np.testing.assert_array_equal(getattr(first, key), getattr(again, key))
        assert getattr(again, key).dtype == getattr(first, key).dtype
    assert first.fingerprint() == again.fingerprint()


def test_torchvision_fallback_mnist_tensors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class FakeMNIST:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            self.data = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
            self.targets = torch.tensor([3, 1, 4, 1, 5])

    monkeypatch.setattr(data, "_torchvision_class", lambda name: FakeMNIST)
    x, y, split = load_examples("mnist", data_dir=tmp_path, download=False)
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [3, 1, 4, 1, 5]
    assert split.images.shape == (5, 28, 28, 1) and (tmp_path / "mnist" / "test.npz").is_file()


def test_unwritable_cache_warns_and_continues(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "_torchvision_class", lambda name: FakeCIFAR10)
    (tmp_path / "cifar10").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write"):
        split = load_split("cifar10", "train", data_dir=tmp_path, download=False)
    assert len(split) == 12


# --------------------------------------------------------------------------- user files


def test_array_file_uint8_scaled(tmp_path: Path) -> None:
    f = tmp_path / "u8.npz"
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.savez(f, images=images, labels=np.array([0, 1, 2, 3]))
    x, y = load_array_file(f)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (3, 28, 28, 1), (3, 3, 32, 32)])
def test_array_file_float_layouts(tmp_path: Path, shape: tuple[int, ...]) -> None:
    f = tmp_path / "f.npz"
    np.savez(f, images=np.random.default_rng(0).random(shape), labels=np.zeros(3, np.int64))
    x, _ = load_array_file(f)
    assert x.dtype == torch.float32 and x.shape[1] in (1, 3) and x.shape[0] == 3


def test_array_file_out_of_range(tmp_path: Path) -> None:
    f = tmp_path / "normalised.npz"
    images = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    np.savez(f, images=images, labels=np.arange(8))
    with pytest.raises(InputRangeError, match=r"\[0, 1\]") as err:
        load_array_file(f)
    assert f"{images.min():.4g}" in str(err.value) and f"{images.max():.4g}" in str(err.value)


def test_array_file_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_array_file(tmp_path / "absent.npz")
    f = tmp_path / "nolabels.npz"
    np.savez(f, images=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match="labels"):
        load_array_file(f)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    with pytest.raises(DataError, match="a text file .* not an .npz archive") as e:
        load_array_file(junk)
    assert "unsafe" not in str(e.value) and "allow_pickle" not in str(e.value)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_split() -> None:
    a, b = load_split("synthetic", "test"), load_split("synthetic", "test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.fingerprint() == b.fingerprint() and a.fingerprint(10) != a.fingerprint(11)
    assert a.source == "synthetic:seed=0" and a.images.dtype == np.uint8
    train = load_split("synthetic", "train")
    assert len(train) == 2000 and len(a) == 512 and a.images.shape[1:] == (32, 32, 3)
    assert not np.array_equal(train.images[:512], a.images)
    assert np.bincount(a.labels, minlength=10).min() >= 50  # every class present in the test split


def test_synthetic_learnable() -> None:
    xtr, ytr = load_split("synthetic", "train").tensors()
    xte, yte = load_split("synthetic", "test").tensors()
    means = torch.stack([xtr[ytr == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(xte.flatten(1), means).argmin(1)
    assert (pred == yte).float().mean().item() > 0.5


def test_fingerprint_is_sha256_of_tensors() -> None:
    split = load_split("synthetic", "test")
    x, y = split.tensors(7)
    h = hashlib.sha256(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    assert split.fingerprint(7) == h.hexdigest()
    assert isinstance(split, ArraySplit)


# --------------------------------------------------------------------------- helpers


def _write_npz(path: Path, n: int, shape: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, images=np.zeros((n, *shape), np.uint8), labels=np.arange(n) % 10,
                        indices=np.arange(n))
