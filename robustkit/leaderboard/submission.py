"""From a robustkit result JSON to a RobustBench entry, and from an entry to a submission bundle.

A result knows the numbers (clean and AutoAttack accuracy, eps, dataset, threat model, forward
passes, architecture); people know the rest (paper, authors, venue, extra training data), so those
come from flags. A result that RobustBench would not accept is refused with the reason, not
quietly turned into an entry that looks comparable and is not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustkit.core.errors import ConfigError
from robustkit.core.threat import parse_eps
from robustkit.eval.results import EvalResult
from robustkit.leaderboard.entries import (
    EXTENSION_KEY,
    FULL_TEST_SET,
    KEY_ORDER,
    LP_EPS,
    Entry,
    entry_json,
    entry_path,
    validate_data,
)

STANDARD_AA_STAGES = ["apgd-ce", "apgd-t", "fab-t", "square"]
_CONVENTION = re.compile(r"^[A-Z][A-Za-z-]+[0-9]{4}[A-Z][A-Za-z]*(_[A-Za-z0-9.+-]+)*$")


@dataclass
class PaperInfo:
    """What only a person can say about an entry."""

    model_id: str
    title: str
    link: str
    authors: str
    venue: str
    additional_data: bool
    architecture: str | None = None
    reported: str | None = None
    footnote: str | None = None
    number_forward_passes: int | None = None


def comparability_problems(result: EvalResult, *, allow_subset: bool = False) -> list[str]:
    """Why this result cannot be a RobustBench leaderboard number (empty when it can)."""
    why: list[str] = []
    cfg = result.attack_config or {}
    if result.robust_accuracy is None or result.robust_flags is None:
        return ["it has no attack (clean accuracy only); run `robustkit eval --attack autoattack`"]
    if cfg.get("version") != "standard" or cfg.get("overrides") or list(cfg.get("stages") or []) != STANDARD_AA_STAGES:
        desc = f"{result.attack} (version {cfg.get('version')!r}, stages {cfg.get('stages')}"
        desc += f", overrides {cfg.get('overrides')})" if cfg.get("overrides") else ")"
        why.append(f"attack_config: the attack is {desc}, not standard AutoAttack "
                   "(APGD-CE, APGD-T, FAB-T, Square with their defaults); run `--attack autoattack`")
    elif result_engine(result) not in ("reference", "rk"):
        why.append(f"engine: {result_engine(result)!r} is a screening version of AutoAttack on robustkit's engine "
                   "(fewer targets, no FAB-T or Square), not the standard protocol; run `--attack autoattack` "
                   "(the reference) or `--attack autoattack-rk`")
    ds, norm = result.dataset, result.norm
    if ds not in FULL_TEST_SET:
        why.append(f"dataset: RobustBench has no leaderboard for {ds!r} (it has "
                   + ", ".join(sorted({f"{d}/{t}" for d, t in LP_EPS})) + ")")
    elif (ds, norm) not in LP_EPS:
        why.append(f"norm: RobustBench has no {ds}/{norm} leaderboard")
    else:
        want = LP_EPS[(ds, norm)]
        if result.eps is None or abs(result.eps - parse_eps(want)) > 1e-9:
            why.append(f"eps: {result.eps} is not the {ds}/{norm} budget {want}")
        full = FULL_TEST_SET[ds]
        if result.n_examples < full and not allow_subset:
            why.append(f"n_examples: {result.n_examples} of the {full:,} {ds} test images; RobustBench "
                       "numbers use the full test set (pass --allow-subset to write an entry marked as a "
                       "subset, which RobustBench will not accept)")
        elif result.n_examples > full:
            why.append(f"n_examples: {result.n_examples} is more than the {full:,} test images")
    data = result.data or {}
    if data.get("split") != "test" or data.get("indices") != "first-n":
        why.append(f"data: evaluated on {data.get('source') or 'custom data'} "
                   f"(split {data.get('split')!r}), not the first n images of the official test split")
    if result.checks.get("deterministic") is False:
        why.append("checks.deterministic: the model's outputs changed between two identical calls; "
                   "RobustBench admits only deterministic defenses")
    return why


def result_engine(result: EvalResult) -> str:
    """The AutoAttack engine behind a result: its ``engine`` field; results written before robustkit had
    its own engine carry none and were all the reference's."""
    if result.engine:
        return result.engine
    return "reference" if (result.attack_config or {}).get("name") != "autoattack-rk" else "custom"


