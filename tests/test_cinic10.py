"""CINIC-10: conversion of the official ImageFolder tree, the cache, provenance subsets, duplicates.

The tree built here has the real layout and file names but 3 images per class and split, each a flat
colour that encodes its class (red), provenance (green: 0 CIFAR-10, 255 ImageNet) and number (blue),
so every check can tie a returned image back to the file it came from.
"""

from __future__ import annotations

import io
import json
import tarfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import robustkit.data as data
from robustkit.cli import main
from robustkit.core.errors import ConfigError, DataError
from robustkit.data import CIFAR10_CLASSES, dataset_info, list_datasets, load_split

SPLITS = ("train", "valid", "test")
DUP_CLASS = 3  # cat: its second ImageNet image is an exact copy of its first


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own $ROBUSTKIT_DATA must not change what these tests see."""
    monkeypatch.delenv("ROBUSTKIT_DATA", raising=False)


def _files(label: int, split: str) -> list[tuple[str, np.ndarray]]:
    """(filename, pixels) of one class folder: one CIFAR-10 image and two ImageNet ones."""
    cifar_part = "test" if split == "test" else "train"
    names = [f"cifar10-{cifar_part}-{100 + label}.png", f"n{2000000 + label:08d}_1.png",
             f"n{2000000 + label:08d}_2.png"]
    out = []
    for j, name in enumerate(names):
        blue = 1 if (label == DUP_CLASS and j == 2) else j  # the duplicate repeats image 1's pixels
        pixels = np.empty((32, 32, 3), np.uint8)
        pixels[...] = (20 * label, 0 if j == 0 else 255, blue)
        out.append((name, pixels))
    return out


def _make_tree(base: Path) -> Path:
    for split in SPLITS:
        for label, cls in enumerate(CIFAR10_CLASSES):
            folder = base / split / cls
            folder.mkdir(parents=True)
            for name, pixels in _files(label, split):
                Image.fromarray(pixels).save(folder / name)
    return base


def _load(root: Path, split: str = "test", **kw: object) -> tuple[data.ArraySplit, list[str]]:
    """load_split with download off, returning the warnings it gave as strings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_split("cinic10", split, data_dir=root, download=False, **kw)  # type: ignore[arg-type]
    return loaded, [str(w.message) for w in caught]


@pytest.fixture
def tree_root(tmp_path: Path) -> Path:
    _make_tree(tmp_path / "data" / "cinic10")
    return tmp_path / "data"


# --------------------------------------------------------------------------- registry


def test_registered_with_published_stats() -> None:
    assert "cinic10" in list_datasets()
    info = dataset_info("cinic10")
    assert info.num_classes == 10 and info.shape == (3, 32, 32)
    assert info.classes == CIFAR10_CLASSES and list(info.classes) == sorted(info.classes)  # ImageFolder order
    assert info.mean == (0.47889522, 0.47227842, 0.43047404)
    assert info.std == (0.24205776, 0.23828046, 0.25874835)
    assert data.DATASETS.get("cinic10").meta["sizes"] == {"train": 90000, "valid": 90000, "test": 90000}


def test_unknown_split_lists_cinic_splits(tree_root: Path) -> None:
    with pytest.raises(ConfigError, match="'val'.*'train', 'valid' or 'test'"):
        load_split("cinic10", "val", data_dir=tree_root, download=False)


# --------------------------------------------------------------------------- conversion and cache


