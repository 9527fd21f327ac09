"""RobustBench ``model_info`` entries: read, validate, rank and write.

An entry is one flat JSON file at ``<dataset>/<threat_model>/<ModelId>.json``; the threat model is
known only from the folder. The 236 real RobustBench files have quirks (a dataset field that
disagrees with its folder, a duplicated key, three spellings of "no reported number", HTML in
free-text fields). Those are *warnings*: every real entry must load and rank; ``strict=True``
turns them into errors for entries we write ourselves.

Validation never stops at the first problem: a user fixing a hand-written entry sees every
field that is wrong, each with the fix, in one run.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from robustkit.core.errors import ConfigError
from robustkit.core.threat import format_eps, parse_eps

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
#: The leaderboards RobustBench runs for Lp threat models, with the eps every entry must use.
LP_EPS = {("cifar10", "Linf"): "8/255", ("cifar10", "L2"): "0.5", ("cifar100", "Linf"): "8/255",
          ("imagenet", "Linf"): "4/255"}
#: Size of the test set a RobustBench number is computed on (ImageNet: its fixed 5,000-image subset).
FULL_TEST_SET = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}

REQUIRED = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
            "architecture", "eps", "clean_acc", "reported")
ACCURACY_FIELDS = ("clean_acc", "autoattack_acc", "external", "corruptions_acc", "corruptions_mce",
                   "corruptions_acc_3d", "corruptions_mce_3d")
#: RobustBench's key order (what its curated files use); unknown keys would go last.
KEY_ORDER = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
             "architecture", "eps", "clean_acc", "reported", "footnote", "autoattack_acc",
             "corruptions_acc", "corruptions_mce", "corruptions_acc_3d", "corruptions_mce_3d", "external",
             "unreliable", "robustkit")
#: robustkit's extension: provenance RobustBench's format cannot carry. Dropped by ``submit``.
EXTENSION_KEY = "robustkit"
_STRING_FIELDS = ("link", "name", "authors", "venue", "architecture")
_PERCENT = re.compile(r"^[0-9]{1,3}(\.[0-9]+)?$")
_HTML = re.compile(r"<\s*/?\s*[a-zA-Z][^>]*>")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: Characters RFC 3986 never allows in a URL (they must be percent-encoded): markup, quotes, table pipes.
_NOT_IN_URL = frozenset('"<>\\^`{|}')


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an entry, with the field it is in and how to fix it."""

    level: str  # "error" or "warning"
    path: str
    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: {self.level}: {self.field}: {self.message}"
        return f"{text} (fix: {self.fix})" if self.fix else text


@dataclass
class Entry:
    """A leaderboard entry and where it sits: ``dataset``/``threat_model`` come from its folder."""

    model_id: str
    dataset: str | None
    threat_model: str | None
    data: dict[str, Any]
    path: Path | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def is_corruptions(self) -> bool:
        return bool(self.threat_model and self.threat_model.startswith("corruptions"))

    def percent(self, key: str) -> float | None:
        """An accuracy field as a float, None when absent, empty or not a number."""
        return _as_percent(self.data.get(key))

    @property
    def best_known(self) -> float | None:
        """RobustBench's "best known robust accuracy": ``external`` when set, else AutoAttack."""
        ext = self.percent("external")
        return ext if ext is not None else self.percent("autoattack_acc")

    @property
    def rank_value(self) -> float:
        """The number RobustBench sorts by (descending); -inf sinks an unusable entry to the bottom."""
        if self.threat_model == "corruptions_3d":
            v = self.percent("corruptions_acc_3d")
        elif self.is_corruptions:
            v = self.percent("corruptions_acc")
        else:
            v = self.best_known
        return -math.inf if v is None else v

    @property
    def subset(self) -> dict[str, Any] | None:
        """``{"n_examples": n, "full_test_set": N}`` when the numbers come from fewer than N images."""
        ext = self.data.get(EXTENSION_KEY)
        if isinstance(ext, dict) and ext.get("subset"):
            return {"n_examples": ext.get("n_examples"), "full_test_set": ext.get("full_test_set")}
        return None

    @property
    def board(self) -> tuple[str, str]:
        return (self.dataset or "?", self.threat_model or "?")


# --------------------------------------------------------------------------- reading


