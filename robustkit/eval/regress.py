"""The robustness regression gate: re-run a stored evaluation and compare it example by example.

A baseline file pins one full result JSON (model, attack config, data fingerprint, seed, batch
size and the per-example clean/robust flags). ``robustkit regress`` rebuilds exactly that
evaluation, runs it again and compares the flags pairwise:

- ``exact``: on CPU with the same torch version a robustkit evaluation reproduces bit for bit,
  so any moved flag is a real change; a lost robust example is a REGRESSION, any other move is
  CHANGED (both fail: an exactly-reproducible number moved, so re-baseline deliberately);
- ``paired``: on GPUs (non-deterministic kernels) flags can flip by noise, so only a loss that a
  one-sided exact McNemar test finds significant at ``alpha`` fails.

Comparing flags rather than accuracies is what makes the gate sharp: 3 examples lost and 3
gained leave the accuracy unchanged, yet on CPU that is still a changed model.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from robustkit.core.errors import ConfigError, RobustkitError
from robustkit.core.provenance import require_device
from robustkit.eval.results import (
    RESULT_SCHEMA,
    RESULT_SCHEMA_VERSION,
    EvalResult,
    StageResult,
    write_json_atomic,
)

BASELINE_SCHEMA = "robustkit.baseline"
BASELINE_SCHEMA_VERSION = 1
MODES = ("auto", "exact", "paired")
DEFAULT_ALPHA = 0.05

OK, OK_NOISE, CHANGED, REGRESSION, MISMATCH = "ok", "ok (within noise)", "CHANGED", "REGRESSION", "MISMATCH"
FAILING = (CHANGED, REGRESSION, MISMATCH)


class BaselineRunError(RobustkitError):
    """An error while re-running one baseline, prefixed with its file (keeps the cause's exit code)."""

    def __init__(self, path: Path, cause: RobustkitError) -> None:
        super().__init__(f"baseline {path}: {cause}")
        self.exit_code = cause.exit_code


@dataclass
class Baseline:
    """A parsed baseline file; ``result`` is the evaluation it pins."""

    path: Path
    mode: str
    alpha: float
    command: str | None
    result: EvalResult

    @property
    def id(self) -> str:
        return self.path.stem

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": BASELINE_SCHEMA,
            "schema_version": BASELINE_SCHEMA_VERSION,
            "tolerance": {"mode": self.mode, "alpha": self.alpha},
            "command": self.command,
            "result": self.result.to_dict(),
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write atomically (temp file + rename): a baseline is a reviewed file, never half-written."""
        return write_json_atomic(path if path is not None else self.path, self.to_dict())


# --------------------------------------------------------------------------- files


def create_baseline(
    result: str | Path | EvalResult,
    out_path: str | Path,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "auto",
    command: str | None = None,
) -> Baseline:
    """Write a baseline file pinning ``result`` (an :class:`EvalResult` or a result JSON path)."""
    _check_tolerance(mode, alpha, f"baseline {out_path}")
    res = result if isinstance(result, EvalResult) else _result_from_file(Path(result))
    _check_result(res, f"result {result}" if not isinstance(result, EvalResult) else f"baseline {out_path}")
    baseline = Baseline(Path(out_path), mode, float(alpha), command or eval_command(res), res)
    baseline.save()
    return baseline


def load_baseline(path: str | Path) -> Baseline:
    """Read and validate a baseline; every problem is a ConfigError naming the file and field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read baseline {p}: {e.strerror or e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"baseline {p}: malformed JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"baseline {p}: expected a JSON object, got {type(d).__name__}")
    if d.get("schema") != BASELINE_SCHEMA:
        raise ConfigError(f"baseline {p}: field 'schema' must be {BASELINE_SCHEMA!r}, "
                          f"got {d.get('schema')!r}")
    if d.get("schema_version") != BASELINE_SCHEMA_VERSION:
        raise ConfigError(f"baseline {p}: unsupported 'schema_version' {d.get('schema_version')!r} "
                          f"(this robustkit reads {BASELINE_SCHEMA_VERSION})")
    tol = d.get("tolerance")
    if not isinstance(tol, dict):
        raise ConfigError(f"baseline {p}: field 'tolerance' must be an object like "
                          f'{{"mode": "auto", "alpha": {DEFAULT_ALPHA}}}, got {tol!r}')
    for key in ("mode", "alpha"):
        if key not in tol:
            raise ConfigError(f"baseline {p}: field 'tolerance.{key}' is missing")
    _check_tolerance(tol["mode"], tol["alpha"], f"baseline {p}", prefix="tolerance.")
    command = d.get("command")
    if command is not None and not isinstance(command, str):
        raise ConfigError(f"baseline {p}: field 'command' must be a string, got {type(command).__name__}")
    if "result" not in d:
        raise ConfigError(f"baseline {p}: field 'result' is missing (the result JSON the baseline pins)")
    result = _result_from_dict(d["result"], f"baseline {p}", "result.")
    _check_result(result, f"baseline {p}", "result.")
    return Baseline(p, tol["mode"], float(tol["alpha"]), command, result)


def _check_tolerance(mode: Any, alpha: Any, where: str, prefix: str = "") -> None:
    if mode not in MODES:
        raise ConfigError(f"{where}: field '{prefix}mode' must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ConfigError(f"{where}: field '{prefix}alpha' must be a number in (0, 1), got {alpha!r}")


def _result_from_file(path: Path) -> EvalResult:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read result {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"result {path}: malformed JSON ({e})") from None
    return _result_from_dict(d, f"result {path}")


# Fields a re-run needs, with the JSON types they must have.
_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "attack": (str,), "attack_config": (dict,), "dataset": (str,), "norm": (str,),
    "eps": (int, float), "seed": (int,), "batch_size": (int,), "n_examples": (int,),
    "clean_flags": (str,), "data": (dict,), "provenance": (dict,), "stages": (list,),
}


def _result_from_dict(d: Any, where: str, prefix: str = "") -> EvalResult:
    """An EvalResult from its JSON, field by field, so a bad baseline names the bad field."""
    name = prefix.rstrip(".") or "result"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: field '{name}' must be a result JSON object, got {type(d).__name__}")
    if d.get("schema") != RESULT_SCHEMA or d.get("schema_version") != RESULT_SCHEMA_VERSION:
        raise ConfigError(f"{where}: field '{name}' is not a robustkit result v{RESULT_SCHEMA_VERSION} "
                          f"(schema {d.get('schema')!r}, schema_version {d.get('schema_version')!r})")
    for key, types in _RESULT_FIELDS.items():
        if key not in d:
            raise ConfigError(f"{where}: field '{prefix}{key}' is missing")
        if not isinstance(d[key], types) or isinstance(d[key], bool):
            kinds = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where}: field '{prefix}{key}' must be {kinds}, got {d[key]!r:.60}")
    if d.get("robust_flags") is None:
        raise ConfigError(f"{where}: field '{prefix}robust_flags' is missing: a clean-only result "
                          "(attack none) cannot gate robustness")
    body = {k: v for k, v in d.items() if k not in ("schema", "schema_version", "eps_str")}
    try:
        body["stages"] = [StageResult(**s) for s in body["stages"]]
        return EvalResult(**body)
    except TypeError as e:
        raise ConfigError(f"{where}: field '{name}' does not fit a result: {e}") from None


def _check_result(r: EvalResult, where: str, prefix: str = "") -> None:
    """What a re-run and a paired comparison need beyond well-typed JSON."""
    if r.robust_flags is None:
        raise ConfigError(f"{where}: field '{prefix}robust_flags' is missing: a clean-only result "
                          "(attack none) cannot gate robustness")
    if r.n_examples < 1:
        raise ConfigError(f"{where}: field '{prefix}n_examples' must be >= 1, got {r.n_examples}")
    for key in ("clean_flags", "robust_flags"):
        flags = getattr(r, key)
        if not isinstance(flags, str):
            raise ConfigError(f"{where}: field '{prefix}{key}' must be a string of 0/1, got {flags!r:.60}")
        if len(flags) != r.n_examples or set(flags) - {"0", "1"}:
            raise ConfigError(f"{where}: field '{prefix}{key}' must be {r.n_examples} characters of 0/1 "
                              f"(one per example), got {len(flags)} characters")
    if r.attack_config is None or r.attack is None:
        raise ConfigError(f"{where}: field '{prefix}attack_config' is missing: nothing to re-run")
    if r.data.get("split") != "file" and not r.data.get("fingerprint"):
        raise ConfigError(f"{where}: field '{prefix}data.fingerprint' is missing, so a re-run cannot prove "
                          "it sees the same images")


def eval_command(r: EvalResult) -> str:
    """The ``robustkit eval`` line behind a result: its recorded argv, else one rebuilt from it."""
    argv = r.provenance.get("command")
    if isinstance(argv, list) and len(argv) > 1 and argv[1] == "eval":
        return shlex.join(["robustkit", *map(str, argv[1:])])
    eps = r.to_dict()["eps_str"]
    data = (["--data-file", str(r.data.get("source"))] if r.data.get("split") == "file"
            else ["--dataset", str(r.dataset)])
    if r.data.get("subset"):
        data += ["--subset", str(r.data["subset"])]
    parts = ["robustkit", "eval", "--model", r.model, "--attack", str(r.attack), "--norm", str(r.norm),
             "--eps", str(eps), *data, "--n-examples", str(r.n_examples),
             "--batch-size", str(r.batch_size), "--seed", str(r.seed)]
    for key, value in _attack_args(r).items():
        parts += ["--attack-arg", f"{key}={_toml(value)}"]
    return shlex.join(parts)


def _attack_args(r: EvalResult) -> dict[str, Any]:
    """The fewest ``--attack-arg`` overrides that turn the attack name's defaults into the recorded config.

    Added one at a time in config order, because some defaults follow others (PGD's step size
    follows its steps), so overriding ``steps`` alone often reproduces ``step_size`` too. Best
    effort: the command is informational, the re-run itself uses the recorded config.
    """
    from robustkit.attacks import create_attack

    def params(config: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in config.items() if k not in ("name", "norm", "eps", "implementation")}
        if isinstance(out.get("attack_kwargs"), dict):  # foolbox: its constructor arguments are the params
            out = {**{k: v for k, v in out.items() if k not in ("attack_name", "attack_kwargs")},
                   **out["attack_kwargs"]}
        return out

    recorded = params(r.attack_config or {})
    args: dict[str, Any] = {}
    for _ in range(len(recorded) + 1):
        try:
            attack = create_attack(str(r.attack), norm=str(r.norm), eps=r.eps, dataset=r.dataset, **args)
        except (RobustkitError, OSError):
            return {}
        current = params(attack.config())
        diff = [k for k, v in recorded.items() if current.get(k) != v]
        if not diff:
            break
        args["attacks" if diff[0] == "stages" else diff[0]] = recorded[diff[0]]
    return args


def _toml(value: Any, top: bool = True) -> str:
    """A value as ``--attack-arg`` reads it (TOML; a bare word is a string only at the top level)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v, False)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v, False) for v in value) + "]"
    return value if top and isinstance(value, str) and value.isidentifier() else json.dumps(value)


def collect_baseline_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their ``*.json`` (sorted); missing or empty is an error."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.json") if q.is_file())
            if not found:
                raise ConfigError(f"no baseline files (*.json) in {p}")
        elif p.is_file():
            found = [p]
        else:
            raise ConfigError(f"baseline path not found: {p}")
        seen = {o.resolve() for o in out}
        out.extend(q for q in found if q.resolve() not in seen)  # a file given twice runs once
    return out


# --------------------------------------------------------------------------- statistics


def mcnemar_p_value(lost: int, gained: int) -> float:
    """One-sided exact McNemar test: P(X >= lost) for X ~ Binomial(lost + gained, 1/2).

    Under "no change" each discordant example is equally likely to be a loss or a gain; a small
    p says the losses outnumber the gains by more than noise would. Exact integer arithmetic, so
    it is right for the small counts a regression gate sees.
    """
    if lost < 0 or gained < 0:
        raise ValueError(f"counts must be >= 0, got lost={lost}, gained={gained}")
    n = lost + gained
    if lost == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(lost, n + 1))
    return tail / 2**n


def _discordant(before: str, now: str) -> tuple[int, int]:
    lost = sum(1 for a, b in zip(before, now, strict=True) if a == "1" and b == "0")
    gained = sum(1 for a, b in zip(before, now, strict=True) if a == "0" and b == "1")
    return lost, gained


def _engine(r: EvalResult) -> str | None:
    """The AutoAttack engine of a result (None for other attacks); results older than the field
    were measured by the reference when their attack is AutoAttack."""
    if r.engine:
        return r.engine
    name = (r.attack_config or {}).get("name")
    return "reference" if name in ("autoattack", "autoattack-adaptive") else None


def _on_cpu(r: EvalResult) -> bool:
    return str(r.provenance.get("device", "")).startswith("cpu")


def _torch_version(r: EvalResult) -> str | None:
    versions = r.provenance.get("versions")
    return versions.get("torch") if isinstance(versions, dict) else None


def resolve_mode(mode: str, before: EvalResult, now: EvalResult) -> tuple[str, str]:
    """``auto`` -> exact when both ran on CPU with the same torch version, else paired; with why."""
    if mode != "auto":
        return mode, "forced"
    if not (_on_cpu(before) and _on_cpu(now)):
        return "paired", f"device {before.provenance.get('device')} vs {now.provenance.get('device')}"
    tb, tn = _torch_version(before), _torch_version(now)
    if tb != tn:
        return "paired", f"torch {tb} vs {tn}"
    return "exact", "both on CPU, same torch"


@dataclass
class Comparison:
    """One baseline against its re-run: the counts, the test and the verdict."""

    id: str
    path: Path
    model: str
    attack: str
    n: int
    mode: str
    mode_reason: str
    alpha: float
    clean_before: float
    clean_now: float | None
    robust_before: float
    robust_now: float | None
    lost: int = 0
    gained: int = 0
    clean_lost: int = 0
    clean_gained: int = 0
    p_robust: float | None = None
    p_clean: float | None = None
    verdict: str = OK
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING


def compare(baseline: Baseline, now: EvalResult, *, mode: str | None = None,
            alpha: float | None = None) -> Comparison:
    """Compare a re-run with its baseline, example by example (``mode``/``alpha`` override the file)."""
    before = baseline.result
    chosen, why = resolve_mode(mode or baseline.mode, before, now)
    a = alpha if alpha is not None else baseline.alpha
    n = before.n_examples
    assert before.robust_flags is not None  # load_baseline guarantees it
    cmp = Comparison(
        id=baseline.id, path=baseline.path, model=before.model, attack=str(before.attack), n=n,
        mode=chosen, mode_reason=why, alpha=a,
        clean_before=before.clean_flags.count("1") / n, clean_now=None,
        robust_before=before.robust_flags.count("1") / n, robust_now=None,
    )
    if now.n_examples != n or len(now.clean_flags) != n:
        cmp.verdict, cmp.reason = MISMATCH, f"the re-run has {now.n_examples} examples, the baseline {n}"
        return cmp
    if now.robust_flags is None or len(now.robust_flags) != n:
        cmp.verdict, cmp.reason = MISMATCH, "the re-run has no per-example robust flags"
        return cmp
    engines = (_engine(before), _engine(now))
    if engines[0] != engines[1]:  # a screening number never gates a protocol number, nor the reverse
        cmp.verdict, cmp.reason = MISMATCH, f"the baseline was measured by the {engines[0]} AutoAttack engine, " \
                                            f"the re-run by the {engines[1]} engine"
        return cmp
    cmp.clean_now = now.clean_flags.count("1") / n
    cmp.robust_now = now.robust_flags.count("1") / n
    cmp.lost, cmp.gained = _discordant(before.robust_flags, now.robust_flags)
    cmp.clean_lost, cmp.clean_gained = _discordant(before.clean_flags, now.clean_flags)

    if chosen == "exact":
        if cmp.lost or cmp.clean_lost:
            cmp.verdict = REGRESSION
            cmp.reason = "; ".join(
                f"{k} example(s) {what} in the baseline are {now_} now"
                for k, what, now_ in ((cmp.lost, "robust", "broken"), (cmp.clean_lost, "correct", "misclassified"))
                if k)
        elif cmp.gained or cmp.clean_gained:
            cmp.verdict = CHANGED
            cmp.reason = ("per-example results moved where they reproduce exactly "
                          f"(robust +{cmp.gained}, clean +{cmp.clean_gained})")
        return cmp

    cmp.p_robust = mcnemar_p_value(cmp.lost, cmp.gained)
    cmp.p_clean = mcnemar_p_value(cmp.clean_lost, cmp.clean_gained)
    failures = []
    if cmp.p_robust < a:
        failures.append(f"robust accuracy dropped: {cmp.lost} lost vs {cmp.gained} gained, "
                        f"p={cmp.p_robust:.4g} < alpha={a:g}")
    if cmp.p_clean < a:
        failures.append(f"clean accuracy dropped: {cmp.clean_lost} lost vs {cmp.clean_gained} gained, "
                        f"p={cmp.p_clean:.4g} < alpha={a:g}")
    if failures:
        cmp.verdict, cmp.reason = REGRESSION, "; ".join(failures)
    elif cmp.lost or cmp.clean_lost:
        cmp.verdict = OK_NOISE
    return cmp


# --------------------------------------------------------------------------- re-run


def rerun(baseline: Baseline, *, device: str = "auto", data_dir: str | Path | None = None,
          progress: bool = True) -> tuple[EvalResult, list[str]]:
    """Run the baseline's evaluation again: same model, attack config, images, seed and batch size.

    Returns the new result and notes worth printing (a changed checkpoint hash or attack
    implementation is reported, not fatal: whether it matters is what the comparison decides).
    """
    from robustkit.attacks import attack_from_config
    from robustkit.data import load_array_file, load_split
    from robustkit.eval import Subject, evaluate
    from robustkit.eval.harness import tensor_fingerprint
    from robustkit.models import load_model

    r = baseline.result
    notes: list[str] = []
    dev = require_device(device)

    data_info: dict[str, Any]
    if r.data.get("split") == "file":
        source = str(r.data.get("source"))
        x, y = load_array_file(source)
        if r.n_examples > len(y):
            raise ConfigError(f"{source} holds {len(y)} examples, the baseline used {r.n_examples}")
        x, y = x[: r.n_examples], y[: r.n_examples]
        data_info = {k: v for k, v in r.data.items() if k != "fingerprint"}
        fingerprint = tensor_fingerprint(x, y)
    else:
        split = load_split(str(r.dataset), "test", data_dir=data_dir, subset=r.data.get("subset"))
        x, y = split.tensors(r.n_examples)
        fingerprint = split.fingerprint(r.n_examples)
        data_info = {"source": split.source, "split": "test", "n_available": len(split),
                     "indices": "first-n", "fingerprint": fingerprint}
        if split.subset:
            data_info["subset"] = split.subset
    stored = r.data.get("fingerprint")
    if stored and stored != fingerprint:
        raise ConfigError(
            f"data fingerprint differs: the baseline saw {str(stored)[:12]}..., the first {r.n_examples} "
            f"{r.dataset} test examples here are {fingerprint[:12]}... (from {data_info.get('source')}); "
            "comparing on different images is meaningless — point --data-dir at the baseline's data"
        )

    model_kwargs: dict[str, Any] = {}
    if r.model.startswith("rb:"):
        model_kwargs = {"dataset": r.dataset, "threat_model": r.norm}
    elif r.model.endswith(".init"):
        model_kwargs = dict(r.model_info.get("arch_args") or {})
    loaded = load_model(r.model, device=dev, **model_kwargs)
    old_sha = r.provenance.get("checkpoint_sha256")
    if old_sha and loaded.checkpoint_sha256 and old_sha != loaded.checkpoint_sha256:
        notes.append(f"{baseline.id}: checkpoint sha256 changed ({old_sha[:12]}... -> "
                     f"{loaded.checkpoint_sha256[:12]}...): the weights are not the baseline's")

    attack = attack_from_config(dict(r.attack_config or {}))
    impl_before = (r.attack_config or {}).get("implementation")
    impl_now = attack.config().get("implementation")
    if impl_before != impl_now:
        notes.append(f"{baseline.id}: attack implementation {impl_before} -> {impl_now}")

    subject = Subject.from_loaded(loaded, dataset=r.dataset, data_info=data_info).renamed(r.model)
    result = evaluate(
        loaded.model, attack, x, y, subject=subject, attack_name=r.attack,
        batch_size=r.batch_size, device=dev, seed=r.seed, records_path=None, resume=False, progress=progress,
    )
    return result, notes


# --------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _short_model(name: str) -> str:
    return Path(name).name if name.endswith((".safetensors", ".json")) else name


def format_table(rows: list[Comparison]) -> str:
    """Fixed-width table, one line per baseline (plain ASCII so any terminal or CI log shows it)."""
    table = [("baseline", "model", "attack", "n", "clean before->now", "robust before->now",
              "lost/gained", "test", "verdict")]
    for c in rows:
        diff = f"-{c.lost}/+{c.gained}"
        if c.clean_lost or c.clean_gained:
            diff += f" (clean -{c.clean_lost}/+{c.clean_gained})"
        if c.clean_now is None:
            test = c.mode
        elif c.mode == "exact":
            test = "exact"
        else:
            test = f"p={c.p_robust:.4g}"
            if c.clean_lost:
                test += f", clean p={c.p_clean:.4g}"
        table.append((c.id, _short_model(c.model), c.attack, str(c.n),
                      f"{_pct(c.clean_before)} -> {_pct(c.clean_now)}",
                      f"{_pct(c.robust_before)} -> {_pct(c.robust_now)}", diff, test, c.verdict))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for j, r in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def explain(c: Comparison) -> str:
    """What failed and what to do about it, for one failing baseline."""
    if c.verdict == MISMATCH:
        next_step = f"make a new baseline with `robustkit regress {c.path} --from-result RESULT.json`"
    else:
        next_step = f"if this is intended, accept it deliberately: `robustkit regress --update {c.path}`"
    return f"{c.id}: {c.verdict} ({c.mode}: {c.mode_reason}): {c.reason}; {next_step}"


# --------------------------------------------------------------------------- command


def run_regress(
    paths: list[str | Path],
    *,
    update: bool = False,
    tolerance: str | None = None,
    alpha: float | None = None,
    device: str = "auto",
    data_dir: str | Path | None = None,
    progress: bool = True,
    out: IO[str] | None = None,
) -> int:
    """Re-run and compare every baseline; 0 all ok (or updated), 1 any regressed/changed.

    Every baseline file is validated before anything runs, so a typo in the last file does not
    cost the evaluations of the others.
    """
    out = out or sys.stdout
    if tolerance is not None and tolerance not in MODES:
        raise ConfigError(f"--tolerance must be one of {', '.join(MODES)}, got {tolerance!r}")
    if alpha is not None:
        if not 0 < alpha < 1:  # also refuses nan
            raise ConfigError(f"--significance must be in (0, 1), got {alpha}")
    require_device(device)
    baselines = [load_baseline(p) for p in collect_baseline_paths(paths)]
    rows: list[Comparison] = []
    notes: list[str] = []
    updated: list[str] = []
    for k, b in enumerate(baselines, start=1):
        if progress:  # the bars alone do not say which baseline is running
            print(f"[{k}/{len(baselines)}] {b.id}: {b.result.model} | {b.result.attack} | {b.result.dataset} "
                  f"n={b.result.n_examples}", file=sys.stderr)
        try:
            now, run_notes = rerun(b, device=device, data_dir=data_dir, progress=progress)
        except RobustkitError as e:
            raise BaselineRunError(b.path, e) from e
        notes.extend(run_notes)
        cmp = compare(b, now, mode=tolerance, alpha=alpha)
        rows.append(cmp)
        if update:
            Baseline(b.path, b.mode, b.alpha, b.command, now).save()
            updated.append(f"updated {b.path} (was {cmp.verdict})")
    print(format_table(rows), file=out)
    if notes or updated:
        print("", file=out)
        for note in notes:
            print(f"note: {note}", file=out)
        for line in updated:
            print(line, file=out)
    failing = [c for c in rows if c.failed]
    if update:
        return 0
    if failing:
        print("", file=out)
        for c in failing:
            print(explain(c), file=out)
        return 1
    return 0