def test_conversion_labels_pixels_and_cache(tree_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split, notes = _load(tree_root)
    cache = tree_root / "cinic10" / "test.npz"
    assert cache.is_file() and split.source == str(tree_root / "cinic10" / "test")
    assert len(split) == 30 and split.images.shape == (30, 32, 32, 3) and split.images.dtype == np.uint8
    assert any("30 images where the official test split has 90000" in n for n in notes)

    # indices are positions in ImageFolder order: class (= CIFAR-10 label order), then filename
    np.testing.assert_array_equal(np.sort(split.indices), np.arange(30))
    by_index = np.argsort(split.indices)
    np.testing.assert_array_equal(split.labels[by_index], np.repeat(np.arange(10), 3))
    expected = [name for label in range(10) for name in sorted(n for n, _ in _files(label, "test"))]
    assert split.extra["filenames"][by_index].tolist() == expected
    # rows are mixed (hash order), so the first n examples are not one class from one source
    assert not np.array_equal(split.indices, np.arange(30)) and len(set(split.labels[:10].tolist())) > 2

    # each row's pixels are its file's pixels, and its label and provenance agree with its name
    for row in range(30):
        name, label = str(split.extra["filenames"][row]), int(split.labels[row])
        pixels = dict(_files(label, "test"))[name]
        np.testing.assert_array_equal(split.images[row], pixels)
        assert split.extra["source"][row] == (0 if name.startswith("cifar10-") else 1)

    # a second load reads the cache and never opens a PNG
    def no_png(*args: object, **kwargs: object) -> None:
        raise AssertionError("PNG re-read despite the cache")

    monkeypatch.setattr(Image, "open", no_png)
    again, notes_again = _load(tree_root)
    assert again.source == str(cache) and not notes_again
    for key in ("images", "labels", "indices"):
        np.testing.assert_array_equal(getattr(again, key), getattr(split, key))
    for key in ("source", "filenames", "duplicate"):
        np.testing.assert_array_equal(again.extra[key], split.extra[key])
    assert again.fingerprint() == split.fingerprint()


def test_filenames_sorted_within_class(tree_root: Path) -> None:
    split, _ = _load(tree_root, "valid")
    by_index = np.argsort(split.indices)
    names = split.extra["filenames"][by_index].tolist()
    for label in range(10):
        block = names[3 * label: 3 * label + 3]
        assert block == sorted(block) and block[0] == f"cifar10-train-{100 + label}.png"


def test_other_folder_name_accepted(tmp_path: Path) -> None:
    _make_tree(tmp_path / "CINIC-10")
    split, _ = _load(tmp_path, "train")
    assert len(split) == 30 and (tmp_path / "cinic10" / "train.npz").is_file()


# --------------------------------------------------------------------------- provenance subsets


def test_subsets_split_by_provenance(tree_root: Path) -> None:
    full, _ = _load(tree_root)
    cifar, _ = _load(tree_root, subset="cifar")
    imagenet, _ = _load(tree_root, subset="imagenet")
    assert (len(cifar), len(imagenet)) == (10, 20)
    assert (cifar.subset, imagenet.subset) == ("cifar", "imagenet")
    assert full.subset is None
    assert all(n.startswith("cifar10-test-") for n in cifar.extra["filenames"].tolist())
    assert all(n.startswith("n0") for n in imagenet.extra["filenames"].tolist())
    assert (cifar.images[..., 1] == 0).all() and (imagenet.images[..., 1] == 255).all()  # green = provenance
    # labels and official indices travel with each image
    assert set(cifar.indices.tolist()).isdisjoint(imagenet.indices.tolist())
    assert sorted(cifar.indices.tolist() + imagenet.indices.tolist()) == list(range(30))
    label_of = dict(zip(full.indices.tolist(), full.labels.tolist(), strict=True))
    for part in (cifar, imagenet):
        assert part.labels.tolist() == [label_of[i] for i in part.indices.tolist()]
        assert (part.images[..., 0] == 20 * part.labels[:, None, None]).all()
    x, y = imagenet.tensors(5)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == imagenet.labels[:5].tolist()


def test_subset_errors(tree_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown subset 'imagnet' for cinic10; use 'cifar' or 'imagenet'"):
        load_split("cinic10", data_dir=tree_root, download=False, subset="imagnet")
    with pytest.raises(ConfigError, match=r"cifar10 has no subsets.*cinic10 \(cifar, imagenet\)"):
        load_split("cifar10", data_dir=tmp_path, download=False, subset="cifar")
    with pytest.raises(ConfigError, match="synthetic has no subsets"):
        load_split("synthetic", subset="cifar")
    assert not (tree_root / "cinic10" / "test.npz").exists()  # rejected before any conversion

    # a hand-made cache without provenance cannot be split
    bare = tmp_path / "bare" / "cinic10" / "test.npz"
    bare.parent.mkdir(parents=True)
    np.savez(bare, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([0, 1]), indices=np.arange(2))
    assert len(load_split("cinic10", data_dir=tmp_path / "bare", download=False)) == 2
    with pytest.raises(DataError, match="no per-image 'source' array") as err:
        load_split("cinic10", data_dir=tmp_path / "bare", download=False, subset="cifar")
    assert str(bare) in str(err.value)


# --------------------------------------------------------------------------- duplicates


def test_duplicates_reported(tree_root: Path) -> None:
    split, notes = _load(tree_root)
    assert split.n_duplicates == 1
    (row,) = np.flatnonzero(split.extra["duplicate"])
    assert int(split.labels[row]) == DUP_CLASS and split.extra["filenames"][row] == "n02000003_2.png"
    assert [n for n in notes if "exactly repeat" in n] == [
        f"{tree_root / 'cinic10' / 'test'}: 1 image(s) exactly repeat an earlier image of the same class "
        "(a known cinic10 issue); kept, and marked in the cache's 'duplicate' array (ArraySplit.n_duplicates)"
    ]
    assert _load(tree_root, subset="imagenet")[0].n_duplicates == 1
    assert _load(tree_root, subset="cifar")[0].n_duplicates == 0
    assert load_split("synthetic").n_duplicates is None  # no such check for other datasets


# --------------------------------------------------------------------------- errors


def test_nothing_there_names_paths_and_fix(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_split("cinic10", "test", data_dir=root, download=False)
    msg = str(err.value)
    for path in (root / "cinic10" / "test.npz", root / "cinic10" / "test", root / "CINIC-10" / "test",
                 root / "cinic10" / "CINIC-10.tar.gz", root / "cinic10" / "test" / "airplane"):
        assert str(path) in msg, path
    assert data.CINIC10_URL in msg and "by hand" in msg and "--data-dir" in msg and "ROBUSTKIT_DATA" in msg
    assert "downloading disabled" in msg and "does not exist" in msg and "\n" not in msg
    assert not root.exists()  # nothing was created on the way


def test_missing_class_folder(tree_root: Path) -> None:
    ship = tree_root / "cinic10" / "test" / "ship"
    for f in ship.iterdir():
        f.unlink()
    ship.rmdir()
    with pytest.raises(DataError, match="class folder.s. ship missing") as err:
        load_split("cinic10", "test", data_dir=tree_root, download=False)
    assert str(tree_root / "cinic10" / "test") in str(err.value)
    assert not (tree_root / "cinic10" / "test.npz").exists()


def test_unexpected_file_name_and_size(tree_root: Path) -> None:
    odd = tree_root / "cinic10" / "test" / "dog" / "holiday.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(odd)
    with pytest.raises(DataError, match="cannot tell where this image comes from") as err:
        load_split("cinic10", "test", data_dir=tree_root, download=False)
    assert str(odd) in str(err.value)
    odd.unlink()
    big = tree_root / "cinic10" / "test" / "dog" / "n02000005_9.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big)
    with pytest.raises(DataError, match="64x64, expected 32x32"):
        load_split("cinic10", "test", data_dir=tree_root, download=False)


# --------------------------------------------------------------------------- archive and download


def _tar_gz(tree: Path, extra: tarfile.TarInfo | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in SPLITS:  # members train/..., valid/..., test/... as in the published archive
            tar.add(tree / split, arcname=split)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size))
    return buf.getvalue()


def test_local_archive_is_extracted(tmp_path: Path) -> None:
    archive = tmp_path / "data" / "cinic10" / "CINIC-10.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(_tar_gz(_make_tree(tmp_path / "src")))
    split, _ = _load(tmp_path / "data", "valid")  # a local archive is not a download
    assert len(split) == 30 and (tmp_path / "data" / "cinic10" / "valid" / "truck").is_dir()
    assert not list((tmp_path / "data" / "cinic10").glob(".extract-*"))


def test_unsafe_archive_refused(tmp_path: Path) -> None:
    evil = tarfile.TarInfo("../escaped.txt")
    evil.size = 3
    archive = tmp_path / "data" / "cinic10" / "CINIC-10.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(_tar_gz(_make_tree(tmp_path / "src"), evil))
    with pytest.raises(DataError, match="refusing to extract '../escaped.txt'"):
        load_split("cinic10", "test", data_dir=tmp_path / "data", download=False)
    assert not (tmp_path / "data" / "escaped.txt").exists()
    assert not (tmp_path / "data" / "cinic10" / "test").exists()  # no half tree left behind


class _Response(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.mark.filterwarnings("ignore:.*(partial tree|exactly repeat)")
def test_download_then_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _tar_gz(_make_tree(tmp_path / "src"))
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> _Response:
        urls.append(url)
        return _Response(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    split = load_split("cinic10", "test", data_dir=tmp_path / "data", download=True, progress=False)
    assert urls == [data.CINIC10_URL] and len(split) == 30
    assert (tmp_path / "data" / "cinic10" / "CINIC-10.tar.gz").read_bytes() == payload


def test_download_failure_is_one_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="download failed: URLError.*name resolution.*by hand") as err:
        load_split("cinic10", "test", data_dir=tmp_path, download=True)
    assert "downloading disabled" not in str(err.value)
    assert not list((tmp_path / "cinic10").glob("*.part"))
    assert not (tmp_path / "cinic10" / "CINIC-10.tar.gz").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_eval_on_imagenet_part(tree_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the partial-tree and duplicate notes of the first conversion
        code = main(["eval", "--model", "tiny_cnn.init", "--dataset", "cinic10", "--data-dir", str(tree_root),
                     "--attack", "none", "--subset", "imagenet", "--no-progress", "--device", "cpu",
                     "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "cinic10" and result["n_examples"] == 20
    assert result["data"]["subset"] == "imagenet" and result["data"]["n_available"] == 20
    assert result["data"]["duplicates"] == 1
    assert result["data"]["source"] == str(tree_root / "cinic10" / "test")  # converted on the way


def test_cli_subset_rejected_elsewhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--model", "tiny_cnn.init", "--dataset", "synthetic", "--attack", "none",
                 "--subset", "cifar", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert code == 2 and "synthetic has no subsets" in capsys.readouterr().err