def read_entry(path: str | Path, *, strict: bool = False) -> Entry:
    """Read and validate one entry file; problems are collected on the entry, never raised."""
    p = Path(path)
    dataset, threat = folder_board(p)
    entry = Entry(p.stem, dataset, threat, {}, p)
    where = str(p)
    if dataset is None or threat is None:
        entry.problems.append(Problem(
            "error", where, "(path)",
            f"cannot tell the leaderboard from the folder {p.parent.as_posix()!r}",
            "put the file at <dataset>/<threat_model>/<ModelId>.json with dataset one of "
            f"{', '.join(DATASETS)} and threat model one of {', '.join(THREAT_MODELS)}"))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        entry.problems.append(Problem("error", where, "(file)", f"cannot read: {e}"))
        return entry
    duplicates: list[tuple[str, Any, Any]] = []

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                duplicates.append((k, out[k], v))
            out[k] = v
        return out

    try:
        data = json.loads(text, object_pairs_hook=keep_pairs)
    except json.JSONDecodeError as e:
        entry.problems.append(Problem("error", where, "(file)",
                                      f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                                      "fix the JSON syntax (a trailing comma or a missing quote?)"))
        return entry
    if not isinstance(data, dict):
        entry.problems.append(Problem("error", where, "(file)",
                                      f"the top level is a JSON {type(data).__name__}, not an object",
                                      'write one object: {"link": ..., "name": ..., ...}'))
        return entry
    entry.data = data
    for k, first, last in duplicates:
        if first == last:
            entry.problems.append(Problem("warning", where, k, f"key appears twice (same value {last!r})",
                                          "delete one of the two lines"))
        else:
            entry.problems.append(Problem("error", where, k,
                                          f"key appears twice with different values {first!r} and {last!r}; "
                                          "JSON readers silently keep the last", "keep the right one"))
    entry.problems.extend(validate_data(data, dataset, threat, where, model_id=p.stem))
    if strict:
        entry.problems = [_as_error(pr) for pr in entry.problems]
    return entry


def folder_board(path: Path) -> tuple[str | None, str | None]:
    """``(dataset, threat_model)`` from ``.../<dataset>/<threat_model>/<Name>.json`` (None if unknown)."""
    threat, dataset = path.parent.name, path.parent.parent.name
    return (dataset if dataset in DATASETS else None, threat if threat in THREAT_MODELS else None)


