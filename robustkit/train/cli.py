"""``robustkit train {pgd-at,trades,fast-at,ltd}``: recipe + flags -> trained, measured checkpoint.

Options resolve in three layers: built-in defaults (:data:`OPTIONS`, also the defaults of
:func:`robustkit.train.adversarial.train`), then a recipe file (``--recipe
defenses/X.toml``, whose keys are these option names with underscores), then command-line
flags. The *resolved* recipe (every hyperparameter, wherever it came from) is what the
checkpoint's ``training`` metadata records, so a result can be reproduced from its checkpoint
alone.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustkit.core.errors import ConfigError, close_matches_hint
from robustkit.core.provenance import training_run
from robustkit.core.threat import format_eps, parse_eps
from robustkit.train.adversarial import (
    FRAMEWORKS,
    INNERS,
    SCHEDULES,
    canonical_norm,
    default_alpha,
    default_milestones,
    evaluate_pgd,
    train,
)

METHODS = ("pgd-at", "trades", "fast-at", "ltd")
# What each method fixes: fast AT *is* PGD-AT with a single FGSM-RS step.
FIXED: dict[str, dict[str, Any]] = {
    "pgd-at": {"framework": "pgd-at"},
    "trades": {"framework": "trades"},
    "fast-at": {"framework": "pgd-at", "inner": "fgsm-rs"},
    "ltd": {},
}
# Recipe-file keys that describe the file rather than set an option.
META_KEYS = ("name", "description", "method")


# --------------------------------------------------------------------------------------------
# Option table: one place for defaults, CLI flags and recipe-file validation
# --------------------------------------------------------------------------------------------


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("an integer")
    return int(v)


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("a number")
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ValueError("true or false")


def _eps(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("an eps like 8/255 or 0.5")
    parse_eps(v)  # validates; ConfigError explains a malformed value
    return str(v)


def _alpha(v: Any) -> str:
    return "auto" if v == "auto" else _eps(v)


def _milestones(v: Any) -> str | list[int]:
    if v == "auto":
        return "auto"
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list):
        raise ValueError('"auto" or a list of epochs like [8, 12]')
    return [_int(str(i).strip() if isinstance(i, str) else i) for i in items]


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return v

    parse.choices = choices  # type: ignore[attr-defined]  # shown as the flag's metavar
    return parse


def _norm(v: Any) -> str:
    try:
        return canonical_norm(_str(v))
    except ConfigError:
        raise ValueError("Linf or L2") from None


def _opt_int(v: Any) -> int | None:
    return None if v in ("all", None) else _int(v)


@dataclass(frozen=True)
class Opt:
    """A training option: built-in default, parser, help, and which methods have it."""

    default: Any
    parse: Callable[[Any], Any]
    help: str
    methods: tuple[str, ...] = METHODS


LTD_ONLY = ("ltd",)
OPTIONS: dict[str, Opt] = {
    # model and data
    "arch": Opt("small_cnn", _str, "registered architecture to train (`robustkit list models`)"),
    "init": Opt(None, _str, "start from this model id or checkpoint path instead of a random init "
                            "(its architecture is used; default: random init with --seed)"),
    "dataset": Opt("cifar10", _str, "robustkit dataset name"),
    "n_train": Opt(None, _opt_int, "use only the first N train images (default all)"),
    "n_test": Opt(None, _opt_int, "test images for the final measurement (default all)"),
    "holdout": Opt(0, _int, "hold out the last N train images as the logged val set; 0 = log the test "
                            "split (logging only, nothing is selected on it)"),
    "val_pgd_n": Opt(256, _int, "logged val images per epoch (clean + PGD-10); 0 = all"),
    # optimisation
    "epochs": Opt(15, _int, "training epochs"),
    "batch_size": Opt(128, _int, "batch size"),
    "lr_max": Opt(0.1, _float, "peak (onecycle) or initial (piecewise) learning rate"),
    "schedule": Opt("onecycle", _choice(*SCHEDULES), "onecycle triangle per step, or piecewise x0.1"),
    "lr_peak_frac": Opt(0.3, _float, "onecycle: fraction of the steps spent warming up"),
    "milestones": Opt("auto", _milestones, "piecewise: x0.1 after these epochs, e.g. 100,150 "
                                           "(auto = 1/2 and 3/4 of the epochs)"),
    "momentum": Opt(0.9, _float, "SGD momentum (Nesterov)"),
    "weight_decay": Opt(5e-4, _float, "on conv/linear weights only"),
    "crop_pad": Opt(4, _int, "random crop with this reflect padding, plus horizontal flip"),
    "seed": Opt(0, _int, "seed of the init, data order, augmentation and attack starts"),
    # threat model and inner maximisation
    "norm": Opt("Linf", _norm, "Linf or L2"),
    "eps": Opt("8/255", _eps, "training (and measured) radius, e.g. 8/255 or 0.5"),
    "inner": Opt("pgd", _choice(*INNERS), "inner maximisation: pgd or fgsm-rs (one step)"),
    "steps": Opt(10, _int, "PGD steps of the inner maximisation"),
    "alpha": Opt("auto", _alpha, "step size (auto = 2.5*eps/steps for pgd, 1.25*eps for fgsm-rs)"),
    "eps_warmup": Opt(0, _int, "ramp eps linearly over this many epochs (0 = off)"),
    # frameworks and plug-ins
    "beta": Opt(6.0, _float, "TRADES weight of KL(clean || adv)"),
    "awp": Opt(False, _bool, "adversarial weight perturbation (Wu et al. 2020)"),
    "awp_gamma": Opt(5e-3, _float, "AWP size relative to each layer's weight norm"),
    "awp_warmup": Opt(0, _int, "epochs without AWP before it starts"),
    # LTD
    "framework": Opt("trades", _choice(*FRAMEWORKS), "LTD's base framework", LTD_ONLY),
    "teacher": Opt("small_cnn.cifar10_partial", _str, "teacher model id or checkpoint path", LTD_ONLY),
    "tau_t": Opt(0.5, _float, "teacher temperature of the soft labels", LTD_ONLY),
    "tau_s": Opt(2.0, _float, "student temperature (logits / tau_s in training AND inference)", LTD_ONLY),
    "teacher_input": Opt("clean", _choice("clean", "adv"), "what the teacher labels: the clean image "
                                                           "(as in KD) or the student's adversarial one",
                         LTD_ONLY),
}


def options_for(method: str) -> dict[str, Opt]:
    return {k: o for k, o in OPTIONS.items() if method in o.methods}


def _coerce(method: str, key: str, value: Any, where: str) -> Any:
    opt = options_for(method)[key]
    try:
        return opt.parse(value)
    except ConfigError as e:  # parse_eps explains a malformed eps itself
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        why = str(e) or "a valid value"
        raise ConfigError(f"{where}: {key} = {value!r} is not valid; expected {why}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A recipe file's TOML, with one-line errors for a missing or malformed file."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed recipe {p}: {e}") from None


def read_recipe(path: str | Path, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a recipe file; return ``(options, arch_args)``. Unknown keys are errors (with close
    matches): a typo silently falling back to a default would mislabel a whole training run."""
    p = Path(path)
    data = read_toml(p)
    if "method" in data and data["method"] != method:
        raise ConfigError(f"recipe {p} is for method {data['method']!r}, not {method!r}; "
                          f"run `robustkit train {data['method']} --recipe {p}`")
    known = options_for(method)
    arch_args = data.get("arch_args", {})
    if not isinstance(arch_args, dict):
        raise ConfigError(f"recipe {p}: arch_args must be a table ([arch_args])")
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key in META_KEYS or key == "arch_args":
            continue
        if key not in known:
            hint = close_matches_hint(key, [*known, "arch_args", *META_KEYS])
            other = [m for m in METHODS if key in options_for(m)]
            extra = f" (it belongs to method {', '.join(other)})" if other else ""
            raise ConfigError(f"recipe {p}: unknown key {key!r} for method {method}{hint}{extra}")
        options[key] = _coerce(method, key, value, f"recipe {p}")
    return options, dict(arch_args)


