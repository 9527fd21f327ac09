"""Datasets as arrays: the robustkit cache format, the torchvision fallback, user files, synthetic data.

Everything an evaluation reads passes through :class:`ArraySplit`: uint8 N x H x W x C images,
int64 labels and each example's index in the official split. The on-disk cache
``<root>/<dataset>/<split>.npz`` has exactly that layout, so a folder of partial datasets
(only the first images of a split) is as usable as a complete one, and a result can say which
official images it saw. Evaluations take the first ``n`` examples in order, the RobustBench
convention, so numbers are comparable across tools without shuffling seeds.

CINIC-10 is not in torchvision: its cache is built from the official ImageFolder tree of PNGs
(extracted from the published archive, downloaded when allowed) and keeps each image's
provenance (CIFAR-10 or ImageNet), so either part can be evaluated on its own.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustkit.core.errors import ConfigError, DataError, InputRangeError, UnknownNameError
from robustkit.core.npz import path_kind, read_npz
from robustkit.core.registry import Registry

__all__ = [
    "DATASETS", "ArraySplit", "DataError", "DatasetInfo", "InputRangeError", "UnknownNameError",
    "dataset_info", "default_data_dir", "list_datasets", "load_array_file", "load_examples",
    "load_split", "resolve_data_dir",
]

ENV_VAR = "ROBUSTKIT_DATA"
SPLITS = ("train", "test")
SYNTHETIC_SEED = 0


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset before seeing any of it."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # published per-channel stats, for Normalize layers inside models
    std: tuple[float, ...]
    classes: tuple[str, ...]
    description: str


@dataclass
class ArraySplit:
    """One split of one dataset, as loaded; ``source`` goes into result provenance."""

    dataset: str
    split: str
    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N
    indices: np.ndarray  # int64 N, index into the official split
    source: str
    subset: str | None = None  # e.g. "imagenet" for CINIC-10's ImageNet part; None = the whole split
    # Per-example arrays beyond the three above, aligned with them (CINIC-10: "source", 0 = CIFAR-10,
    # 1 = ImageNet; "filenames"; "duplicate", True for an exact copy of an earlier image of its class).
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_duplicates(self) -> int | None:
        """How many images repeat an earlier one of the same class exactly (CINIC-10 has some, and
        they inflate accuracy a little); None when the dataset records no such check."""
        dup = self.extra.get("duplicate")
        return None if dup is None else int(np.count_nonzero(dup))

    def _check_n(self, n: int | None) -> int:
        if n is None:
            return len(self)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ConfigError(f"number of examples must be an integer, got {n!r}")
        n = int(n)
        if n < 0:
            raise ConfigError(f"number of examples must be >= 0, got {n}")
        if n > len(self):
            raise DataError(
                f"asked for {n} examples but {self.dataset} {self.split} has only {len(self)} "
                f"(from {self.source})"
            )
        return n

    def tensors(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """First n examples IN ORDER (RobustBench convention) as float32 NCHW in [0,1] and int64
        labels; n > len -> DataError with both numbers."""
        n = self._check_n(n)
        x = torch.from_numpy(np.ascontiguousarray(self.images[:n])).permute(0, 3, 1, 2)
        x = x.to(torch.float32).div_(255.0).contiguous()
        y = torch.from_numpy(np.array(self.labels[:n], dtype=np.int64))  # a copy: callers may mutate
        return x, y

    def fingerprint(self, n: int | None = None) -> str:
        """sha256 hex over the first n images+labels (so a result records exactly which data it saw).

        It hashes the float32 NCHW bytes of :meth:`tensors` then the int64 labels, so the same
        examples give the same fingerprint whether they came from a split or an in-memory tensor.
        """
        x, y = self.tensors(n)
        h = hashlib.sha256()
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------- registry

DATASETS: Registry[DatasetInfo] = Registry("dataset")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SYNTHETIC_SIZES = {"train": 2000, "test": 512}
CINIC10_URL = "https://datashare.is.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"


def _register(info: DatasetInfo, **meta: Any) -> None:
    DATASETS.register(info.name, lambda: info, info.description, **meta)


_register(
    DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                CIFAR10_CLASSES, "CIFAR-10: 32x32 colour images of 10 object classes"),
    torchvision="CIFAR10", torchvision_dir="cifar-10-batches-py", sizes={"train": 50000, "test": 10000},
)
_register(
    DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                CIFAR100_CLASSES, "CIFAR-100: 32x32 colour images of 100 fine classes"),
    torchvision="CIFAR100", torchvision_dir="cifar-100-python", sizes={"train": 50000, "test": 10000},
)
_register(
    DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), MNIST_CLASSES,
                "MNIST: 28x28 greyscale handwritten digits"),
    torchvision="MNIST", torchvision_dir="MNIST/raw", sizes={"train": 60000, "test": 10000},
)
_register(
    DatasetInfo("fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), FASHION_MNIST_CLASSES,
                "Fashion-MNIST: 28x28 greyscale clothing images"),
    torchvision="FashionMNIST", torchvision_dir="FashionMNIST/raw", sizes={"train": 60000, "test": 10000},
)
_register(
    DatasetInfo("cinic10", 10, (3, 32, 32), (0.47889522, 0.47227842, 0.43047404),
                (0.24205776, 0.23828046, 0.25874835), CIFAR10_CLASSES,
                "CINIC-10: CIFAR-10's classes, 32x32 images from CIFAR-10 and downsampled ImageNet"),
    # the class folders sort alphabetically, which is CIFAR-10's label order
    image_folders=("cinic10", "CINIC-10"), url=CINIC10_URL, archive="CINIC-10.tar.gz", archive_size="656 MB",
    subsets={"cifar": 0, "imagenet": 1}, subset_by_filename=((r"cifar10-", 0), (r"n\d{8}_", 1)),
    sizes={"train": 90000, "valid": 90000, "test": 90000},
)
_register(
    DatasetInfo("synthetic", 10, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                tuple(f"class_{i}" for i in range(10)),
                "generated, learnable 10-class 32x32 colour patterns (tests and demos; never on disk)"),
    synthetic=True, sizes=dict(SYNTHETIC_SIZES),
)


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about ``name``; unknown names raise :class:`UnknownNameError` with close matches."""
    return DATASETS.get(name).factory()


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