def iter_entry_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Entry files named directly or found (recursively, sorted) in folders; ConfigError if missing."""
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.json") if f.is_file())
            if not files:
                raise ConfigError(f"{p}: no .json entries in this folder")
            yield from files
        elif p.is_file():
            yield p
        else:
            raise ConfigError(f"{p}: no such file or folder")


def load_entries(paths: Iterable[str | Path], *, strict: bool = False) -> list[Entry]:
    """Read every entry under ``paths`` (files or folders), each with its problems attached."""
    return [read_entry(f, strict=strict) for f in iter_entry_files(paths)]


def _as_error(p: Problem) -> Problem:
    if p.level == "error":
        return p
    return Problem("error", p.path, p.field, p.message + " [strict]", p.fix)


# --------------------------------------------------------------------------- validation


def validate_data(data: dict[str, Any], dataset: str | None, threat: str | None, where: str = "<entry>",
                  *, model_id: str | None = None) -> list[Problem]:
    """Every problem with an entry's fields; the folder (``dataset``/``threat``) is the ground truth."""
    out: list[Problem] = []

    def err(fld: str, msg: str, fix: str = "") -> None:
        out.append(Problem("error", where, fld, msg, fix))

    def warn(fld: str, msg: str, fix: str = "") -> None:
        out.append(Problem("warning", where, fld, msg, fix))

    if model_id is not None and not _MODEL_ID.match(model_id):
        err("(file name)", f"model id {model_id!r} has characters RobustBench ids never use",
            "name the file like Carmon2019Unlabeled.json (letters, digits, _ - . +)")
    known = set(KEY_ORDER)
    for k in data:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6)
            err(k, "unknown field" + (f"; did you mean {close[0]!r}?" if close else ""),
                f"rename it to {close[0]!r}" if close else "remove it (RobustBench fields: "
                + ", ".join(KEY_ORDER[:-1]) + ")")
    for k in REQUIRED:
        if k not in data:
            err(k, "missing required field", f"add {k!r}: {_EXAMPLES[k]}")

    for k in _STRING_FIELDS:
        if k in data and not isinstance(data[k], str):
            err(k, f"must be a string, got {_describe(data[k])}", f"write {k!r}: {_EXAMPLES[k]}")
    for k in ("venue", "footnote"):
        v = data.get(k)
        if isinstance(v, str) and _HTML.search(v):
            tags = sorted(set(m.group(0) for m in _HTML.finditer(v)))[:3]
            warn(k, f"contains HTML ({' '.join(tags)}); the HTML page keeps <br>, <a>, <i>, <b>, <em>, "
                 "<strong>, <sup>, <sub> and shows other tags as text; Markdown gets plain text",
                 "write plain text")
    if "footnote" in data and data["footnote"] is not None and not isinstance(data["footnote"], str):
        err("footnote", f"must be a string or null, got {_describe(data['footnote'])}")
    if isinstance(data.get("link"), str) and not is_http_url(data["link"]):
        err("link", f"{data['link']!r} is not an http(s) URL; the leaderboard links only http(s) pages "
            "(a javascript: or data: link would run in the reader's browser)",
            "link the paper, e.g. https://arxiv.org/abs/...")

    if "additional_data" in data and not isinstance(data["additional_data"], bool):
        v = data["additional_data"]
        err("additional_data", f"must be true or false, got {_describe(v)}",
            f"write \"additional_data\": {'true' if str(v).lower() in ('true', '1', 'yes') else 'false'}"
            " (a JSON boolean, no quotes)")
    if "unreliable" in data and not isinstance(data["unreliable"], bool):
        err("unreliable", f"must be true or false, got {_describe(data['unreliable'])}",
            "write a JSON boolean, or leave the field out (shown as 'Unknown')")
    npass = data.get("number_forward_passes")
    if "number_forward_passes" in data and (isinstance(npass, bool) or not isinstance(npass, int) or npass < 1):
        err("number_forward_passes", f"must be a whole number >= 1, got {_describe(npass)}",
            "write the test-time forward passes per input, e.g. 1 (2 for a two-network ensemble)")

    ds = data.get("dataset")
    if "dataset" in data:
        if not isinstance(ds, str) or ds not in DATASETS:
            close = difflib.get_close_matches(str(ds), DATASETS, n=1)
            err("dataset", f"{ds!r} is not a RobustBench dataset" + (f"; did you mean {close[0]!r}?" if close
                                                                     else ""), f"one of {', '.join(DATASETS)}")
        elif dataset is not None and ds != dataset:
            warn("dataset", f"says {ds!r} but the file is in the {dataset}/ folder; the folder decides "
                 "which leaderboard it ranks on", f'write "dataset": "{dataset}"')

    for k in ACCURACY_FIELDS:
        if k in data:
            _check_percent(k, data[k], err, warn)
    if "external" in data and data["external"] in ("", None):
        warn("external", "is empty; RobustBench's sorter crashes on it (float(''))",
             "remove the field when there is no external evaluation")
    _check_reported(data, err, warn)
    _check_eps(data, dataset, threat, err, warn)

    _check_threat_fields(data, dataset, threat, err, warn)

    ext = data.get(EXTENSION_KEY)
    if EXTENSION_KEY in data:
        _check_extension(ext, dataset, err, warn)
    return out


def _check_threat_fields(data: dict[str, Any], dataset: str | None, threat: str | None, err: Any,
                         warn: Any) -> None:
    """The fields an Lp or a corruptions leaderboard needs, and the ones it must not have."""
    if threat in ("Linf", "L2"):
        if "autoattack_acc" not in data:
            err("autoattack_acc", f"missing; every {threat} entry needs its AutoAttack accuracy",
                'add "autoattack_acc": "59.53" (percent, two decimals)')
        for k in ("corruptions_acc", "corruptions_mce", "corruptions_acc_3d", "corruptions_mce_3d"):
            if k in data:
                err(k, f"a corruptions field in a {threat} entry", f"move it to a {dataset}/corruptions/ entry")
        aa, ext = _as_percent(data.get("autoattack_acc")), _as_percent(data.get("external"))
        if aa is not None and ext is not None and ext > aa + 1e-9:
            warn("external", f"{ext:.2f} is above the AutoAttack accuracy {aa:.2f}; a best-known attack "
                 "can only lower robust accuracy", "check which number is which")
        clean = _as_percent(data.get("clean_acc"))
        if aa is not None and clean is not None and aa > clean + 1e-9:
            err("autoattack_acc", f"{aa:.2f} is above the clean accuracy {clean:.2f}; robust accuracy "
                "counts examples that are correct under attack, so it cannot exceed clean accuracy",
                "check which number is which")
    elif threat is not None and threat.startswith("corruptions"):
        key = "corruptions_acc_3d" if threat == "corruptions_3d" else "corruptions_acc"
        if key not in data:
            err(key, f"missing; every {threat} entry needs it", f'add "{key}": "92.78" (percent)')
        for k in ("autoattack_acc", "external", "unreliable"):
            if k in data:
                err(k, f"an Lp field in a {threat} entry", f"move it to a {dataset}/Linf or L2 entry")


