"""airbench (robustkit.models.airbench, robustkit.train.airbench): every mechanism of the paper, checked on
CPU at tiny widths.

Nothing here asserts airbench's 94%: that is a distributional claim over full CIFAR-10 on a GPU
(`python eval/benchmarks/airbench.py`). These tests pin the algorithm: whitening, alternating flip,
lookahead, TTA, the decoupled optimizer arithmetic, freezing, the variants, the registered trainer, its
shipped recipe and the checkpoints.
"""

from __future__ import annotations

import itertools
import json
import sys
import tomllib
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import robustkit.models.airbench as abm
import robustkit.train.airbench as ab
from robustkit.cli import main as cli_main
from robustkit.core.checkpoint import save_checkpoint
from robustkit.core.config import config_to_dict, read_recipe, resolve_config
from robustkit.core.errors import CheckpointError, ConfigError, InputRangeError
from robustkit.data import load_split
from robustkit.models import create_model, load_model
from robustkit.models.airbench import AirbenchNet, arch_args_for, init_whitening, tta_logits
from robustkit.train.airbench import (
    AIRBENCH94,
    SMOKE,
    Airbench95Config,
    Airbench96Config,
    AirbenchConfig,
    Loader,
    Lookahead,
    decoupled_sgd_params,
    lookahead_decay,
    lr_multiplier,
)
from robustkit.train.base import RunOptions, get_trainer

TINY = replace(AIRBENCH94, widths=(8, 16, 16), batch_size=64)


@pytest.fixture(scope="module")
def synth() -> tuple[torch.Tensor, torch.Tensor]:
    return load_split("synthetic", "train").tensors(384)


# Tiny models on a shared CPU: extra OpenMP threads only wait on each other (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **kw) -> AirbenchNet:
    torch.manual_seed(seed)
    return AirbenchNet(**{**arch_args_for(TINY), **kw})


# ------------------------------------------------------------------ whitening


def test_whitening_decorrelates_patches(synth):
    x = synth[0][:200]
    model = tiny_model()
    init_whitening(model, x)
    w = model.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad
    assert torch.equal(w[12:], -w[:12])  # the negatives complete the set
    xn = model.normalize(x).double()
    patches = F.unfold(xn, 2).transpose(1, 2).reshape(-1, 12)
    eig = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    out = F.conv2d(xn, w.double()).permute(0, 2, 3, 1).reshape(-1, 24)
    cov = out.T @ out / len(out)  # uncentered, like the patch covariance it whitens
    # exactly diag(l / (l + eps)): identity up to the 5e-4 regulariser
    assert torch.allclose(cov[:12, :12], torch.diag(eig / (eig + 5e-4)), atol=2e-4)
    assert torch.allclose(cov[:12, :12], torch.eye(12, dtype=cov.dtype), atol=0.05)
    assert torch.allclose(cov[12:, 12:], cov[:12, :12]) and torch.allclose(cov[:12, 12:], -cov[:12, :12])


# ------------------------------------------------------------------ data: alternating flip, translate