def entry_from_result(result: EvalResult, paper: PaperInfo, *, allow_subset: bool = False,
                      result_path: str | Path | None = None) -> dict[str, Any]:
    """The entry's JSON object; ConfigError naming every reason when the result is not usable."""
    why = comparability_problems(result, allow_subset=allow_subset)
    if why:
        where = f"{result_path}: " if result_path else ""
        raise ConfigError(f"{where}not a RobustBench-comparable result: " + "; ".join(why))
    assert result.robust_accuracy is not None and result.dataset is not None and result.norm is not None
    info = result.model_info or {}
    architecture = paper.architecture or describe_architecture(info)
    if not architecture:
        raise ConfigError(f"{result_path or 'the result'} does not record the architecture "
                          "(written before robustkit recorded model_info); pass --architecture")
    passes = paper.number_forward_passes or int(info.get("number_forward_passes", 1))
    full = FULL_TEST_SET[result.dataset]
    aa = f"{100 * result.robust_accuracy:.2f}"
    data: dict[str, Any] = {
        "link": paper.link,
        "name": paper.title,
        "authors": paper.authors,
        "additional_data": paper.additional_data,
        "number_forward_passes": passes,
        "dataset": result.dataset,
        "venue": paper.venue,
        "architecture": architecture,
        "eps": LP_EPS[(result.dataset, result.norm)],
        "clean_acc": f"{100 * result.clean_accuracy:.2f}",
        "reported": paper.reported if paper.reported is not None else aa,
        "autoattack_acc": aa,
    }
    if paper.footnote:
        data["footnote"] = paper.footnote
    prov = result.provenance or {}
    versions = prov.get("versions") or {}
    data[EXTENSION_KEY] = {
        "n_examples": result.n_examples,
        "full_test_set": full,
        "subset": result.n_examples < full,
        "seed": result.seed,
        "batch_size": result.batch_size,
        "attack": f"AutoAttack standard ({(result.attack_config or {}).get('implementation', 'pyautoattack')})",
        "engine": result_engine(result),
        "stage_accuracy": {s.name: f"{100 * s.accuracy:.2f}" for s in result.stages},
        "forward_passes": result.passes.get("forward"),
        "backward_passes": result.passes.get("backward"),
        "model": result.model,
        "checkpoint_sha256": prov.get("checkpoint_sha256"),
        "robustkit": versions.get("robustkit"),
        "torch": versions.get("torch"),
        "device": prov.get("device"),
        "git_commit": (prov.get("git") or {}).get("commit"),
        "evaluated_at": (result.timing or {}).get("started_at"),
        "seconds": round(float((result.timing or {}).get("total_seconds", 0.0)), 1),
        "result_sha256": _sha256(result_path) if result_path else None,
        "reproduce": reproduce_command(result),
    }
    problems = [p for p in validate_data(data, result.dataset, result.norm, "entry", model_id=paper.model_id)
                if p.level == "error"]
    if problems:
        raise ConfigError("; ".join(f"{p.field}: {p.message}" + (f" (fix: {p.fix})" if p.fix else "")
                                    for p in problems))
    return data


def describe_architecture(info: dict[str, Any]) -> str | None:
    """``small_cnn (width 16, 72,954 parameters)`` from a result's model_info."""
    arch = info.get("architecture")
    if not arch:
        return None
    args = info.get("arch_args") or {}
    shown = [f"{k} {v}" for k, v in args.items() if k in ("width", "depth", "widen_factor", "variant")]
    if info.get("num_parameters"):
        shown.append(f"{int(info['num_parameters']):,} parameters")
    return f"{arch} ({', '.join(shown)})" if shown else str(arch)