# --------------------------------------------------------------------------- locations


def default_data_dir() -> Path:
    """``~/.cache/robustkit/data``: the cache root when nothing else is configured."""
    return Path.home() / ".cache" / "robustkit" / "data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Explicit argument, else ``$ROBUSTKIT_DATA``, else :func:`default_data_dir`."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return default_data_dir()


# --------------------------------------------------------------------------- loading


def load_split(
    name: str,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    subset: str | None = None,
    progress: bool = True,
) -> ArraySplit:
    """Load one split: the robustkit cache, else the dataset's raw files (torchvision's, or an image
    folder tree; cached on success), else one :class:`DataError` naming every path tried and how to
    fix it. ``subset`` keeps one part of a mixed dataset (CINIC-10: "cifar" or "imagenet") with its
    official indices; ``progress`` shows bars (on a terminal only) while a slow conversion runs."""
    entry = DATASETS.get(name)
    info: DatasetInfo = entry.factory()
    sizes: dict[str, int] = entry.meta["sizes"]
    if split not in sizes:
        raise ConfigError(f"unknown split {split!r} for {info.name}; use {_or_list(sizes)}")
    _check_subset(info.name, subset, entry.meta.get("subsets", {}))
    if entry.meta.get("synthetic"):
        return _synthetic_split(split)

    root = resolve_data_dir(data_dir)
    cache = root / info.name / f"{split}.npz"
    kind = path_kind(cache, "the robustkit cache")
    if kind in ("dir", "other"):
        raise DataError(f"{cache}: is a {'folder' if kind == 'dir' else 'special file'} where the robustkit cache "
                        f"file belongs ({info.name}/{split}.npz); move it away")
    if kind == "file":
        loaded = _read_cache(cache, info, split, sizes[split])
    elif "image_folders" in entry.meta:
        loaded = _load_image_folder(info, split, root, cache, download, progress, entry.meta)
    else:
        loaded = _load_torchvision(info, split, root, cache, download, entry.meta)
    if subset is None:
        return loaded
    return _select_subset(loaded, subset, entry.meta["subsets"][subset])


