"""Every user error is one line on stderr and exit code 2 (130 for Ctrl-C): a property over a table.

Each case is (argv, a setup that makes the bad input under tmp_path, needles the line must hold,
words it must not hold). Each runs in-process through ``robustkit.cli.main`` and must end with
exactly one non-empty stderr line starting ``robustkit: error:``, no traceback, and tmp_path exactly
as it was (names, mtimes and sizes: no output written, nothing half-written, no ``.tmp`` left).
A new user error belongs in CASES, not in a test of its own.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from robustkit.cli import main
from robustkit.core.checkpoint import pin_metadata

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Ctx:
    """What a setup may use: the tiny checkpoint, monkeypatch, and paths to make unreadable after the
    'before' snapshot (chmod 000; as root, which ignores permission bits, the file system is told to
    refuse them the way it refuses any other user)."""

    tmp: Path
    ckpt: Path
    monkeypatch: pytest.MonkeyPatch
    denied: list[Path] = field(default_factory=list)

    def deny(self) -> None:
        for p in self.denied:
            p.chmod(0)
        if self.denied and os.geteuid() == 0:
            _refuse_as_root(self.monkeypatch, list(self.denied))

    def undeny(self) -> None:
        for p in self.denied:
            p.chmod(0o755 if p.is_dir() else 0o644)


def _refuse_as_root(monkeypatch: pytest.MonkeyPatch, denied: list[Path]) -> None:
    real_stat, real_open = os.stat, builtins.open

    def blocked(p: object, opening: bool) -> bool:
        if isinstance(p, int):
            return False
        q = Path(os.fsdecode(p)).absolute()  # type: ignore[arg-type]
        return any(d in q.parents or (opening and q == d) for d in denied)

    def stat(p, *a, **k):  # noqa: ANN001, ANN002, ANN003
        if blocked(p, False):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_stat(p, *a, **k)

    def open_(p, *a, **k):  # noqa: ANN001, ANN002, ANN003
        if blocked(p, True):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(builtins, "open", open_)


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{tmp}" and "{ckpt}" are filled in
    needles: tuple[str, ...]
    setup: Callable[[Ctx], None] | None = None
    forbidden: tuple[str, ...] = ()  # words a good message must not hold (checked case-insensitively)
    code: int = 2


# --------------------------------------------------------------------------- setups: bad inputs


def _fake_cache(root: Path, dataset: str = "cifar10", n: int = 4) -> Path:
    """A valid robustkit cache (so only what the case breaks is wrong)."""
    path = root / dataset / "test.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.zeros((n, 32, 32, 3), np.uint8), labels=np.arange(n) % 10, indices=np.arange(n))
    return path


def unreadable_data_dir(c: Ctx) -> None:
    _fake_cache(c.tmp / "data")
    c.denied.append(c.tmp / "data")


def unreadable_cache(c: Ctx) -> None:
    c.denied.append(_fake_cache(c.tmp / "data"))


def npy_as_data_file(c: Ctx) -> None:
    np.save(c.tmp / "x.npy", np.zeros((4, 32, 32, 3), np.uint8))
    (c.tmp / "x.npy").rename(c.tmp / "x.npz")


def npy_as_cache(c: Ctx) -> None:
    (c.tmp / "data" / "cifar10").mkdir(parents=True)
    np.save(c.tmp / "x.npy", np.zeros((4, 32, 32, 3), np.uint8))
    (c.tmp / "x.npy").rename(c.tmp / "data" / "cifar10" / "test.npz")


def text_as_npz(c: Ctx) -> None:
    (c.tmp / "x.npz").write_text("images,labels\n1,2\n")


def cache_is_a_folder(c: Ctx) -> None:
    (c.tmp / "data" / "cifar10" / "test.npz").mkdir(parents=True)


def data_dir_is_a_file(c: Ctx) -> None:
    (c.tmp / "data").write_text("not a folder")


def tiny_images(c: Ctx) -> None:
    np.savez(c.tmp / "x.npz", images=np.zeros((4, 4, 4, 3), np.uint8), labels=np.zeros(4, np.int64))


def normalised_images(c: Ctx) -> None:
    rng = np.random.default_rng(0)
    np.savez(c.tmp / "x.npz", images=rng.normal(size=(8, 3, 32, 32)).astype(np.float32), labels=np.arange(8) % 10)


def _copy_checkpoint(c: Ctx, name: str, edit: Callable[[dict], None] | None = None) -> Path:
    """The tiny checkpoint under another name, its metadata edited *and re-pinned* (what a user who
    writes or converts a sidecar by hand produces: the pins cannot catch it, the loader must)."""
    dest = c.tmp / f"{name}.safetensors"
    dest.write_bytes(c.ckpt.read_bytes())
    meta = json.loads(c.ckpt.with_suffix(".json").read_text())
    if edit is not None:
        edit(meta)
        pin_metadata(meta)
    dest.with_suffix(".json").write_text(json.dumps(meta))
    return dest


def arch_args(value: object) -> Callable[[Ctx], None]:
    return lambda c: _copy_checkpoint(c, "ck", lambda m: m.__setitem__("arch_args", value))


def safetensors_is_a_folder(c: Ctx) -> None:
    (c.tmp / "ck.safetensors").mkdir()
    (c.tmp / "ck.json").write_text(c.ckpt.with_suffix(".json").read_text())


def self_referencing_composite(c: Ctx) -> None:
    me = str(c.tmp / "ck.safetensors")
    _copy_checkpoint(c, "ck", lambda m: m.update(architecture="adaptive_smoothing",
                                                 arch_args={"std": me, "robust": me}))


def other_architecture(c: Ctx) -> None:
    _copy_checkpoint(c, "ck", lambda m: m.update(architecture="small_cnn", arch_args={}))


def flipped_weights(c: Ctx) -> None:
    dest = _copy_checkpoint(c, "ck")
    blob = bytearray(dest.read_bytes())
    blob[-1] ^= 0xFF
    dest.write_bytes(bytes(blob))


def interrupt_at(target: str) -> Callable[[Ctx], None]:
    """Ctrl-C while ``target`` (module:attribute) runs: before any evaluation starts."""
    module, attr = target.split(":")

    def setup(c: Ctx) -> None:
        def interrupted(*_a: object, **_k: object) -> None:
            raise KeyboardInterrupt

        c.monkeypatch.setattr(f"{module}.{attr}", interrupted)

    return setup


# --------------------------------------------------------------------------- the table

EVAL = ("eval", "--device", "cpu", "--no-progress", "--no-download", "--out", "{tmp}/r.json")
TINY = (*EVAL, "--model", "{ckpt}")
TINY_SYN = (*TINY, "--dataset", "synthetic", "--n-examples", "4")
SMALL = (*EVAL, "--model", "small_cnn", "--attack", "none", "--data-dir", "{tmp}/data", "--n-examples", "4")
CK = (*EVAL, "--model", "{tmp}/ck.safetensors", "--attack", "none", "--dataset", "synthetic", "--n-examples", "4")
FILE = (*TINY, "--attack", "none", "--data-file", "{tmp}/x.npz")
NO_UNPICKLING = ("unsafe", "allow_pickle", "pickle.load")

CASES = [
    # finding 8: tracebacks before
    Case("unreadable-data-dir", SMALL, ("permission denied",), unreadable_data_dir),
    Case("npy-renamed-npz-data-file", FILE, (".npy array",), npy_as_data_file, NO_UNPICKLING),
    Case("npy-renamed-npz-cache", SMALL, (".npy array", "test.npz"), npy_as_cache, NO_UNPICKLING),
    Case("images-too-small", FILE, ("3x32x32",), tiny_images),
    Case("arch-args-unknown", CK, ("takes no argument 'foo'",), arch_args({"foo": 1})),
    Case("arch-args-wrong-type", CK, ("cannot build tiny_cnn", "width"), arch_args({"width": "wide"})),
    Case("arch-args-null", CK, ("arch_args must be a JSON object", "null"), arch_args(None)),
    Case("arch-args-list", CK, ("arch_args must be a JSON object", "a list"), arch_args([1, 2])),
    Case("safetensors-is-a-folder", CK, ("is a folder",), safetensors_is_a_folder),
    Case("composite-references-itself", CK, ("references itself",), self_referencing_composite),
    Case("attack-arg-eps-and-eps", (*TINY_SYN, "--attack", "pgd", "--eps", "8/255", "--attack-arg", "eps=0.1"),
         ("eps has its own flag, --eps",)),
    Case("attack-arg-norm", (*TINY_SYN, "--attack", "pgd", "--attack-arg", "norm=L2"), ("--norm",)),
    Case("device-gpu0", (*TINY_SYN, "--attack", "none", "--device", "gpu0"), ("--device 'gpu0'",)),
    Case("ctrl-c-loading-plugins", TINY_SYN, ("interrupted",), interrupt_at("robustkit.core.plugins:load_plugins"),
         code=130),
    Case("ctrl-c-loading-the-model", TINY_SYN, ("interrupted",), interrupt_at("robustkit.models:load_model"),
         code=130),
    # finding 9: misleading messages before
    Case("unknown-dataset", (*TINY, "--attack", "pgd", "--dataset", "cifar11"),
         ("unknown dataset 'cifar11'", "did you mean 'cifar10'"), forbidden=("--eps",)),
    Case("eps-negative", (*TINY_SYN, "--attack", "pgd", "--eps", "-1"), ("'-1' is negative",), forbidden=("malformed",)),
    Case("eps-1e9", (*TINY_SYN, "--attack", "pgd", "--eps", "1e9"), ("larger than the input range",),
         forbidden=("malformed",)),
    Case("eps-1000000000", (*TINY_SYN, "--attack", "pgd", "--eps", "1000000000"), ("larger than the input range",)),
    Case("text-file-named-npz", FILE, ("a text file", "not an .npz archive"), text_as_npz, NO_UNPICKLING),
    Case("unreadable-cache", SMALL, ("permission denied", "test.npz"), unreadable_cache, forbidden=("delete",)),
    Case("state-dict-mismatch", CK, ("does not fit small_cnn", "missing key(s)", "unexpected key(s)"),
         other_architecture),
    # handled before this table existed (representatives of tests/test_cli.py and friends)
    Case("unknown-model", (*EVAL, "--model", "smal_cnn"), ("unknown model", "small_cnn")),
    Case("unknown-attack", (*TINY_SYN, "--attack", "autoatack"), ("unknown attack", "'autoattack'")),
    Case("unknown-norm", (*TINY_SYN, "--attack", "pgd", "--norm", "L3"), ("unknown norm",)),
    Case("malformed-eps", (*TINY_SYN, "--attack", "pgd", "--eps", "8/25x"), ("malformed eps", "8/25x")),
    Case("missing-data-dir", (*SMALL[:-4], "--data-dir", "{tmp}/nowhere"), ("{tmp}/nowhere", "does not exist")),
    Case("data-dir-is-a-file", SMALL, ("is a file, not a folder",), data_dir_is_a_file),
    Case("cache-is-a-folder", SMALL, ("is a folder",), cache_is_a_folder),
    Case("missing-data-file", (*TINY, "--attack", "none", "--data-file", "{tmp}/absent.npz"), ("not found",)),
    Case("inputs-outside-unit-interval", FILE, ("[0, 1]",), normalised_images),
    Case("n-examples-beyond-the-data", (*TINY, "--attack", "none", "--dataset", "synthetic", "--n-examples", "100000"),
         ("100000", "512")),
    Case("corrupt-checkpoint", CK, ("sha256 mismatch",), flipped_weights),
    Case("missing-checkpoint", (*EVAL, "--model", "{tmp}/absent.safetensors"), ("not found",)),
    Case("attack-arg-not-key-value", (*TINY_SYN, "--attack", "pgd", "--attack-arg", "steps"), ("KEY=VALUE",)),
    Case("attack-arg-unknown-parameter", (*TINY_SYN, "--attack", "pgd", "--attack-arg", "stepz=3"),
         ("bad parameters for attack 'pgd'",)),
    Case("n-examples-zero", (*TINY, "--attack", "none", "--n-examples", "0"), ("--n-examples must be >= 1",)),
    Case("n-examples-not-a-number", (*TINY, "--n-examples", "abc"), ("--n-examples", "invalid int value")),
    Case("batch-size-zero", (*TINY_SYN, "--attack", "none", "--batch-size", "0"), ("--batch-size must be >= 1",)),
    Case("threads-zero", (*TINY_SYN, "--threads", "0"), ("--threads", "must be at least 1")),
    Case("unknown-command", ("evaluate",), ("invalid choice: 'evaluate'",)),
    Case("unknown-trainer", ("train", "fast_att", "--out", "{tmp}/run"), ("unknown trainer", "did you mean 'fast_at'")),
    Case("train-set-unknown-key", ("train", "fast_at", "--set", "nosuch=1", "--out", "{tmp}/run"),
         ("unknown key 'nosuch'",)),
    Case("train-set-wrong-type", ("train", "fast_at", "--set", "epochs=abc", "--out", "{tmp}/run"),
         ("epochs", "expected an integer")),
    Case("longtail-ratio-below-one", ("train", "score", "--set", "longtail=exp:0.5", "--out", "{tmp}/run"),
         ("imbalance ratio", "must be >= 1")),
    Case("longtail-unknown-profile", ("train", "score", "--set", "longtail=expo:10", "--out", "{tmp}/run"),
         ("unknown profile 'expo'", "'exp'")),
    Case("score-loss-typo", ("train", "score", "--set", "loss=fll", "--out", "{tmp}/run"),
         ("unknown loss 'fll'", "'fl'")),
    Case("longtail-empties-a-class", ("train", "score", "--set", "dataset=synthetic", "--set", "longtail=exp:1000",
                                      "--out", "{tmp}/run"), ("leaves class 7", "no training image")),
    Case("fedloge-alpha-zero", ("train", "fedloge", "--set", "alpha=0", "--out", "{tmp}/run"),
         ("alpha = 0", "must be > 0")),
    Case("fedloge-beta-one", ("train", "fedloge", "--set", "beta=1.0", "--out", "{tmp}/run"),
         ("beta = 1.0", "[0, 1)")),
    Case("fedloge-more-clients-than-examples", ("train", "fedloge", "--set", "dataset=synthetic", "--set", "n_train=200",
                                                "--set", "longtail=exp:2", "--set", "clients=500", "--out", "{tmp}/run"),
         ("500 clients", "training examples")),
    Case("fedloge-client-without-data", ("train", "fedloge", "--set", "dataset=synthetic", "--set", "n_train=200",
                                         "--set", "longtail=exp:2", "--set", "clients=60", "--set", "alpha=0.01",
                                         "--out", "{tmp}/run"), ("gets no training image", "alpha 0.01")),
    Case("fedloge-features-below-classes", ("train", "fedloge", "--set", "dataset=synthetic", "--set", "width=2",
                                            "--out", "{tmp}/run"), ("smaller than the class count",)),
]


# --------------------------------------------------------------------------- the property


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its mtime and size (a folder's mtime changes when an entry is
    added or removed, so a temporary file that came and went is seen too)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


def run_case(case: Case, tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> str:
    """Run one case; assert the property; return the error line."""
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)  # a default output path would land here, and be seen
    monkeypatch.setenv("ROBUSTKIT_DATA", str(work / "default-data"))
    monkeypatch.delenv("ROBUSTKIT_PLUGINS", raising=False)
    ctx = Ctx(work, ckpt, monkeypatch)
    if case.setup is not None:
        case.setup(ctx)
    before = snapshot(work)
    argv = [a.replace("{tmp}", str(work)).replace("{ckpt}", str(ckpt)) for a in case.argv]
    capsys.readouterr()
    ctx.deny()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors exit through SystemExit
        code = e.code
    finally:
        monkeypatch.undo()  # the file system refuses nothing any more
        ctx.undeny()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == case.code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("robustkit: error: "), err
    line = lines[0]
    for needle in case.needles:
        assert needle.replace("{tmp}", str(work)) in line, line
    for word in case.forbidden:
        assert word.lower() not in line.lower(), line
    assert snapshot(work) == before, "the failed command changed or left files behind"
    assert not [p for p in work.rglob("*") if ".tmp" in p.name], list(work.rglob("*"))
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_user_error_is_one_line_and_exit_2(case, tmp_path, tiny_checkpoint, monkeypatch, capsys, one_thread):
    run_case(case, tmp_path, tiny_checkpoint, monkeypatch, capsys)


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- beyond the table


def test_valid_scientific_eps_is_evaluated(tmp_path, tiny_checkpoint, capsys, one_thread):
    """1e-3 was refused as malformed; it is a valid budget."""
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_checkpoint), "--dataset", "synthetic", "--attack", "pgd",
                 "--attack-arg", "steps=1", "--eps", "1e-3", "--n-examples", "4", "--device", "cpu",
                 "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["eps"] == pytest.approx(1e-3, rel=1e-15)


def test_state_dict_mismatch_is_summarised_whole(tmp_path, tiny_checkpoint, monkeypatch, capsys, one_thread):
    """The message used to stop after torch's first line ("Error(s) in loading state_dict for ..."):
    now it counts every kind of mismatch and names the first keys of each."""
    case = next(c for c in CASES if c.id == "state-dict-mismatch")
    line = run_case(case, tmp_path, tiny_checkpoint, monkeypatch, capsys)
    assert "shape mismatch" in line or "unexpected key(s)" in line
    assert "Error(s) in loading state_dict" not in line and "and " in line  # counts beyond the names shown


def test_import_of_the_cli_does_not_import_torch():
    """Ctrl-C during start-up is one line only if main's handler is in place before torch loads
    (seconds): importing robustkit.cli must not import it."""
    code = "import sys, robustkit.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_real_process_prints_no_traceback(tmp_path):
    """A real terminal sees one line for both kinds of failure: a user error (exit 2) and a Ctrl-C
    that arrives (as a real SIGINT) while the command is still starting up (exit 130)."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "ROBUSTKIT_DATA": str(tmp_path / "data")}
    (tmp_path / "x.npz").write_text("not numpy\n")
    bad = subprocess.run([sys.executable, "-m", "robustkit", "eval", "--model", "small_cnn", "--attack", "none",
                          "--data-file", str(tmp_path / "x.npz"), "--device", "cpu", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("robustkit: error: ") and "a text file" in bad.stderr, bad.stderr

    (tmp_path / "sigint_plugin.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    env["ROBUSTKIT_PLUGINS"] = "sigint_plugin"
    # A job started in the background by a non-interactive shell (as CI may start this suite) inherits an
    # ignored SIGINT, and Python then keeps ignoring it: give the child the default disposition, as a terminal does.
    ctrl_c = subprocess.run([sys.executable, "-m", "robustkit", "list", "models"], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert ctrl_c.returncode == 130, ctrl_c.stderr
    assert ctrl_c.stderr.startswith("robustkit: error: interrupted") and ctrl_c.stderr.count("\n") == 1, ctrl_c.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.records.jsonl").exists()