def reproduce_command(result: EvalResult) -> str:
    cmd = f"robustkit eval --model {result.model} --attack {result.attack}"
    if result.norm and result.norm != "Linf":
        cmd += f" --norm {result.norm}"
    cmd += f" --dataset {result.dataset} --n-examples {result.n_examples} --seed {result.seed}"
    return cmd + f" --batch-size {result.batch_size}"


def naming_hint(model_id: str) -> str | None:
    """RobustBench ids read <FirstAuthorSurname><Year><FirstWordOfTitle>[_variant]."""
    if _CONVENTION.match(model_id):
        return None
    return (f"model id {model_id!r} does not follow RobustBench's <Surname><Year><FirstWordOfTitle>"
            "[_variant] convention (e.g. Carmon2019Unlabeled); maintainers will ask you to rename it")


def write_entry(data: dict[str, Any], root: str | Path, model_id: str, *, force: bool = False,
                inputs: Sequence[tuple[Path, str]] = ()) -> Path:
    """Write the entry file; never over one of ``inputs`` (the result it was made from), and an
    existing entry only with ``force``."""
    from robustkit.eval.outputs import check_not_input, check_place

    path = entry_path(root, data["dataset"], _threat(data), model_id)
    check_place(path, "--entries")
    check_not_input(path, inputs, "--name")
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(entry_json(data), encoding="utf-8")
    return path


def _threat(data: dict[str, Any]) -> str:
    for (ds, tm), eps in LP_EPS.items():
        if ds == data["dataset"] and eps == data["eps"]:
            return tm
    raise ConfigError(f"no RobustBench leaderboard for dataset {data['dataset']!r} at eps {data['eps']!r}")


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- submission


@dataclass
class SubmissionOptions:
    checkpoint_url: str | None = None
    code_url: str | None = None
    model_zoo: bool = False
    architecture_available: bool = False
    license_url: str | None = None  # None: MIT
    evaluation_method: str | None = None


def submission_problems(entry: Entry) -> list[str]:
    """Why ``entry`` cannot be submitted as it is."""
    why = [str(p) for p in entry.errors]
    if entry.subset:
        s = entry.subset
        why.append(f"{entry.path}: {EXTENSION_KEY}.subset: evaluated on {s.get('n_examples')} of "
                   f"{s.get('full_test_set')} test images; RobustBench needs the full test set "
                   "(re-run `robustkit eval` on all of it, then `robustkit leaderboard add`)")
    return why


def issue_text(entry: Entry, opts: SubmissionOptions) -> str:
    """The filled-in "New Model(s)" issue (title line first, then the body)."""
    d = entry.data
    ext = d.get(EXTENSION_KEY) if isinstance(d.get(EXTENSION_KEY), dict) else {}
    threat = {"Linf": "Linf", "L2": "L2"}.get(entry.threat_model or "", "Common Corruptions")
    robust = d.get("autoattack_acc") if not entry.is_corruptions else d.get("corruptions_acc")
    method = opts.evaluation_method or _evaluation_method(entry, ext)
    if opts.checkpoint_url or opts.code_url:
        ckpt = ", ".join(u for u in (opts.checkpoint_url, opts.code_url) if u)
    else:
        ckpt = ("private submission: the checkpoint will be sent by email to "
                "adversarial.benchmark@gmail.com")
    box = {True: "[x]", False: "[ ]"}
    license_line = (f"{box[False]} MIT license **OR** custom license: {opts.license_url}" if opts.license_url
                    else f"{box[True]} I agree to release my model(s) under MIT license")
    lines = [
        f"[New Model] {entry.model_id}",
        "",
        "# Paper Information",
        "",
        f"- **Paper Title**: {d.get('name', '')}",
        f"- **Paper URL**: {d.get('link', '')}",
        f"- **Paper authors**: {d.get('authors', '')}",
        "",
        "# Leaderboard Claim(s)",
        "",
        "## Model 1",
        "",
        f"- **Architecture**: {d.get('architecture', '')}",
        f"- **Threat Model**: {threat}",
        f"- **eps**: {d.get('eps') if d.get('eps') is not None and not entry.is_corruptions else 'N/A'}",
        f"- **Clean accuracy**: {d.get('clean_acc', '')}%",
        f"- **Robust accuracy**: {robust}%",
        f"- **Additional data**: {str(d.get('additional_data')).lower()}",
        f"- **Evaluation method**: {method}",
        f"- **Checkpoint and code**: {ckpt}",
        "",
        "# Model Zoo:",
        "",
        f"- {box[opts.model_zoo]} I want to add my models to the Model Zoo",
        f"- {box[opts.architecture_available]} The architecture is in RobustBench's model_zoo/architectures "
        "or in timm",
        f"- {license_line}",
        "",
    ]
    return "\n".join(lines)