def _load_torchvision(
    info: DatasetInfo, split: str, root: Path, cache: Path, download: bool, meta: dict[str, Any]
) -> ArraySplit:
    tv_dir = root / meta["torchvision_dir"]
    root_existed = root.exists()  # before torchvision's download creates it
    loaded, reason = _from_torchvision(info, split, root, download, meta)
    if loaded is not None:
        _write_cache(cache, loaded)
        return loaded

    where = _where(root, root_existed)
    hint = "" if download else ", or allow downloading (drop --no-download / download=False)"
    raise DataError(
        f"no {info.name} {split} data{where}: tried {cache} (not found) and torchvision's {tv_dir} "
        f"({reason}); set {ENV_VAR} or --data-dir to a folder containing {info.name}/{split}.npz "
        f"(robustkit cache format) or torchvision's {meta['torchvision_dir']}{hint}"
    )


def _where(root: Path, root_existed: bool) -> str:
    """Why nothing was found under the data dir, when the data dir itself is the problem."""
    if not root_existed:
        return f" (data dir {root} does not exist)"
    return f" (data dir {root} is a file, not a folder)" if path_kind(root, "the data dir") == "file" else ""


def _or_list(names: Mapping[str, Any]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _check_subset(dataset: str, subset: str | None, subsets: Mapping[str, int]) -> None:
    """Reject a subset before any data is read: a typo should not cost a 90k-image conversion."""
    if subset is None:
        return
    if not subsets:
        having = [f"{e.name} ({', '.join(e.meta['subsets'])})" for e in DATASETS if e.meta.get("subsets")]
        raise ConfigError(f"{dataset} has no subsets (asked for {subset!r}); datasets with subsets: "
                          f"{', '.join(having) or 'none'}")
    if subset not in subsets:
        raise ConfigError(f"unknown subset {subset!r} for {dataset}; use {_or_list(subsets)}")


def _select_subset(split: ArraySplit, subset: str, code: int) -> ArraySplit:
    """The examples of one provenance, in stored order, with their official indices."""
    origin = split.extra.get("source")
    if origin is None:
        raise DataError(f"{split.source}: has no per-image 'source' array, so its {subset} part cannot be "
                        "told apart; delete it to rebuild it from the image folders")
    keep = origin == code
    if not keep.any():
        raise DataError(f"{split.source}: no {subset} images in {split.dataset} {split.split}")
    return ArraySplit(
        split.dataset, split.split, split.images[keep], split.labels[keep], split.indices[keep],
        split.source, subset, {k: v[keep] for k, v in split.extra.items()},
    )


def load_examples(
    name: str,
    n: int | None = None,
    *,
    split: str = "test",
    data_dir: str | Path | None = None,
    download: bool = True,
    subset: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ArraySplit]:
    """First ``n`` examples of a split as tensors, plus the split (for its source and fingerprint)."""
    loaded = load_split(name, split, data_dir=data_dir, download=download, subset=subset)
    x, y = loaded.tensors(n)
    return x, y, loaded


PER_EXAMPLE_EXTRAS = ("source", "filenames", "duplicate")  # optional cache arrays kept on ArraySplit.extra


def _read_cache(path: Path, info: DatasetInfo, split: str, official_size: int) -> ArraySplit:
    _, arrays = read_npz(path, "robustkit cache file", "it is corrupt or not a robustkit cache (arrays images, "
                         "labels, indices): delete it to rebuild it from the dataset's files")
    return _validate(arrays, info, split, official_size, str(path))


def _validate(
    arrays: dict[str, np.ndarray], info: DatasetInfo, split: str, official_size: int, source: str
) -> ArraySplit:
    """Check an npz-layout dict against the dataset's shape and label range: a wrong file should
    fail here, with its name, not as a shape error deep inside a model."""
    missing = [k for k in ("images", "labels", "indices") if k not in arrays]
    if missing:
        raise DataError(f"{source}: missing array(s) {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'none'})")
    images, labels, indices = arrays["images"], arrays["labels"], arrays["indices"]
    c, h, w = info.shape
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, c):
        raise DataError(f"{source}: images are {images.dtype} {images.shape}, expected uint8 N x {h} x {w} x {c}")
    n = images.shape[0]
    if n == 0:
        raise DataError(f"{source}: holds no images")
    for key, arr in (("labels", labels), ("indices", indices)):
        if arr.dtype.kind not in "iu" or arr.shape != (n,):
            raise DataError(f"{source}: {key} are {arr.dtype} {arr.shape}, expected integers of shape ({n},)")
    labels, indices = labels.astype(np.int64), indices.astype(np.int64)
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise DataError(f"{source}: labels span {labels.min()}..{labels.max()}, "
                        f"but {info.name} has {info.num_classes} classes")
    if indices.min() < 0 or indices.max() >= official_size:
        raise DataError(f"{source}: indices span {indices.min()}..{indices.max()}, "
                        f"outside the official {split} split of {official_size}")
    if "all_labels" in arrays:
        all_labels = arrays["all_labels"]
        if all_labels.shape != (official_size,) or not np.array_equal(all_labels[indices], labels):
            raise DataError(f"{source}: labels disagree with all_labels[indices]")
    extra = {k: arrays[k] for k in PER_EXAMPLE_EXTRAS if k in arrays}
    for key, arr in extra.items():
        if arr.shape != (n,):
            raise DataError(f"{source}: {key} has shape {arr.shape}, expected ({n},) like the images")
    return ArraySplit(info.name, split, images, labels, indices, source, extra=extra)