def test_flip_alternates_every_epoch_for_every_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=gen)  # random images: never mirror-symmetric
    y = torch.arange(64)
    loader = Loader(x, y, batch_size=16, translate=0, gen=torch.Generator().manual_seed(1))
    e = [loader.epoch_images(k) for k in range(4)]
    flipped = torch.tensor([torch.equal(e[0][i], x[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(e[0][i], x[i]) for i in range(64)])
    assert torch.all(flipped ^ kept)  # every image is either mirrored or not at epoch 0 ...
    assert 10 < int(flipped.sum()) < 54  # ... at random
    for k in (1, 3):  # odd epochs mirror every image, including those left unflipped at epoch 0
        assert torch.equal(e[k], e[0].flip(-1))
    assert torch.equal(e[2], e[0])
    # batches: a fresh permutation, the last partial batch dropped
    loader_odd = Loader(x[:60], y[:60], batch_size=16, translate=0, gen=torch.Generator().manual_seed(2))
    batches = list(loader_odd.batches(0))
    assert len(batches) == 3 and all(len(b[1]) == 16 for b in batches)
    assert len(set(torch.cat([b[1] for b in batches]).tolist())) == 48


def test_translate_crops_a_window_of_the_padded_pre_flipped_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=gen)
    loader = Loader(x, torch.zeros(32, dtype=torch.long), batch_size=8, translate=2,
                    gen=torch.Generator().manual_seed(3))
    offsets = set()
    for epoch in range(3):
        imgs = loader.epoch_images(epoch)
        base = loader._base if epoch % 2 == 0 else loader._base.flip(-1)  # type: ignore[union-attr]
        assert base.shape[-1] == 12 and imgs.shape == x.shape
        for i in range(len(x)):
            hits = [(dy, dx) for dy, dx in itertools.product(range(5), repeat=2)
                    if torch.equal(imgs[i], base[i, :, dy : dy + 8, dx : dx + 8])]
            assert hits, f"epoch {epoch} image {i} is not a window of its padded image"
            offsets.add(hits[0])
    assert len(offsets) > 10  # redrawn per image and epoch, all 25 offsets possible


def test_cutout_fills_a_square_with_the_mean():
    x = torch.rand(16, 3, 32, 32)
    fill = torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1)
    loader = Loader(x, torch.zeros(16, dtype=torch.long), batch_size=8, flip="none", translate=0, cutout=12,
                    fill=fill, gen=torch.Generator().manual_seed(0))
    out = loader.epoch_images(0)
    changed = (out != x).any(1)  # n, h, w
    for i in range(16):
        rows, cols = changed[i].nonzero(as_tuple=True)
        assert rows.max() - rows.min() == 11 and cols.max() - cols.min() == 11  # a 12x12 square
        assert torch.equal(out[i, :, rows[0], cols[0]], fill.flatten())


# ------------------------------------------------------------------ schedules and optimizer arithmetic


def test_decoupled_lr_and_weight_decay_arithmetic():
    p = decoupled_sgd_params(AIRBENCH94)
    assert p["lr"] == pytest.approx(1.465e-3, abs=1e-6)  # 11.5 / (1024 * (1 + 1 / 0.15))
    assert p["lr_bn_bias"] == pytest.approx(64 * p["lr"])
    assert p["decay_per_step"] == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)))
    # torch applies lr * weight_decay: the same absolute decay in both groups, independent of lr
    assert p["lr"] * p["weight_decay"] == pytest.approx(p["decay_per_step"])
    assert p["lr_bn_bias"] * p["weight_decay_bn_bias"] == pytest.approx(p["decay_per_step"])
    assert decoupled_sgd_params(replace(AIRBENCH94, lr=5.0))["decay_per_step"] == pytest.approx(p["decay_per_step"])
    # a quarter of the batch: same lr per example (the loss is summed), a quarter of the decay per step
    q = decoupled_sgd_params(replace(AIRBENCH94, batch_size=256))
    assert q["lr"] == p["lr"] and q["decay_per_step"] == pytest.approx(p["decay_per_step"] / 4)