def _check_percent(k: str, v: Any, err: Any, warn: Any) -> None:
    if isinstance(v, bool) or isinstance(v, int | float):
        if isinstance(v, bool):
            err(k, f"must be a percentage string, got {_describe(v)}", f'write "{k}": "59.53"')
            return
        shown = f"{100 * v:.2f}" if 0 <= v <= 1 and k.endswith("acc") else f"{v:.2f}"
        err(k, f"accuracy as a number ({v!r}); RobustBench stores percentage strings",
            f'write "{k}": "{shown}"')
        return
    if v == "" and k == "external":
        return  # its own warning above
    if not isinstance(v, str) or not _PERCENT.match(v.strip()):
        err(k, f"must be a percentage string like \"59.53\", got {_describe(v)}",
            f'write "{k}": "59.53" (percent, two decimals, no % sign)')
        return
    value = float(v)
    if not k.endswith(("mce", "mce_3d")) and value > 100:
        err(k, f"{v} is above 100 percent", "write a percentage between 0 and 100")
    elif k == "clean_acc" and 0 < value <= 1 and "." in v:  # robust accuracy can truly be 0.26%
        warn(k, f"{v} looks like a fraction, not a percentage", f'did you mean "{100 * value:.2f}"?')
    if not re.match(r"^[0-9]+\.[0-9]{2}$", v):
        warn(k, f"{v!r} does not have two decimals, as RobustBench writes accuracies",
             f'write "{value:.2f}"')


def _check_reported(data: dict[str, Any], err: Any, warn: Any) -> None:
    if "reported" not in data:
        return
    v = data["reported"]
    fix = 'write the robust accuracy the paper reports, e.g. "62.50"'
    if v is None:
        warn("reported", "is null (no number from the paper); RobustBench spells this null, \"null\" "
             "and \"\" in different files", fix)
    elif v == "null":
        warn("reported", 'is the string "null", not JSON null', fix + ", or JSON null")
    elif v == "":
        warn("reported", "is an empty string", fix + ", or JSON null")
    elif isinstance(v, str):
        if not _PERCENT.match(v.strip()):
            err("reported", f"must be a percentage string, got {v!r}", fix)
    else:
        err("reported", f"must be a percentage string or null, got {_describe(v)}",
            f'write "reported": "{v:.2f}"' if isinstance(v, int | float) and not isinstance(v, bool) else fix)


def _check_eps(data: dict[str, Any], dataset: str | None, threat: str | None, err: Any, warn: Any) -> None:
    if "eps" not in data:
        return
    v = data["eps"]
    if threat is not None and threat.startswith("corruptions"):
        if v is not None:
            warn("eps", f"is {v!r} on a corruptions entry (the eps of the Lp model it came from); "
                 "corruption accuracy has no eps", 'write "eps": null')
        return
    if v is None:
        err("eps", f"null on a {threat or 'Lp'} entry", f'write "eps": "{LP_EPS.get((dataset or "", threat or ""), "8/255")}"')
        return
    if isinstance(v, bool) or not isinstance(v, str):
        shown = format_eps(float(v)) if isinstance(v, int | float) and not isinstance(v, bool) else "8/255"
        err("eps", f"must be a string such as \"8/255\", got {_describe(v)}", f'write "eps": "{shown}"')
        return
    try:
        value = parse_eps(v)
    except ConfigError:
        err("eps", f"{v!r} is not a number or a fraction", 'write it like "8/255" or "0.5"')
        return
    want = LP_EPS.get((dataset or "", threat or ""))
    if want is None:
        if dataset is not None and threat is not None:
            err("(path)", f"RobustBench has no {dataset}/{threat} leaderboard",
                "Lp leaderboards: " + ", ".join(f"{d}/{t}" for d, t in LP_EPS))
        return
    if abs(value - parse_eps(want)) < 1e-9:
        if v != want:
            warn("eps", f"{v!r} is {want} but not written the RobustBench way", f'write "eps": "{want}"')
    elif abs(value - parse_eps(want)) < 5e-4:
        warn("eps", f"legacy rounded {v!r} for {want} ({parse_eps(want):.6f})", f'write "eps": "{want}"')
    else:
        err("eps", f"{v!r} is not the {dataset}/{threat} budget {want}; an entry at another eps "
            "cannot be ranked against the rest", f"evaluate at eps {want}")