def _torchvision_class(name: str) -> Any:
    """The torchvision dataset class for ``name`` (imported lazily: torchvision is slow to import).
    Tests replace this function to stand in for torchvision without its md5-checked files."""
    import torchvision.datasets

    return getattr(torchvision.datasets, DATASETS.get(name).meta["torchvision"])


def _from_torchvision(
    info: DatasetInfo, split: str, root: Path, download: bool, meta: dict[str, Any]
) -> tuple[ArraySplit | None, str]:
    """Load via torchvision; on any failure return ``(None, reason)`` so the caller can report
    every path tried in one error instead of a third-party traceback."""
    try:
        cls = _torchvision_class(info.name)
        ds = cls(root=str(root), train=(split == "train"), download=download)
        data, targets = ds.data, ds.targets
    except Exception as e:  # noqa: BLE001 - any torchvision failure means "no usable copy here"
        msg = _one_line(e)
        if not download and isinstance(e, RuntimeError) and "not found" in msg.lower():
            return None, "not found or incomplete; downloading disabled"
        return None, f"{'download failed: ' if download else ''}{type(e).__name__}: {msg}"
    images = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if images.ndim == 3:  # MNIST-like: N x H x W
        images = images[..., None]
    labels = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    source = str(root / meta["torchvision_dir"])
    arrays = {
        "images": np.ascontiguousarray(images),
        "labels": labels.astype(np.int64, copy=False),
        "indices": np.arange(len(labels), dtype=np.int64),
    }
    return _validate(arrays, info, split, meta["sizes"][split], source), ""