def test_lr_schedule_and_lookahead_decay_values():
    total = 476  # airbench94 on CIFAR-10: ceil(48 * 9.9)
    warm = int(0.23 * total)
    assert lr_multiplier(0, total, AIRBENCH94) == pytest.approx(0.2)
    assert lr_multiplier(warm, total, AIRBENCH94) == pytest.approx(1.0)
    assert lr_multiplier(total, total, AIRBENCH94) == pytest.approx(0.07)
    assert lr_multiplier(warm // 2, total, AIRBENCH94) == pytest.approx(0.2 + 0.8 * (warm // 2) / warm)
    assert lookahead_decay(total, total) == pytest.approx(0.95**5)  # ~0.774 at the end
    assert lookahead_decay(total // 2, total) == pytest.approx(0.95**5 * (238 / 476) ** 3)
    assert lookahead_decay(5, total) < 1e-6  # the EMA just follows the net early on


def test_lookahead_update_moves_weights_and_bn_buffers():
    model = tiny_model()
    model.train()
    model.logits(torch.rand(8, 3, 32, 32))  # non-trivial BN running statistics
    la = Lookahead(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v))
            else:
                v.add_(7)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    la.update(0.3)
    after = model.state_dict()
    for k, v in after.items():
        if v.is_floating_point():  # weights, BN running mean/var, Normalize buffers alike
            assert torch.allclose(v, 0.3 * before[k] + 0.7 * moved[k], atol=1e-6), k
        else:  # integer buffers (BN batch counters) are not averaged
            assert torch.equal(v, moved[k]), k
    assert any("running_var" in k for k in after)
    ema = {k: v.clone() for k, v in after.items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    la.update(1.0)  # the final step: live net reset to the EMA, which is unchanged
    assert torch.equal(model.head.weight, ema["head.weight"])


# ------------------------------------------------------------------ TTA


def _spy(model: AirbenchNet) -> list[torch.Tensor]:
    calls: list[torch.Tensor] = []
    core = model.logits

    def counted(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.detach().clone())
        return core(z)

    model.logits = counted  # type: ignore[method-assign]
    return calls


def test_tta_levels_pass_counts_and_weights():
    model = tiny_model().eval()
    x = torch.rand(5, 3, 32, 32)
    core = model.logits
    calls = _spy(model)
    with torch.no_grad():
        out2 = tta_logits(model, x, 2)
        assert len(calls) == 6  # 6 forward passes of the core net
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [x, x.flip(-1), padded[..., :32, :32], padded[..., :32, :32].flip(-1),
                 padded[..., 2:, 2:], padded[..., 2:, 2:].flip(-1)]
        assert all(any(torch.equal(c, v) for c in calls) for v in views)
        assert torch.equal(views[2][..., 1:, 1:], x[..., :-1, :-1])  # a 1-px shift, as intended
        lg = [core(v) for v in views]
        manual = 0.25 * (lg[0] + lg[1]) + 0.125 * (lg[2] + lg[3] + lg[4] + lg[5])
        assert torch.allclose(out2, manual, atol=1e-6)
        calls.clear()
        out1 = tta_logits(model, x, 1)
        assert len(calls) == 2 and torch.allclose(out1, 0.5 * (core(x) + core(x.flip(-1))), atol=1e-6)
        calls.clear()
        assert torch.equal(tta_logits(model, x, 0), core(x)) and len(calls) == 1
        calls.clear()
        assert torch.allclose(model(x), out2) and len(calls) == 6  # forward uses model.tta_level (2)
    # deterministic and differentiable: an ensemble, not obfuscation
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).logsumexp(1).sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ConfigError):
        tta_logits(model, x, 3)


# ------------------------------------------------------------------ training


