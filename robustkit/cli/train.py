"""``robustkit train``: resolve a registered trainer's config (defaults, recipe, ``--set``) and run it.

There is no per-trainer code here: every trainer is found through the registry
(:mod:`robustkit.train.base`), so a new trainer file (or an out-of-tree plug-in) is a new
``robustkit train NAME`` with nothing to edit in this file.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from robustkit.cli.options import add_common, log_enabled, progress_enabled
from robustkit.core.errors import ConfigError

EXAMPLES = """\
examples:
  robustkit train --list
  robustkit train fast_at --help                                   # its config: fields, types, defaults
  robustkit train --recipe defenses/ltd.cifar10_partial.toml --out runs/ltd   # a shipped file's recipe
  robustkit train --recipe defenses/ltd.toml --set epochs=2 --out runs/ltd_short
  robustkit train lightweight_cnn --dataset mnist --print-config   # the resolved config, as TOML
  torchrun --nproc-per-node 4 -m robustkit train pgd_at --recipe defenses/pgd_at.toml --out runs/pgd_at
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train", add_help=False, help="train a registered producer (`robustkit train --list`)",
        description="Train a registered producer. Its config resolves in layers: the trainer's defaults, "
        "then --recipe R.toml, then each --set KEY=VALUE, then --seed/--dataset; the resolved config is "
        "recorded in the checkpoint it writes (OUT.safetensors + OUT.json). Under torchrun (`torchrun "
        "--nproc-per-node N -m robustkit train ...`) the adversarial trainers (pgd_at, trades, fast_at, ltd) and "
        "airbench train one model data-parallel: batch_size stays the global batch, and rank 0 writes the "
        "checkpoint. The adversarial trainers and airbench keep OUT.resume.safetensors until they finish: the same "
        "command continues a killed run from its last finished epoch.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("name", nargs="?", default=None,
                    help="trainer name (default: the recipe's `trainer` key)")
    tr.add_argument("-h", "--help", action="store_true", help="this help, plus NAME's config fields")
    tr.add_argument("--list", action="store_true", help="list the registered trainers")
    tr.add_argument("--recipe", default=None, metavar="R.toml", help="a recipe: config fields as TOML")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override one config field (repeatable), the value read as TOML, e.g. epochs=5")
    tr.add_argument("--dataset", default=None, help="shorthand for --set dataset=NAME")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and stop")
    add_common(tr, seed="shorthand for --set seed=N (default: the config's)", seed_default=None,
               out="checkpoint to write, OUT.safetensors + OUT.json (default: runs/<trainer>)", force=True)
    tr.set_defaults(func=cmd_train, parser=tr)


def cmd_train(args: argparse.Namespace) -> int:
    from robustkit.core.config import read_recipe, resolve_config
    from robustkit.core.provenance import require_device
    from robustkit.distributed import current
    from robustkit.train._ddp import on_main
    from robustkit.train.base import RunOptions, get_trainer, list_trainers

    if args.list:
        for trainer in list_trainers():
            print(f"{trainer.name:<20} {trainer.description}")
        return 0
    meta: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    if args.recipe:
        meta, fields = read_recipe(args.recipe)
    name = args.name or meta.get("trainer")
    if args.help:
        args.parser.print_help()
        if name:
            print(config_help(get_trainer(name)))
        return 0
    if not name:
        raise ConfigError("name a trainer (`robustkit train --list`), or give a --recipe with a `trainer` key")
    trainer = get_trainer(name)
    if meta.get("trainer") and get_trainer(meta["trainer"]).name != trainer.name:
        raise ConfigError(f"recipe {args.recipe} is for trainer {meta['trainer']!r}, not {trainer.name!r}")
    fixed = {k: v for k, v in (("seed", args.seed), ("dataset", args.dataset)) if v is not None}
    settable = {f for f, *_ in _fields(trainer)}
    for key in fixed:
        if key not in settable:
            raise ConfigError(f"--{key}: trainer {trainer.name} has no {key} field")
    config = resolve_config(trainer.config, recipe=fields, recipe_source=f"recipe {args.recipe}",
                            overrides=args.overrides, fixed=fixed)
    if args.print_config:
        print(to_toml(trainer.name, config))
        return 0
    job = current()
    # A trainer with the sync_bn field trains data-parallel; any other would train W copies and write one file W times.
    if job is not None and "sync_bn" not in settable:
        raise ConfigError(f"trainer {trainer.name} does not train data-parallel under torchrun (the adversarial trainers "
                          "and airbench do); run it as one process")
    out = Path(args.out) if args.out else Path("runs") / trainer.name
    # rank 0 alone checks (the check probes the folder with a file): the others write nothing
    on_main(job, lambda: _refuse_overwrite(out, args.force, _train_inputs(args, config)))
    run = RunOptions(out=out, device=require_device(args.device), data_dir=args.data_dir,
                     download=not args.no_download, progress=progress_enabled(args), log=log_enabled(args))
    checkpoint = trainer(config, run)
    meta_path = checkpoint.path.with_suffix(".json")
    print(f"saved {checkpoint.path} (sha256 {checkpoint.metadata['sha256'][:12]}…) and {meta_path.name}")
    return 0


def _fields(trainer: Any) -> list[tuple[str, str, str]]:
    from robustkit.core.config import describe_config

    return describe_config(trainer.config)


def config_help(trainer: Any) -> str:
    """The trainer's config fields, their types and defaults, and its docstring's first paragraph."""
    rows = _fields(trainer)
    width = max(len(r[0]) for r in rows) if rows else 0
    doc = (trainer.config.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"\nconfig of trainer {trainer.name} ({trainer.config.__name__}): {doc}",
             "set with --recipe R.toml or --set KEY=VALUE", ""]
    lines += [f"  {n:<{width}}  {d:<24} {t}" for n, t, d in rows]
    return "\n".join(lines)


def to_toml(trainer: str, config: Any) -> str:
    """A resolved config as a recipe file that reproduces it (``--recipe`` reads it back)."""
    from robustkit.core.config import config_to_dict

    lines = [f'trainer = "{trainer}"']
    tables = []
    for key, value in config_to_dict(config).items():
        if value is None:
            lines.append(f"# {key} = (none)")
        elif isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        lines.append(f"{key} = {{ {', '.join(f'{k} = {_toml_value(v)}' for k, v in value.items())} }}")
    text = "\n".join(lines)
    tomllib.loads(text)  # what we print must read back
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def _refuse_overwrite(out: Path, force: bool, inputs: list[tuple[Path, str]]) -> None:
    """Before training: a checkpoint is never silently replaced (the user asks for that with
    --force), never written over one of the run's inputs (its teacher, a base model, the recipe),
    and an --out that cannot be written fails now, not after the last epoch."""
    from robustkit.eval.outputs import check_not_input, check_place

    stem = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    if stem.exists() and stem.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a checkpoint path, e.g. {stem / 'run'}")
    pair = (stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json"))
    for p in pair:
        check_place(p)
        check_not_input(p, inputs)
    existing = [p for p in pair if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists; pass --force to replace it, or choose another --out")


def _train_inputs(args: argparse.Namespace, config: Any) -> list[tuple[Path, str]]:
    """What the run reads: the recipe, and every model a config field names (a teacher, base models)."""
    from robustkit.core.config import config_to_dict
    from robustkit.eval.outputs import command_inputs, model_inputs

    names = [v for v in config_to_dict(config).values() if isinstance(v, str)]
    return command_inputs(args) + [i for v in names for i in model_inputs(v)]