def _write_cache(path: Path, split: ArraySplit) -> None:
    """Write the npz cache atomically (temp file + rename), so a killed run or a concurrent one
    never leaves a half-written cache; an unwritable root only costs the cache, so it warns."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, images=split.images, labels=split.labels, indices=split.indices,
                                **split.extra)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write the robustkit cache {path} ({_one_line(e)}); continuing without it",
                      stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", str(e)).strip() or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- image folders (CINIC-10)


def _load_image_folder(
    info: DatasetInfo, split: str, root: Path, cache: Path, download: bool, progress: bool,
    meta: dict[str, Any],
) -> ArraySplit:
    """Convert ``<folder>/<split>/<class>/*.png`` into the cache; with no tree, extract the archive
    first (a local copy, else a download when allowed)."""
    folders = [root / name for name in meta["image_folders"]]
    archive = root / info.name / meta["archive"]
    tree = _find_tree(folders, split)
    root_existed = root.exists()  # before a download creates it
    reason = "not found" if download or archive.is_file() else "not found; downloading disabled"
    if tree is None and (archive.is_file() or download):
        try:
            if not archive.is_file():
                _download(meta["url"], archive, progress)
            _extract(archive, folders[0], progress)
        except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
            what = "extraction failed (delete the archive to download it again)" if archive.is_file() \
                else "download failed"
            reason = f"{what}: {type(e).__name__}: {_one_line(e)}"
        else:
            reason = f"extracted, but it holds no {split}/ folder"
        tree = _find_tree(folders, split)
    if tree is None:
        tried = " and ".join(str(f / split) for f in folders)
        where = _where(root, root_existed)
        hint = "" if download else ", or allow downloading (drop --no-download / download=False)"
        raise DataError(
            f"no {info.name} {split} data{where}: tried {cache} (not found), the image folders {tried} "
            f"(not found) and the archive {archive} ({reason}); download {meta['url']} "
            f"({meta['archive_size']}) by hand and put it at {archive} (robustkit extracts it), or extract "
            f"it yourself so that {folders[0] / split / info.classes[0]}/*.png exists; {ENV_VAR} or "
            f"--data-dir choose the data dir{hint}"
        )
    loaded = _convert_image_folder(tree / split, info, split, meta, progress)
    _write_cache(cache, loaded)
    return loaded


def _find_tree(folders: list[Path], split: str) -> Path | None:
    return next((f for f in folders if (f / split).is_dir()), None)


@contextmanager
def _bar(desc: str, unit: str, enabled: bool, total: int | None = None, **kw: Any) -> Iterator[Any]:
    """A tqdm bar on stderr; disable=None hides it when stderr is not a terminal (logs, CI)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, file=sys.stderr,
               dynamic_ncols=True, **kw)
    try:
        yield bar
    finally:
        bar.close()


def _download(url: str, dest: Path, progress: bool) -> None:
    """Stream ``url`` to ``dest`` through a ``.part`` file, so an interrupted download never passes
    for the archive."""
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with _bar(f"download {dest.name}", "B", progress, total, unit_scale=True) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _extract(archive: Path, dest: Path, progress: bool) -> None:
    """Extract a tar archive into ``dest``, refusing members that could land outside it (absolute
    paths, ``..``, links, devices). It unpacks into a temporary folder and moves the top-level
    entries in at the end, so an interrupted run never leaves a half tree that passes for the data."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
    try:
        with tarfile.open(archive) as tar, _bar(f"extract {archive.name}", "file", progress) as bar:
            for member in tar:
                absolute = member.name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", member.name)
                dotdot = ".." in re.split(r"[\\/]+", member.name)
                if absolute or dotdot or not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive}: refusing to extract {member.name!r} (an absolute path, "
                                    "'..' or a link); this is not the published archive, delete it and "
                                    "download again")
                tar.extract(member, tmp, **safe)
                bar.update(1)
        for top in sorted(tmp.iterdir()):
            if not (dest / top.name).exists():
                os.replace(top, dest / top.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_image_folder(base: Path, info: DatasetInfo, split: str, meta: dict[str, Any],
                          progress: bool) -> ArraySplit:
    """Read ``base/<class>/*.png`` into cache arrays, with each image's provenance and filename.

    Files are read in ImageFolder order (class, then filename), and ``indices`` are positions in
    that order. Rows are stored sorted by a hash of ``<class>/<filename>`` instead: evaluations
    take the first n rows, and in ImageFolder order those would be one class from one source.
    The hash, unlike a seeded shuffle, cannot change with a numpy version.
    """
    from PIL import Image

    official_size: int = meta["sizes"][split]
    missing = [c for c in info.classes if not (base / c).is_dir()]
    if missing:
        found = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise DataError(f"{base}: class folder(s) {', '.join(missing)} missing "
                        f"(found: {', '.join(found) or 'none'}); {info.name} needs one folder per class: "
                        f"{', '.join(info.classes)}")
    files: list[tuple[int, Path]] = []
    for label, name in enumerate(info.classes):
        pngs = sorted((base / name).glob("*.png"), key=lambda p: p.name)
        if not pngs:
            raise DataError(f"{base / name}: no .png images in this class folder")
        files += [(label, p) for p in pngs]
    n = len(files)
    if n > official_size:
        raise DataError(f"{base}: {n} images, more than the {official_size} of the official {info.name} "
                        f"{split} split; is this the right folder?")

    rules = [(re.compile(pattern), code) for pattern, code in meta["subset_by_filename"]]
    c, h, w = info.shape
    images = np.empty((n, h, w, c), np.uint8)
    origin = np.empty(n, np.uint8)
    duplicate = np.zeros(n, bool)
    seen: list[set[bytes]] = [set() for _ in info.classes]
    with _bar(f"{info.name} {split}", "img", progress, n) as bar:
        for i, (label, path) in enumerate(files):
            code = next((code for rx, code in rules if rx.match(path.name)), None)
            if code is None:
                raise DataError(f"{path}: cannot tell where this image comes from; {info.name} names images "
                                "cifar10-<split>-<i>.png (CIFAR-10) or <synset>_<n>.png (ImageNet)")
            try:
                with Image.open(path) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                raise DataError(f"{path}: unreadable image ({_one_line(e)})") from e
            if pixels.shape != (h, w, c):
                raise DataError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected {w}x{h}")
            images[i], origin[i] = pixels, code
            digest = hashlib.sha256(pixels.tobytes()).digest()
            duplicate[i] = digest in seen[label]
            seen[label].add(digest)
            bar.update(1)

    order = np.array(sorted(range(n), key=lambda i: hashlib.sha256(
        f"{info.classes[files[i][0]]}/{files[i][1].name}".encode()).digest()), dtype=np.int64)
    labels = np.array([label for label, _ in files], dtype=np.int64)
    names = np.array([p.name for _, p in files], dtype=str)
    arrays = {"images": images[order], "labels": labels[order], "indices": order, "source": origin[order],
              "filenames": names[order], "duplicate": duplicate[order]}
    if n < official_size:
        warnings.warn(f"{base}: {n} images where the official {split} split has {official_size}; "
                      "indices are positions in this partial tree", stacklevel=4)
    if duplicate.any():
        warnings.warn(f"{base}: {int(duplicate.sum())} image(s) exactly repeat an earlier image of the same "
                      f"class (a known {info.name} issue); kept, and marked in the cache's 'duplicate' array "
                      "(ArraySplit.n_duplicates)", stacklevel=4)
    return _validate(arrays, info, split, official_size, str(base))


# --------------------------------------------------------------------------- synthetic


def _synthetic_split(split: str) -> ArraySplit:
    """10 classes of smooth colour gratings plus a class-placed blob, jittered and noised.

    Templates come from the fixed seed; each split draws its examples from its own stream, so
    train and test share classes but not images. Per-example tint, shift and noise make colour
    alone unreliable (nearest class mean: ~70% test accuracy), so a tiny CNN has to learn texture
    and layout: ~95% after 150 SGD steps, yet PGD at eps 2/255 still breaks about a quarter, which
    gives attack tests real work.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    k, size = 10, 32
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    templates = np.empty((k, size, size, 3))
    for c in range(k):
        base = rng.uniform(0.4, 0.6, size=3)
        theta = np.pi * c / k + rng.uniform(-0.1, 0.1)
        freq = rng.uniform(1.5, 4.0)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(-0.15, 0.15, size=3)
        grating = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        cy, cx = rng.uniform(0.25, 0.75, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12**2))
        blob_colour = rng.uniform(-0.15, 0.15, size=3)
        templates[c] = base + grating[..., None] * amp + blob[..., None] * blob_colour

    n = SYNTHETIC_SIZES[split]
    ex = np.random.default_rng([SYNTHETIC_SEED, SPLITS.index(split) + 1])
    labels = np.arange(n, dtype=np.int64) % k
    ex.shuffle(labels)
    shifts = ex.integers(-3, 4, size=(n, 2))
    brightness = ex.uniform(-0.08, 0.08, size=(n, 1, 1, 1))
    tint = ex.uniform(-0.08, 0.08, size=(n, 1, 1, 3))  # so colour alone is not a reliable cue
    noise = ex.normal(0.0, 0.2, size=(n, size, size, 3))
    images = np.empty((n, size, size, 3))
    for i in range(n):
        images[i] = np.roll(templates[labels[i]], shift=tuple(shifts[i]), axis=(0, 1))
    images = np.clip(images + brightness + tint + noise, 0.0, 1.0)
    return ArraySplit(
        "synthetic", split, np.round(images * 255).astype(np.uint8), labels,
        np.arange(n, dtype=np.int64), f"synthetic:seed={SYNTHETIC_SEED}",
    )


# --------------------------------------------------------------------------- user files


def load_array_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """User data file (.npz with `images` and `labels`): uint8 N×H×W×C (scaled by 1/255) or float arrays
    N×C×H×W or N×H×W×C that must already lie in [0,1]; float values outside [0,1] -> InputRangeError
    naming the min/max found; missing keys/unreadable file -> DataError."""
    path = Path(path).expanduser()
    if path_kind(path, "data file") == "missing":
        raise DataError(f"data file {path} not found")
    names, arrays = read_npz(path, "data file", "save it with numpy.savez(path, images=..., labels=...)",
                             only=("images", "labels"))
    missing = [k for k in ("images", "labels") if k not in names]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} "
                        f"(found: {', '.join(names) or 'none'}); expected 'images' and 'labels'")
    images, labels = arrays["images"], arrays["labels"]

    if images.ndim == 3:  # N x H x W greyscale
        images = images[:, None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"{path}: images have shape {images.shape}, expected N x C x H x W or N x H x W x C")
    if images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif images.shape[1] not in (1, 3):
        raise DataError(f"{path}: cannot tell the channel axis of images with shape {images.shape} "
                        "(expected 1 or 3 channels, first or last)")
    n = images.shape[0]
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise DataError(f"{path}: labels are {labels.dtype} {labels.shape}, expected integers of shape ({n},)")
    if labels.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {labels.min()}")

    if images.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    elif images.dtype.kind == "f":
        lo, hi = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise InputRangeError(
                f"{path}: images lie in [{lo:.4g}, {hi:.4g}], outside [0, 1]; robustkit models take raw "
                "[0, 1] pixels and normalise inside the model, so undo any Normalize before saving"
            )
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    else:
        raise DataError(f"{path}: images are {images.dtype}; expected uint8 (0-255) or float in [0, 1]")
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))