def _check_extension(ext: Any, dataset: str | None, err: Any, warn: Any) -> None:
    k = EXTENSION_KEY
    if not isinstance(ext, dict):
        err(k, f"must be an object of robustkit provenance, got {_describe(ext)}", "remove it or write an object")
        return
    n, full = ext.get("n_examples"), ext.get("full_test_set")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        err(f"{k}.n_examples", f"must be a whole number >= 1, got {_describe(n)}")
        return
    expected_full = FULL_TEST_SET.get(dataset or "")
    if full is not None and expected_full is not None and full != expected_full:
        err(f"{k}.full_test_set", f"{full} but the {dataset} test set RobustBench uses has {expected_full}",
            f"write {expected_full}")
    if isinstance(n, int) and expected_full is not None and n < expected_full and not ext.get("subset"):
        err(f"{k}.subset", f"evaluated on {n} of {expected_full} test images but not marked as a subset",
            'add "subset": true (robustkit leaderboard add --allow-subset does this)')


def is_http_url(link: object) -> bool:
    """An absolute http(s) URL with a host, without whitespace, control characters or characters a URL
    never holds unencoded (quotes, ``<>``, ``|``): the only links the rendered pages follow, so a hostile
    entry cannot smuggle ``javascript:`` or markup into a page through its link."""
    if not isinstance(link, str) or any(c.isspace() or not c.isprintable() or c in _NOT_IN_URL for c in link):
        return False
    try:
        parts = urlsplit(link)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def is_percent(text: str) -> bool:
    """``"59.53"``-like: digits, an optional decimal part, no sign or % (RobustBench's spelling)."""
    return bool(_PERCENT.match(text.strip()))


def _as_percent(v: Any) -> float | None:
    if isinstance(v, str) and _PERCENT.match(v.strip()):
        return float(v)
    return None


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, int | float):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v!r}"
    return f"a JSON {'array' if isinstance(v, list) else 'object'}"


_EXAMPLES = {
    "link": '"https://arxiv.org/abs/1905.13736"', "name": '"<paper title>"',
    "authors": '"First Author, Second Author"', "additional_data": "false", "number_forward_passes": "1",
    "dataset": '"cifar10"', "venue": '"NeurIPS 2019" (or "N/A")', "architecture": '"WideResNet-28-10"',
    "eps": '"8/255"', "clean_acc": '"89.69"', "reported": '"62.50" (or null)',
}


# --------------------------------------------------------------------------- ranking and writing


def rank(entries: Iterable[Entry]) -> list[Entry]:
    """RobustBench's order: ``external`` if present else ``autoattack_acc`` (corruptions: their
    accuracy), descending. RobustBench breaks ties by file-system order; we break them by id."""
    return sorted(entries, key=lambda e: (-e.rank_value, e.model_id))


def boards(entries: Iterable[Entry]) -> dict[tuple[str, str], list[Entry]]:
    """Entries grouped by leaderboard (folder dataset and threat model), each ranked."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.board, []).append(e)
    order = {d: i for i, d in enumerate(DATASETS)}
    torder = {t: i for i, t in enumerate(THREAT_MODELS)}
    return {k: rank(groups[k]) for k in sorted(groups, key=lambda b: (order.get(b[0], 9), torder.get(b[1], 9), b))}


def ordered(data: dict[str, Any]) -> dict[str, Any]:
    """Keys in RobustBench's order (unknown keys last, as found)."""
    out = {k: data[k] for k in KEY_ORDER if k in data}
    out.update({k: v for k, v in data.items() if k not in out})
    return out


def entry_json(data: dict[str, Any]) -> str:
    """The file text: RobustBench's layout (2-space indent, its key order, trailing newline)."""
    return json.dumps(ordered(data), indent=2, ensure_ascii=False) + "\n"


def entry_path(root: str | Path, dataset: str, threat_model: str, model_id: str) -> Path:
    return Path(root) / dataset / threat_model / f"{model_id}.json"