def test_short_training_run_learns_and_freezes(synth, monkeypatch):
    x, y = synth[0][:256], synth[1][:256]
    xt, yt = load_split("synthetic", "test").tensors(32)
    # lookahead off here: with it on, the first EMA update after the freeze still moves the bias once
    # (towards its last trained value, as in the reference); the optimizer itself must not touch it
    hp = replace(TINY, epochs=3, whiten_bias_epochs=1, lookahead=False)
    model = tiny_model(seed=1)
    at_epoch_start: dict[int, torch.Tensor] = {}
    batches = Loader.batches

    def spy(self, epoch):
        at_epoch_start[epoch] = model.whiten.bias.detach().clone()
        yield from batches(self, epoch)

    monkeypatch.setattr(Loader, "batches", spy)

    def loss_on(xs, ys):
        with torch.no_grad():
            return F.cross_entropy(model.eval().logits(xs), ys).item()

    loss0 = loss_on(x, y)
    res = ab.fit(model, x, y, xt, yt, hp, progress=False)
    assert res["total_steps"] == 3 * (256 // 64) and res["steps_per_epoch"] == 4
    assert loss_on(x, y) < loss0 - 0.05  # learns
    assert res["final_eval_acc"] is not None
    assert [r["name"] for r in res["regions"]] == ["whitening init", "epoch 1", "epoch 2", "epoch 3", "tta2 eval"]
    assert res["timed_seconds"] == pytest.approx(sum(r["seconds"] for r in res["regions"]))
    # whitening bias: trained in epoch 1, untouched from the start of epoch 2 to the end
    assert not torch.equal(at_epoch_start[0], at_epoch_start[1])
    assert torch.equal(at_epoch_start[1], model.whiten.bias) and torch.equal(at_epoch_start[2], model.whiten.bias)
    # BatchNorm scales never move from 1; only the shifts learn
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6
    for bn in bns:
        assert not bn.weight.requires_grad and torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert bn.bias.abs().sum() > 0 and bn.eps == 1e-12 and bn.momentum == pytest.approx(0.4)


def test_float16_on_cpu_is_refused(synth):
    x, y = synth
    with pytest.raises(ConfigError, match="float16 training needs CUDA"):
        ab.fit(tiny_model(), x, y, hp=replace(TINY, dtype="float16"), device="cpu", progress=False)
    with pytest.raises(InputRangeError):
        ab.fit(tiny_model(), x * 2 - 1, y, hp=TINY, progress=False)  # not [0, 1] pixels


# ------------------------------------------------------------------ variants


def test_variants_differ_only_where_the_paper_says():
    base = asdict(AIRBENCH94)
    assert base["epochs"] == 9.9 and base["batch_size"] == 1024 and base["lr"] == 11.5
    assert base["momentum"] == 0.85 and base["weight_decay"] == 0.0153 and base["bias_scaler"] == 64
    assert base["label_smoothing"] == 0.2 and base["whiten_bias_epochs"] == 3 and base["tta_level"] == 2
    assert base["flip"] == "alternating" and base["translate"] == 2 and base["cutout"] == 0
    assert (base["warmup_frac"], base["lr_start"], base["lr_peak"], base["lr_end"]) == (0.23, 0.2, 1.0, 0.07)
    assert base["scaling"] == pytest.approx(1 / 9) and base["bn_momentum"] == pytest.approx(0.4)

    def diff(config: AirbenchConfig) -> dict:
        return {k: v for k, v in asdict(config).items() if v != base[k]}

    assert diff(Airbench95Config()) == {"widths": (128, 384, 384), "epochs": 15.0, "lr": 10.0}
    assert diff(Airbench96Config()) == {"widths": (128, 512, 512), "depth": 3, "epochs": 40.0, "lr": 9.0,
                                        "translate": 4, "cutout": 12}
    # each registered trainer takes its variant's config; the network it trains is the registered architecture's
    for name, cls in (("airbench94", AirbenchConfig), ("airbench95", Airbench95Config),
                      ("airbench96", Airbench96Config)):
        assert get_trainer(name).config is cls and cls.variant == name
        net = asdict(abm.NETWORKS[name])
        assert {k: getattr(cls(), k) for k in net} == net
    m96 = create_model("airbench96.init", widths=[8, 16, 16])
    assert hasattr(m96.groups[0], "conv3") and not hasattr(create_model("airbench95.init", widths=[8, 16, 16]).groups[0],
                                                            "conv3")


# ------------------------------------------------------------------ checkpoints and the CLI


def test_checkpoint_round_trip(tmp_path):
    model = create_model("airbench94.init", widths=[8, 16, 16], seed=3)
    assert model.tta_level == 2 and model.groups[0].conv1.out_channels == 8
    args = arch_args_for(TINY)
    save_checkpoint(model, tmp_path / "ab", architecture="airbench94", arch_args=args,
                    normalization={"mean": args["mean"], "std": args["std"]}, dataset="cifar10", num_classes=10)
    loaded = load_model(str(tmp_path / "ab.safetensors"))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.checkpoint_sha256 == json.loads((tmp_path / "ab.json").read_text())["sha256"]


def test_train_cli_saves_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    tiny = ["--set", "n_train=256", "--set", "n_test=64", "--set", "widths=[8, 16, 16]", "--set", "batch_size=64"]
    assert cli_main(["train", "airbench94", "--dataset", "synthetic", *tiny, "--set", "epochs=1.5", "--threads", "1",
                     "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["architecture"] == "airbench94" and meta["arch_args"]["widths"] == [8, 16, 16]
    # the resolved config is recorded, with the dtype "auto" resolved to what ran
    want = replace(TINY, dataset="synthetic", n_train=256, n_test=64, epochs=1.5, dtype="float32")
    assert meta["trainer"] == "airbench94" and meta["config"] == config_to_dict(want)
    tr = meta["training"]
    assert tr["total_steps"] == 6 and tr["steps_per_epoch"] == 4 and tr["data"]["train_indices"] == "0-255"
    assert tr["threads"] == 1 and tr["dtype"] == "float32" and tr["compile"] is None
    m = meta["metrics"]
    assert m["n"] == 64 and m["clean_acc"] == m["clean_acc_tta2"]
    loaded = load_model(str(out) + ".safetensors")
    x, y = load_split("synthetic", "test").tensors(64)
    for level in (0, 2):  # what was measured is what loads (CPU fp32 is deterministic)
        assert ab.evaluate(loaded.model, x, y, level) == m[f"clean_acc_tta{level}"]
    assert "TTA0" in capsys.readouterr().out
    # user errors are one line and exit 2: float16 on a CPU, a misspelt field, a holdout too large
    for bad, hint in ((["--set", "dtype=float16"], "float16 training needs CUDA"), (["--set", "widht=3"], "widths"),
                      (["--set", "holdout=256"], "holdout")):
        assert cli_main(["train", "airbench94", "--dataset", "synthetic", *tiny, *bad, "--device", "cpu",
                         "--no-progress", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert hint in err and len(err.strip().splitlines()) == 1


def test_trainer_is_deterministic_and_pinned(tmp_path):
    """Two runs of one config give the same checkpoint, and its numbers are pinned: the values are those
    the pre-move trainer (robustkit.models.airbench.main at d24035c) gave for this config, so a change to
    the loop, the loader's draws, the schedule or the optimizer arithmetic fails here. The tolerance
    only admits another CPU's float32 kernels: lr 11.4 instead of 11.5, lr_end 0.08 instead of 0.07 or
    label smoothing 0.19 instead of 0.2 each move these numbers by 5e-6 to 1e-4 (relative)."""
    config = resolve_config(AirbenchConfig, recipe={**SMOKE, "epochs": 2.0})
    trainer = get_trainer("airbench94")
    a, b = (trainer(config, RunOptions(out=tmp_path / name, progress=False)) for name in ("a", "b"))
    assert a.metadata["sha256"] == b.metadata["sha256"]
    losses = [e["train_loss"] for e in a.metadata["training"]["epochs_log"]]
    assert losses == pytest.approx([2.28517746925354, 2.2631609439849854], rel=2e-6)
    state = load_model(str(a.path)).model.state_dict()
    assert state["head.weight"].double().abs().sum().item() == pytest.approx(18.823176620528102, rel=2e-6)
    assert a.metadata["training"]["total_steps"] == 8 and a.metadata["metrics"]["correct_tta2"] == 3


def test_shipped_recipe_resolves_to_the_recorded_config(capsys):
    """`robustkit train --recipe defenses/airbench94.cifar10_partial.toml` re-creates the exact config of the
    shipped weights, and that config agrees with the training block the run recorded."""
    recipe = Path(__file__).resolve().parents[1] / "defenses" / "airbench94.cifar10_partial.toml"
    meta = json.loads((Path(abm.__file__).parents[1] / "weights" / "airbench94.cifar10_partial.json").read_text())
    recipe_meta, fields = read_recipe(recipe)
    assert recipe_meta["trainer"] == meta["trainer"] == "airbench94"
    assert recipe_meta["name"] == "airbench94.cifar10_partial"
    config = resolve_config(AirbenchConfig, recipe=fields)
    assert meta["config"] == config_to_dict(config)
    tr = meta["training"]
    assert {k: meta["config"][k] for k in tr["recipe"]} == tr["recipe"]
    assert (config.seed, config.dtype, config.dataset, config.holdout) == (tr["seed"], tr["dtype"], "cifar10", 0)
    assert config.n_train is None and tr["data"]["n_train"] == 5438  # all of them
    assert cli_main(["train", "--recipe", str(recipe), "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed == {"trainer": "airbench94", **{k: v for k, v in meta["config"].items() if v is not None}}


def test_unknown_producer_lists_airbench(capsys):
    assert cli_main(["train", "airbench97"]) == 2
    assert "airbench9" in capsys.readouterr().err


def test_shipped_weights_load_verified_with_both_tta_tags(tmp_path):
    full = load_model("airbench94.cifar10_partial")
    fast = load_model("airbench94.cifar10_partial_tta0")
    assert full.checkpoint_sha256 == fast.checkpoint_sha256 == full.metadata["sha256"]
    # one file, one pin; the tta0 tag's override is the registry's own, so its function pin differs
    assert full.function_sha256 == abm.AIRBENCH94_CIFAR10_PARTIAL_PIN != fast.function_sha256
    assert full.model.tta_level == 2 and fast.model.tta_level == 0  # one file, two arch_args
    assert create_model("airbench94").tta_level == 2  # the default tag is the card's headline
    for a, b in zip(full.model.state_dict().values(), fast.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    m = full.metadata["metrics"]
    assert m["n"] == 1017 and m["clean_acc"] == m["clean_acc_tta2"]
    # a tampered file is refused by the pinned sha256
    src = abm.__file__.rsplit("/models/", 1)[0] + "/weights/airbench94.cifar10_partial"
    for suffix in (".safetensors", ".json"):
        (tmp_path / ("w" + suffix)).write_bytes(open(src + suffix, "rb").read())
    data = bytearray((tmp_path / "w.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "w.safetensors").write_bytes(bytes(data))
    from robustkit.models.base import load_checkpoint_model

    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint_model(tmp_path / "w", expected_pin=abm.AIRBENCH94_CIFAR10_PARTIAL_PIN)


def test_shipped_weights_reproduce_their_recorded_accuracy(real_data_dir):
    loaded = load_model("airbench94.cifar10_partial_tta0")
    x, y = load_split("cifar10", "test", data_dir=real_data_dir).tensors(200)
    correct = round(ab.evaluate(loaded.model, x, y, 0) * 200)
    assert correct == loaded.metadata["metrics"]["correct_first200_tta0"]


# ------------------------------------------------------------------ the GPU benchmark's harness, on CPU


def _bench_airbench(argv):
    """The developer benchmark is a script in the repository, not part of the package: load it by path."""
    import importlib.util

    from robustkit.core.errors import RobustkitError

    path = Path(__file__).resolve().parents[1] / "eval" / "benchmarks" / "airbench.py"
    spec = importlib.util.spec_from_file_location("bench_airbench_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(argv)
    except RobustkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def test_bench_airbench_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _bench_airbench(["--allow-cpu", "--device", "cpu", "--dataset", "synthetic",
                     "--n-train", "128", "--n-test", "32", "--test-copies", "2", "--epochs", "1",
                     "--batch-size", "64", "--widths", "8,16,16", "--runs", "2", "--no-warmup", "--threads", "1",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    ours = report["ours"]
    assert len(ours["runs"]) == 2 and ours["seconds"]["mean"] > 0 and 0 <= ours["tta_acc"]["mean"] <= 1
    assert set(ours["runs"][0]["regions"]) == {"whitening init", "epoch 1", "tta2 eval"}
    assert ours["overrides"] == {"epochs": 1.0, "batch_size": 64, "widths": [8, 16, 16]}
    assert report["data"]["n_train"] == 128 and report["data"]["n_test"] == 64
    assert "reference" not in report and report["command"].startswith("python eval/benchmarks/airbench.py")
    assert "Not the airbench94 schedule" in (tmp_path / "bench.md").read_text()


def test_bench_airbench_refuses_cpu_without_flag(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _bench_airbench(["--device", "cpu"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert _bench_airbench(["--allow-cpu", "--reference", "x.py"]) == 2