def parse_arch_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a TOML value (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ConfigError(f"--arch-arg {text!r}: write KEY=VALUE, e.g. width=16")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def build_parser(method: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"robustkit train {method}",
        description=_DESCRIPTIONS[method] + " Unset options come from --recipe, then built-in defaults "
                    "(shown). Saves NAME.safetensors + NAME.json with the resolved recipe and "
                    "clean / PGD-10 test accuracy.",
    )
    p.add_argument("--recipe", default=None, help="TOML file of option defaults, e.g. defenses/pgd_at.toml")
    p.add_argument("--out", required=True, help="checkpoint path without suffix")
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture argument (repeatable), e.g. width=16")
    p.add_argument("--data-dir", default=None, help="root holding <dataset>/{train,test}.npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 on a shared CPU)")
    p.add_argument("--no-progress", action="store_true")
    for key, opt in options_for(method).items():
        flag = "--" + key.replace("_", "-")
        default = f" (default: {opt.default})" if opt.default is not None else ""
        if opt.parse is _bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=opt.help + default)
        else:
            choices = getattr(opt.parse, "choices", None)
            metavar = "{" + ",".join(choices) + "}" if choices else None
            p.add_argument(flag, default=None, metavar=metavar, help=opt.help + default)
    return p


_DESCRIPTIONS = {
    "pgd-at": "PGD adversarial training (Madry et al. 2018): CE on PGD examples.",
    "trades": "TRADES (Zhang et al. 2019): CE(clean) + beta * KL(clean || adv).",
    "fast-at": "Fast adversarial training (Wong et al. 2020): PGD-AT with one FGSM step from a random start.",
    "ltd": "Low Temperature Distillation (Chen & Lee): a teacher's soft labels at temperature tau_t replace "
           "the one-hot labels of PGD-AT or TRADES; the student's logits are divided by tau_s in training "
           "and inference.",
}