def _evaluation_method(entry: Entry, ext: dict[str, Any]) -> str:
    if not ext:
        return "AutoAttack, standard version"
    parts = [f"{ext.get('attack', 'AutoAttack standard')} on the first {ext.get('n_examples'):,} test images "
             f"with seed {ext.get('seed')} and batch size {ext.get('batch_size')}, run by robustkit "
             f"{ext.get('robustkit')} (torch {ext.get('torch')}, {ext.get('device')})"]
    stages = ext.get("stage_accuracy") or {}
    if stages:
        parts.append("accuracy after each stage: " + ", ".join(f"{k} {v}%" for k, v in stages.items()))
    if ext.get("reproduce"):
        parts.append(f"reproduce with `{ext['reproduce']}`")
    return "; ".join(parts)


def rb_entry_json(entry: Entry) -> str:
    """The entry as RobustBench stores it: its keys only, its order."""
    core = {k: v for k, v in entry.data.items() if k != EXTENSION_KEY and k in KEY_ORDER}
    return entry_json(core)


def submission_paths(entry: Entry, out_dir: str | Path) -> tuple[Path, Path, Path]:
    """The bundle's files: issue text, RobustBench's ``model_info`` file, README of the pull request."""
    out = Path(out_dir)
    ds, tm = entry.board
    return out / "issue.md", out / "model_info" / ds / tm / f"{entry.model_id}.json", out / "README.md"


def write_submission(entry: Entry, out_dir: str | Path, opts: SubmissionOptions) -> list[Path]:
    """Write the issue text, RobustBench's ``model_info`` file and a README of the pull request."""
    ds, tm = entry.board
    issue, info_path, readme = submission_paths(entry, out_dir)
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(rb_entry_json(entry), encoding="utf-8")
    issue.write_text(issue_text(entry, opts), encoding="utf-8")
    ext = entry.data.get(EXTENSION_KEY) if isinstance(entry.data.get(EXTENSION_KEY), dict) else {}
    readme.write_text("\n".join([
        f"# RobustBench submission: {entry.model_id}",
        "",
        "1. Open an issue at https://github.com/RobustBench/robustbench/issues/new with the template "
        '"New Model(s)": the first line of `issue.md` is the title, the rest is the body.',
        f"2. In a fork of RobustBench, copy `model_info/{ds}/{tm}/{entry.model_id}.json` to the same path "
        "in the repository and open a pull request that references the issue.",
        "3. For the model zoo: add the architecture under `robustbench/model_zoo/architectures/` "
        "(normalisation inside `forward`) and an entry for the checkpoint in "
        f"`robustbench/model_zoo/{ds}.py`, under the {tm} threat model.",
        "",
        "Evidence robustkit kept (not part of RobustBench's format):",
        "",
        "```json",
        json.dumps(ext, indent=2),
        "```",
        "",
    ]), encoding="utf-8")
    return [issue, info_path, readme]