def resolve(method: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Built-in defaults < recipe < flags. Returns ``(config, arch_args, given)``, where ``given``
    lists the options set by the recipe or a flag (for the 'ignored option' notes)."""
    cfg = {k: o.default for k, o in options_for(method).items()}
    arch_args: dict[str, Any] = {}
    given: list[str] = []
    recipe_arch = cfg["arch"]
    if args.recipe:
        rec, arch_args = read_recipe(args.recipe, method)
        cfg.update(rec)
        given += list(rec)
        recipe_arch = cfg["arch"]
    for key in options_for(method):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = _coerce(method, key, value, "--" + key.replace("_", "-"))
            given.append(key)
    if cfg["arch"] != recipe_arch and arch_args:
        print(f"note: --arch {cfg['arch']} replaces the recipe's {recipe_arch}; its arch_args "
              f"{arch_args} are not used", file=sys.stderr)
        arch_args = {}
    for text in args.arch_arg:
        k, v = parse_arch_arg(text)
        arch_args[k] = v
    for key, value in FIXED[method].items():
        if key in given and cfg.get(key) != value:
            raise ConfigError(f"method {method} fixes {key} = {value!r} (got {cfg[key]!r}); for "
                              f"multi-step PGD use `robustkit train pgd-at` (or trades, ltd)")
        cfg[key] = value
    return cfg, arch_args, given


def unused_options(cfg: dict[str, Any]) -> set[str]:
    """Options that a resolved config does not use (so the record does not claim them)."""
    unused = set()
    if cfg["framework"] != "trades":
        unused.add("beta")
    if cfg["inner"] == "fgsm-rs":
        unused.add("steps")  # FGSM is one step
    if not cfg["awp"]:
        unused |= {"awp_gamma", "awp_warmup"}
    unused.add("milestones" if cfg["schedule"] == "onecycle" else "lr_peak_frac")
    return unused


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------


def _fill_dataset_args(arch: str, arch_args: dict[str, Any], info: Any) -> dict[str, Any]:
    """Give the architecture the dataset's channels, classes and normalisation when its
    constructor takes them and the user did not set them (so ``--dataset mnist`` just works)."""
    from robustkit.models.base import model_info

    builder = model_info(arch).builder
    params = inspect.signature(builder).parameters
    fill = {"in_channels": int(info.shape[0]), "num_classes": int(info.num_classes),
            "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std]}
    out = {k: v for k, v in fill.items() if k in params and k not in arch_args}
    out.update(arch_args)
    for k in out:
        if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"architecture {arch} has no argument {k!r}{close_matches_hint(k, params)}; "
                              f"it takes {', '.join(params)}")
    return out


def build_model(
    method: str, cfg: dict[str, Any], arch_args: dict[str, Any], info: Any, explicit_arch: bool = False
) -> tuple[torch.nn.Module, str, dict[str, Any], dict[str, Any] | None]:
    """The model to train: ``(model, architecture to save, its arch_args, init record)``.

    Random init (seeded) of ``cfg["arch"]``, or ``cfg["init"]``'s weights and architecture; for
    LTD the base goes inside an :class:`LTDStudent` with this run's ``tau_s`` (an LTD checkpoint
    as init contributes its base and base weights, not its temperature)."""
    from robustkit.models import load_model

    if cfg["init"]:
        if explicit_arch:
            raise ConfigError("--init fixes the architecture (it is read from the init model); "
                              "drop --arch/--arch-arg")
        loaded = load_model(cfg["init"])
        if arch_args:
            print(f"note: --init {cfg['init']} fixes the architecture; the recipe's arch_args "
                  f"{arch_args} are not used", file=sys.stderr)
        meta = loaded.metadata
        if "architecture" not in meta:
            raise ConfigError(f"--init {cfg['init']}: no architecture recorded; use a robustkit "
                              f"checkpoint or model id")
        init_arch, init_args = meta["architecture"], dict(meta.get("arch_args", {}))
        record = {"model": cfg["init"], "architecture": init_arch, "checkpoint_sha256": loaded.checkpoint_sha256}
        if method != "ltd":
            cfg["arch"] = init_arch
            return loaded.model, init_arch, init_args, record
        from robustkit.models.ltd_student import LTDStudent

        if init_arch == "ltd":  # keep its base, take this run's tau_s
            base, base_args = init_args["base"], dict(init_args.get("base_args", {}))
            source = loaded.model.base  # type: ignore[union-attr]
        else:
            base, base_args, source = init_arch, init_args, loaded.model
        cfg["arch"] = base
        student = LTDStudent(base, base_args, cfg["tau_s"])
        student.base.load_state_dict(source.state_dict())
        return student, "ltd", {"base": base, "base_args": base_args, "tau_s": cfg["tau_s"]}, record

    arch_args = _fill_dataset_args(cfg["arch"], arch_args, info)
    name, kwargs = f"{cfg['arch']}.init", dict(arch_args)
    if method == "ltd":
        name, kwargs = "ltd.init", {"base": cfg["arch"], "base_args": arch_args, "tau_s": cfg["tau_s"]}
    try:
        model = load_model(name, seed=cfg["seed"], **kwargs).model
    except TypeError as e:
        raise ConfigError(f"cannot build {cfg['arch']} with {arch_args}: {e}") from None
    return model, ("ltd" if method == "ltd" else cfg["arch"]), kwargs, None


def _check_output(model: torch.nn.Module, what: str, x: torch.Tensor, num_classes: int) -> None:
    with torch.no_grad():
        out = model.eval()(x[:2])
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise ConfigError(f"{what} outputs shape {tuple(out.shape)} on this dataset's images; "
                          f"expected (N, {num_classes}) logits")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(method: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with ``method``, measure on the test split, save a checkpoint; return its metadata."""
    from robustkit.core.checkpoint import save_checkpoint, sha256_file
    from robustkit.data import dataset_info, load_split
    from robustkit.models import load_model
    from robustkit.models.small_cnn import _index_ranges

    if method not in METHODS:
        from robustkit.core.errors import UnknownNameError

        raise UnknownNameError("training method", method, METHODS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(method).parse_args(argv)
    cfg, arch_args, given = resolve(method, args)
    explicit_arch = args.arch is not None or bool(args.arch_arg)
    if args.threads:
        torch.set_num_threads(args.threads)
    unused = unused_options(cfg)
    for key in sorted(set(given) & unused):
        print(f"note: {key} = {cfg[key]!r} has no effect here ({_why_unused(key, cfg)})", file=sys.stderr)

    # ---- data
    eps = parse_eps(cfg["eps"])
    steps = 1 if cfg["inner"] == "fgsm-rs" else cfg["steps"]
    alpha = default_alpha(cfg["inner"], eps, steps) if cfg["alpha"] == "auto" else parse_eps(cfg["alpha"])
    milestones = default_milestones(cfg["epochs"]) if cfg["milestones"] == "auto" else cfg["milestones"]
    info = dataset_info(cfg["dataset"])
    train_split = load_split(cfg["dataset"], "train", data_dir=args.data_dir)
    test_split = load_split(cfg["dataset"], "test", data_dir=args.data_dir)
    x_train, y_train = train_split.tensors(cfg["n_train"])
    x_test, y_test = test_split.tensors(cfg["n_test"])
    train_indices = [int(i) for i in train_split.indices][: len(x_train)]
    holdout = cfg["holdout"]
    if holdout:
        if not 0 < holdout < len(x_train):
            raise ConfigError(f"holdout {holdout} must be between 1 and {len(x_train) - 1}")
        x_val, y_val = x_train[-holdout:], y_train[-holdout:]
        x_train, y_train = x_train[:-holdout], y_train[:-holdout]
        train_indices = train_indices[:-holdout]
        val_desc = f"train[-{holdout}:] (held out; logged each epoch, no selection)"
    else:
        x_val, y_val = x_test, y_test
        val_desc = f"{cfg['dataset']} test split, first {len(x_test)} (logged each epoch only; no selection)"

    # ---- model (and teacher)
    model, architecture, saved_args, init_record = build_model(method, cfg, arch_args, info, explicit_arch)
    _check_output(model, f"model {architecture}", x_train, info.num_classes)
    targets_fn = None
    teacher_record: dict[str, Any] | None = None
    if method == "ltd":
        from robustkit.train.ltd import ltd_targets, teacher_stats

        t_loaded = load_model(cfg["teacher"], device=args.device)
        teacher = t_loaded.model
        _check_output(teacher, f"teacher {cfg['teacher']}", x_train.to(args.device), info.num_classes)
        teacher_record = {
            "model": cfg["teacher"],
            "checkpoint_sha256": t_loaded.checkpoint_sha256,
            "architecture": t_loaded.metadata.get("architecture"),
            "arch_args": t_loaded.metadata.get("arch_args"),
            # accuracy and sharpness of the soft labels the student is trained towards
            "train_stats_at_tau_t": teacher_stats(teacher, x_train, y_train, cfg["tau_t"]),
            "test_stats_at_tau_t": teacher_stats(teacher, x_test, y_test, cfg["tau_t"]),
        }
        targets_fn = ltd_targets(teacher, cfg["tau_t"], cfg["teacher_input"])
        print(f"teacher {cfg['teacher']}: train acc {teacher_record['train_stats_at_tau_t']['acc']:.4f}, "
              f"mean max prob at tau_t={cfg['tau_t']:g}: "
              f"{teacher_record['train_stats_at_tau_t']['mean_max_prob']:.3f}")

    n_params = sum(p.numel() for p in model.parameters())
    print(f"robustkit train {method}: {architecture} {saved_args} ({n_params:,} parameters); "
          f"{len(x_train)} train / {len(x_val)} logged val images; {cfg['framework']} + {cfg['inner']}"
          f"{'' if cfg['inner'] == 'fgsm-rs' else f'-{steps}'} {cfg['norm']} eps {cfg['eps']}, "
          f"alpha {alpha * 255:.2f}/255{', AWP' if cfg['awp'] else ''}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    logs = train(
        model, x_train, y_train, x_val, y_val,
        framework=cfg["framework"], inner=cfg["inner"], norm=cfg["norm"], eps=eps, alpha=alpha,
        steps=steps, eps_warmup=cfg["eps_warmup"], beta=cfg["beta"], awp=cfg["awp"],
        awp_gamma=cfg["awp_gamma"], awp_warmup=cfg["awp_warmup"], targets_fn=targets_fn,
        epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr_max=cfg["lr_max"],
        schedule=cfg["schedule"], lr_peak_frac=cfg["lr_peak_frac"], milestones=milestones,
        momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], crop_pad=cfg["crop_pad"],
        val_pgd_n=cfg["val_pgd_n"], seed=cfg["seed"], device=args.device,
        progress=not args.no_progress,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    # ---- final measurement on the test split
    t1 = time.perf_counter()
    res = evaluate_pgd(model, x_test, y_test, norm=cfg["norm"], eps=eps, steps=10, device=args.device)
    eps_tag = format_eps(eps).replace("/", "_").replace(".", "p")
    metrics = {
        "split": "test",
        "n": len(x_test),
        "clean_acc": res["clean_acc"],
        f"pgd10_{cfg['norm'].lower()}_{eps_tag}_acc": res["pgd_acc"],
        "pgd": {"norm": cfg["norm"], "eps": cfg["eps"], "steps": 10, "alpha": format_eps(eps / 4),
                "random_start": True, "seed": 0, "loss": "ce", "counted": "clean and adversarial correct"},
        "source": "robustkit.train.cli (local PGD in eval mode; robustness claims use robustkit eval)",
    }
    print(f"test (n={len(x_test)}): clean {res['clean_acc']:.4f}  PGD-10 {cfg['norm']} {cfg['eps']} "
          f"{res['pgd_acc']:.4f}  ({time.perf_counter() - t1:.1f}s)  training {wall:.0f}s", flush=True)

    recipe = {k: v for k, v in cfg.items() if k not in unused}
    recipe.update({
        "method": method,
        "arch_args": saved_args if method != "ltd" else saved_args["base_args"],
        "eps_value": eps,
        "alpha_value": alpha,
        "steps": steps,
        "nesterov": True,
        "weight_decay_on": "conv/linear weights only (not BN, not biases)",
        "augmentation": f"random crop (reflect pad {cfg['crop_pad']}) + horizontal flip",
        "attack_bn_mode": "eval (running statistics) during the inner maximisation",
        "inner_start": ("x + 0.001*N(0,1) (TRADES)" if cfg["framework"] == "trades" and cfg["inner"] == "pgd"
                        else "uniform in the eps-ball"),
        "inner_objective": "KL(p(x) || p(x'))" if cfg["framework"] == "trades" else "CE(true labels)",
    })
    if cfg["schedule"] == "piecewise":
        recipe["milestones"] = list(milestones)
    training: dict[str, Any] = {
        "method": method,
        "framework": cfg["framework"],
        "recipe": recipe,
        "recipe_file": ({"path": args.recipe, "sha256": sha256_file(args.recipe)} if args.recipe else None),
        "options_given": sorted(set(given)),
        "init": init_record,
        "teacher": teacher_record,
        "data": {
            "dataset": cfg["dataset"],
            "source": str(getattr(train_split, "source", "")),
            "n_train": len(x_train),
            "train_indices": _index_ranges(train_indices),
            "holdout": holdout,
            "logged_val": val_desc,
            "test_source": str(getattr(test_split, "source", "")),
            "n_test": len(x_test),
        },
        "seed": cfg["seed"],
        **training_run(args.device, wall, cpu),
        "epochs_log": logs,
        "command": f"robustkit train {method} " + shlex.join(argv),
    }
    normalization = None
    base_args = saved_args["base_args"] if architecture == "ltd" else saved_args
    if "mean" in base_args and "std" in base_args:
        normalization = {"mean": list(base_args["mean"]), "std": list(base_args["std"])}
    meta = save_checkpoint(
        model, args.out, architecture=architecture, arch_args=saved_args, normalization=normalization,
        dataset=cfg["dataset"], num_classes=int(info.num_classes), training=training, metrics=metrics,
    ).metadata
    print(f"saved {meta['file']} (sha256 {meta['sha256']}) and its .json next to {args.out}")
    return meta


def _why_unused(key: str, cfg: dict[str, Any]) -> str:
    return {
        "beta": f"framework is {cfg['framework']}",
        "steps": "fgsm-rs takes one step",
        "awp_gamma": "AWP is off (--awp)",
        "awp_warmup": "AWP is off (--awp)",
        "milestones": "schedule is onecycle",
        "lr_peak_frac": "schedule is piecewise",
    }[key]
