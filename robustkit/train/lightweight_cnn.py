"""Trainer ``lightweight_cnn``: the two-stage procedure of Isong (2025), "Building Efficient
Lightweight CNN Models" (arXiv 2501.15547), on the models of :mod:`robustkit.models.lightweight_cnn`.

Stage 1, dual-input-output model. Two copies of one small CNN (a "branch") are trained
independently: branch A on the original images, branch B on augmented ones (random rotation, zoom,
translation, brightness; horizontal flip for photos). Together they form ``DualInputOutput``.

Stage 2, transfer learning with progressive unfreezing. The two trained feature extractors are
merged into ``UnifiedModel`` (the shipped model) and fine-tuned by :class:`ProgressiveUnfreezer`:
first the new head alone, then one more block per phase from the last to the first, each phase with
its own learning rate and epochs.

The config's defaults are the MNIST recipe: 98.8-98.9% test accuracy on the 24,680 real training
images in 2.5-3.5 minutes on CPU (seed 0). Other datasets have their own tuned recipe, one per
shipped weight file (the way nanoGPT keeps one config file per dataset)::

    robustkit train lightweight_cnn --recipe defenses/lightweight_cnn.cifar10_partial.toml --out runs/lw

On a CPU shared with other jobs use ``--threads 1``: OpenMP threads waiting on each other made
2 threads ~10x slower than 1 on two busy cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.checkpoint import Checkpoint
from robustkit.core.errors import ConfigError
from robustkit.core.modes import kept_modes
from robustkit.core.provenance import training_run
from robustkit.models.lightweight_cnn import DualInputOutput, LightweightCNN, UnifiedModel, n_params
from robustkit.train._loop import RunningStats, decay_groups, epoch_batches, set_lr
from robustkit.train.base import RunOptions, register_trainer


@dataclass(frozen=True)
class LightweightCNNConfig:
    """The Isong (2025) two-stage recipe. The defaults are the MNIST one; the tuned recipes of the
    other datasets are defenses/lightweight_cnn.<tag>.toml (one per shipped weight file).

    Fashion-MNIST and CIFAR-10 differ in more epochs, dropout, milder or mirrored warps and (CIFAR)
    a wider model, so ``--dataset cifar10`` alone runs the MNIST hyperparameters on CIFAR-10.
    """

    dataset: str = "mnist"
    seed: int = 0  # model init, dropout, data order and augmentation
    n_train: int | None = None  # first N training images (None: all)
    n_test: int | None = None  # first N test images, measured for the log only (None: all)
    # Measure the last N training images instead of the test split and train on the rest: for
    # tuning a recipe without looking at the test split. 0: train on all and log the test split
    # (nothing is selected on it either way).
    holdout: int = 0

    # Architecture of each branch: channels per block, the last one pooled. 8/16/20 and a 12-unit
    # head make the unified MNIST model 14,862 parameters, the paper's count.
    widths: tuple[int, ...] = (8, 16, 20)
    head_hidden: int = 12  # hidden units of the unified model's refinement head
    dropout: float = 0.0  # 7k-parameter branches underfit MNIST; dropout only costs accuracy there

    # Optimisation: AdamW and a one-cycle lr per branch and per phase, stepped per batch.
    batch_size: int = 128
    weight_decay: float = 1e-2  # AdamW (decoupled); conv/linear weights only
    label_smoothing: float = 0.0
    warmup_frac: float = 0.15  # one-cycle: linear up over this fraction of a run's steps, then down
    stage1_epochs: int = 8  # per branch
    stage1_lr: float = 5e-3  # peak lr of stage 1
    # Stage 2, one phase per entry: phase 0 the head only, phase i the head and the last i blocks.
    # Phase 0 fits a freshly initialised head on frozen features: a high lr is safe and converges
    # in one epoch. Later phases touch earlier (more generic) layers, so they get smaller lrs
    # (discriminative fine-tuning); the longest is the last, where everything trains together.
    phase_epochs: tuple[int, ...] = (1, 1, 1, 2)
    phase_lrs: tuple[float, ...] = (1e-2, 2e-3, 1e-3, 5e-4)
    stage2_aug_prob: float = 0.5  # fraction of stage-2 images augmented: the model sees both views

    # The paper's augmentations (branch B; stage 2 with stage2_aug_prob); 0 switches one off.
    rotation_deg: float = 12.0  # uniform in [-deg, deg]
    zoom: float = 0.1  # scale uniform in [1 - zoom, 1 + zoom]
    translate: float = 0.1  # shift uniform in [-t, t] of the image size, per axis
    brightness: float = 0.2  # pixel values times a factor uniform in [1 - b, 1 + b]
    hflip: bool = False  # mirror half the images (photos: yes; digits: no, a mirrored 3 is no 3)
    # What enters at the borders of a warped image: black for digits, reflection for photos.
    padding_mode: Literal["zeros", "reflection", "border"] = "zeros"

    def __post_init__(self) -> None:
        # Checked here so a bad recipe or --set fails before any data is read.
        n_phases = len(self.widths) + 1
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"widths must be positive channel counts, got {list(self.widths)}")
        if len(self.phase_epochs) != len(self.phase_lrs):
            raise ConfigError(f"phase_epochs {list(self.phase_epochs)} and phase_lrs "
                              f"{list(self.phase_lrs)} need one entry per phase each")
        if not 1 <= len(self.phase_epochs) <= n_phases:
            raise ConfigError(f"{len(self.widths)} blocks allow 1..{n_phases} phases, "
                              f"got {len(self.phase_epochs)}")
        if self.batch_size < 1 or self.holdout < 0:
            raise ConfigError(f"batch_size must be >= 1 and holdout >= 0, got {self.batch_size} and "
                              f"{self.holdout}")


def arch_args_for(config: LightweightCNNConfig) -> dict[str, Any]:
    """``UnifiedModel`` arguments for a config (what the checkpoint stores as ``arch_args``): the
    dataset gives channels, classes and normalisation, the config the sizes."""
    from robustkit.data import dataset_info

    info = dataset_info(config.dataset)
    return {
        "in_channels": int(info.shape[0]), "num_classes": int(info.num_classes),
        "widths": list(config.widths), "head_hidden": config.head_hidden, "dropout": config.dropout,
        "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std],
    }


# --------------------------------------------------------------------------------------------
# Augmentation (branch B's view of the data)
# --------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, cfg: LightweightCNNConfig, gen: torch.Generator) -> torch.Tensor:
    """Random rotation + zoom + translation (one affine warp) and brightness, per image.

    One ``affine_grid``/``grid_sample`` for the whole batch with a different matrix per image:
    torchvision's v2 transforms draw one set of parameters per call, i.e. per batch. Output stays
    in [0, 1] (bilinear interpolation cannot leave it; brightness is clamped).
    """
    n, dev = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, device=dev)

    angle = uniform(-1.0, 1.0) * math.radians(cfg.rotation_deg)
    scale = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    # affine_grid maps output to input coordinates on [-1, 1], so a shift of t image widths is 2t
    # and zooming in by s means sampling a grid shrunk by 1/s.
    tx, ty = uniform(-2 * cfg.translate, 2 * cfg.translate), uniform(-2 * cfg.translate, 2 * cfg.translate)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=cfg.padding_mode, align_corners=False)
    if cfg.brightness:
        out = (out * uniform(1 - cfg.brightness, 1 + cfg.brightness)[:, None, None, None]).clamp(0, 1)
    if cfg.hflip:
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.clamp(0, 1)


# --------------------------------------------------------------------------------------------
# The supervised loop both stages use
# --------------------------------------------------------------------------------------------


def one_cycle(step: int, total: int, lr_max: float, warmup_frac: float) -> float:
    """Linear warm-up to ``lr_max`` over ``warmup_frac`` of the steps, then linear decay towards 0.
    The warm-up matters in stage 2 too: fresh Adam moments with a full lr would jolt the
    pretrained layers in the first steps of each phase."""
    warm = max(1, round(warmup_frac * total))
    if step < warm:
        return lr_max * (step + 1) / warm
    return lr_max * (total - step) / max(1, total - warm)


def fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    weight_decay: float = 1e-2,
    warmup_frac: float = 0.15,
    label_smoothing: float = 0.0,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    gen: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    desc: str = "",
    progress: bool = False,
    verbose: bool = False,
) -> list[dict[str, float]]:
    """Train ``params`` of ``model`` (and only those) with AdamW; return per-epoch logs.

    Parameters not in ``params`` are outside the optimizer, so neither weight decay nor momentum
    can move them even if they had a gradient. ``transform`` (on CPU, with ``gen``) augments each
    batch. ``x`` is float [0, 1] NCHW on the CPU; batches are moved to ``device``. ``verbose``
    prints one line per epoch (what a long run without progress bars needs).
    """
    from tqdm.auto import tqdm

    params = list(params)
    if epochs <= 0 or not params:
        return []
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    dev = torch.device(device)
    opt = torch.optim.AdamW(decay_groups(params, weight_decay), lr=lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    logs: list[dict[str, float]] = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()  # UnifiedModel.train keeps frozen blocks in eval mode
        stats = RunningStats()
        bar = tqdm(epoch_batches(len(x), batch_size, gen), total=steps_per_epoch, leave=False,
                   desc=f"{desc} epoch {epoch + 1}/{epochs}".strip(), disable=not progress, unit="batch")
        for idx in bar:
            xb = x[idx] if transform is None else transform(x[idx], gen)
            xb, yb = xb.to(dev), y[idx].to(dev)
            set_lr(opt, one_cycle(step, total, lr, warmup_frac))
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            stats.add(loss, out, yb)
            bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.acc:.3f}")
        bar.close()
        logs.append({"epoch": epoch + 1, "train_loss": stats.loss, "train_acc": stats.acc,
                     "seconds": round(time.perf_counter() - t0, 2)})
        if verbose:
            print(f"  {desc} epoch {epoch + 1}/{epochs}: loss {stats.loss:.4f}  train acc {stats.acc:.4f}"
                  f"  ({logs[-1]['seconds']:.1f}s)", flush=True)
    return logs


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits in eval mode (the previous mode is restored), on the CPU."""
    with kept_modes(model, False):
        dev = next(model.parameters()).device
        return torch.cat([model(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    return (predict(model, x).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------------
# Stage 1: two branches, trained independently
# --------------------------------------------------------------------------------------------


def _how(run: RunOptions | None) -> dict[str, Any]:
    """``fit``'s device and logging from a run's options (None: on the CPU, silently, as in tests)."""
    return {} if run is None else {"device": run.device, "progress": run.progress, "verbose": run.log}


def train_branch(dual: DualInputOutput, which: str, x: torch.Tensor, y: torch.Tensor,
                 cfg: LightweightCNNConfig = LightweightCNNConfig(), run: RunOptions | None = None,
                 ) -> list[dict[str, float]]:
    """Stage 1 for one branch: ``"a"`` on the original images, ``"b"`` on augmented ones.

    Its own optimizer, its own data order (generator seeded from the seed and the branch), nothing
    of the other branch in the graph: the branches are trained independently, as in the paper.
    """
    if which not in ("a", "b"):
        raise ConfigError(f"branch must be 'a' or 'b', got {which!r}")
    branch = dual.branch_a if which == "a" else dual.branch_b

    def aug(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return augment(xb, cfg, g)

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + (1 if which == "a" else 2))
    return fit(
        branch, list(branch.parameters()), x, y, epochs=cfg.stage1_epochs, lr=cfg.stage1_lr,
        batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, warmup_frac=cfg.warmup_frac,
        label_smoothing=cfg.label_smoothing, transform=None if which == "a" else aug, gen=gen,
        desc=f"stage 1 branch {which.upper()}", **_how(run),
    )


# --------------------------------------------------------------------------------------------
# Stage 2: merge, then progressive unfreezing
# --------------------------------------------------------------------------------------------


class ProgressiveUnfreezer:
    """Freezing schedule of stage 2: phase 0 trains only the head; phase i also trains the last i
    blocks, i.e. blocks unfreeze from the last (most task-specific) to the first (most generic).

    Frozen means: ``requires_grad`` False (no gradient computed), absent from the optimizer that
    :meth:`apply` hands back (weight decay and Adam momentum cannot move it), and its BatchNorm
    layers held in eval mode through ``UnifiedModel.frozen_blocks`` (running stats untouched).
    """

    def __init__(self, model: UnifiedModel) -> None:
        self.model = model

    @property
    def n_blocks(self) -> int:
        return len(self.model.branch_a)

    @property
    def n_phases(self) -> int:
        return self.n_blocks + 1

    @property
    def order(self) -> list[int]:
        """Block indices in unfreezing order: last to first."""
        return list(range(self.n_blocks - 1, -1, -1))

    def trainable_blocks(self, phase: int) -> list[int]:
        if not 0 <= phase < self.n_phases:
            raise ConfigError(f"phase must be in 0..{self.n_phases - 1}, got {phase}")
        return sorted(self.order[:phase])

    def apply(self, phase: int) -> list[nn.Parameter]:
        """Freeze everything but the head and the phase's blocks; return the trainable params."""
        trainable = set(self.trainable_blocks(phase))
        for i, block in enumerate(self.model.blocks):
            block.requires_grad_(i in trainable)
        self.model.head.requires_grad_(True)
        self.model.frozen_blocks = tuple(i for i in range(self.n_blocks) if i not in trainable)
        self.model.train()
        return [p for p in self.model.parameters() if p.requires_grad]

    def release(self) -> None:
        """Everything trainable again and BatchNorm back to normal (the state a user expects)."""
        self.model.requires_grad_(True)
        self.model.frozen_blocks = ()


def run_phase(unfreezer: ProgressiveUnfreezer, phase: int, x: torch.Tensor, y: torch.Tensor,
              cfg: LightweightCNNConfig = LightweightCNNConfig(), run: RunOptions | None = None) -> dict[str, Any]:
    """One stage-2 phase: set the freezing, fine-tune with the phase's lr and epochs."""
    model = unfreezer.model
    lr, epochs = cfg.phase_lrs[phase], cfg.phase_epochs[phase]
    params = unfreezer.apply(phase)

    def mixed(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # Each image is augmented with probability stage2_aug_prob: the merged model fuses a
        # branch trained on plain images with one trained on augmented ones, so it sees both.
        keep = torch.rand(len(xb), generator=g) >= cfg.stage2_aug_prob
        return torch.where(keep[:, None, None, None], xb, augment(xb, cfg, g))

    epochs_log = fit(
        model, params, x, y, epochs=epochs, lr=lr,
        batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, warmup_frac=cfg.warmup_frac,
        label_smoothing=cfg.label_smoothing, transform=mixed if cfg.stage2_aug_prob > 0 else None,
        gen=torch.Generator().manual_seed(cfg.seed * 1000 + 10 + phase), desc=f"stage 2 phase {phase}",
        **_how(run),
    )
    blocks = unfreezer.trainable_blocks(phase)
    return {
        "phase": phase,
        "trainable": ["head"] + [f"block{i}" for i in sorted(blocks, reverse=True)],
        "n_trainable_params": sum(p.numel() for p in params),
        "lr": lr,
        "epochs": epochs,
        "epochs_log": epochs_log,
        "train_loss": epochs_log[-1]["train_loss"] if epochs_log else None,
        "train_acc": epochs_log[-1]["train_acc"] if epochs_log else None,
    }


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """The training images and what the log is measured on (the test split, or a train holdout)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    record: dict[str, Any]  # the checkpoint's training.data block

    @property
    def eval_split(self) -> str:
        return self.record["eval_split"]


def _load_data(cfg: LightweightCNNConfig, run: RunOptions) -> _Data:
    from robustkit.data import load_split

    split = load_split(cfg.dataset, "train", data_dir=run.data_dir, download=run.download)
    x_train, y_train = split.tensors(cfg.n_train)
    if cfg.holdout:
        if not cfg.holdout < len(x_train):
            raise ConfigError(f"holdout must be in 1..{len(x_train) - 1}, got {cfg.holdout}")
        x_eval, y_eval = x_train[-cfg.holdout :], y_train[-cfg.holdout :]
        x_train, y_train = x_train[: -cfg.holdout], y_train[: -cfg.holdout]
    else:
        test = load_split(cfg.dataset, "test", data_dir=run.data_dir, download=run.download)
        x_eval, y_eval = test.tensors(cfg.n_test)
    record = {"dataset": cfg.dataset, "n_train": len(x_train), "holdout": cfg.holdout, "n_eval": len(x_eval),
              "eval_split": f"train[-{cfg.holdout}:]" if cfg.holdout else "test",
              # Which images, without a machine path: sha256 of the first n_train (holdout included).
              "train_fingerprint": split.fingerprint(cfg.n_train)}
    return _Data(x_train, y_train, x_eval, y_eval, record)


def _stage1(dual: DualInputOutput, cfg: LightweightCNNConfig, data: _Data, run: RunOptions) -> dict[str, Any]:
    """Both branches, each alone; their accuracies; the dual model's (summed-logit) accuracy."""
    stage1: dict[str, Any] = {}
    for which in ("a", "b"):
        logs = train_branch(dual, which, data.x_train, data.y_train, cfg, run)
        branch = dual.branch_a if which == "a" else dual.branch_b
        acc = accuracy(branch, data.x_eval, data.y_eval)
        stage1[f"branch_{which}"] = {"data": "original" if which == "a" else "augmented",
                                     "epochs_log": logs, "test_acc": acc}
        print(f"stage 1 branch {which.upper()}: train acc {logs[-1]['train_acc'] if logs else 0:.4f}"
              f"  {data.eval_split} acc {acc:.4f}  ({sum(lg['seconds'] for lg in logs):.0f}s)")
    # The dual model's own prediction: the two halves of its output summed.
    logits = predict(dual.branch_a, data.x_eval) + predict(dual.branch_b, data.x_eval)
    stage1["dual_sum_logits_acc"] = (logits.argmax(1) == data.y_eval).float().mean().item()
    return stage1


def _stage2(model: UnifiedModel, cfg: LightweightCNNConfig, data: _Data, run: RunOptions) -> list[dict[str, Any]]:
    """Progressive unfreezing, one phase per entry of ``phase_epochs``; the per-phase log."""
    unfreezer = ProgressiveUnfreezer(model)
    phases = []
    for phase in range(len(cfg.phase_epochs)):
        log = run_phase(unfreezer, phase, data.x_train, data.y_train, cfg, run)
        log["test_acc"] = accuracy(model, data.x_eval, data.y_eval)
        phases.append(log)
        print(f"stage 2 phase {phase} ({'+'.join(log['trainable'])}, lr {log['lr']:g}, "
              f"{log['epochs']} ep): loss {log['train_loss'] or 0:.4f}  train acc "
              f"{log['train_acc'] or 0:.4f}  {data.eval_split} acc {log['test_acc']:.4f}")
    unfreezer.release()
    return phases


def _metrics(model: UnifiedModel, branch: nn.Module, data: _Data, stage1: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save as st_save

    from robustkit.core.checkpoint import CHECKPOINT_FORMAT

    correct = predict(model, data.x_eval).argmax(1) == data.y_eval
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    file_bytes = len(st_save(state, metadata={"format": CHECKPOINT_FORMAT}))  # = the file written
    return {
        "split": data.eval_split,
        "n": len(data.x_eval),
        "clean_acc": correct.float().mean().item(),
        "clean_correct_first200": int(correct[:200].sum()),
        "branch_a_acc": stage1["branch_a"]["test_acc"],
        "branch_b_acc": stage1["branch_b"]["test_acc"],
        "dual_sum_logits_acc": stage1["dual_sum_logits_acc"],
        "n_parameters": n_params(model),
        "n_parameters_branch": n_params(branch),
        "file_bytes": file_bytes,
        "file_mb": round(file_bytes / 1e6, 3),
        "source": "robustkit.train.lightweight_cnn (eval mode)",
    }


@register_trainer(
    "lightweight_cnn", LightweightCNNConfig,
    description="Isong 2025 lightweight CNN: two branches (plain / augmented images), merged, "
                "progressive unfreezing",
    smoke={"dataset": "synthetic", "n_train": 64, "n_test": 32, "batch_size": 32, "stage1_epochs": 1,
           "phase_epochs": [1, 1], "phase_lrs": [1e-3, 5e-4]},
    deprecated_names=("lightweight-cnn",),
)
def train(config: LightweightCNNConfig, run: RunOptions) -> Checkpoint:
    """Stage 1 (two branches), merge, stage 2 (phases); save the unified model (eval mode).

    The eval split (test, or the ``holdout``) is measured after each branch and phase for the log
    only: nothing is selected on it.
    """
    from robustkit.core.checkpoint import save_checkpoint

    data = _load_data(config, run)
    arch_args = arch_args_for(config)
    branch_args = {k: v for k, v in arch_args.items() if k != "head_hidden"}
    print(f"lightweight_cnn on {config.dataset}: {len(data.x_train)} train / {len(data.x_eval)} "
          f"{data.eval_split} images; torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):  # seeded inits and dropout, caller's RNG untouched
        torch.manual_seed(config.seed)
        dual = DualInputOutput(LightweightCNN(**branch_args), LightweightCNN(**branch_args)).to(run.device)
        stage1 = _stage1(dual, config, data, run)
        # The merge draws the new head's init from the seeded RNG, after stage 1's dropout.
        model = UnifiedModel.from_branches(dual.branch_a, dual.branch_b, config.head_hidden,
                                           config.dropout).to(run.device)
        phases = _stage2(model, config, data, run)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    metrics = _metrics(model, dual.branch_a, data, stage1)
    print(f"unified model: {metrics['n_parameters']:,} parameters, {metrics['file_bytes']:,} bytes; "
          f"{data.eval_split} acc {metrics['clean_acc']:.4f} (branches {metrics['branch_a_acc']:.4f} / "
          f"{metrics['branch_b_acc']:.4f}); {wall:.0f}s")
    training = {
        "paper": "Isong 2025, Building Efficient Lightweight CNN Models, arXiv 2501.15547",
        "procedure": "stage 1: two branches trained independently (A original, B augmented images); "
                     "merge: both extractors in parallel + new head; stage 2: progressive unfreezing "
                     "(phase 0 head only, phase i + last i blocks; frozen BN in eval mode)",
        "optimizer": "AdamW",
        "lr_schedule": "one-cycle triangle per branch and per phase, per step",
        "weight_decay_on": "conv/linear weights only (not BN, not biases)",
        "stage1": {k: v for k, v in stage1.items() if k != "dual_sum_logits_acc"},
        "phases": phases,
        "data": data.record,
        "seed": config.seed,
        **training_run(run.device, wall, cpu),
    }
    return save_checkpoint(
        model, run.out, architecture="lightweight_cnn", arch_args=arch_args,
        normalization={"mean": arch_args["mean"], "std": arch_args["std"]}, dataset=config.dataset,
        num_classes=arch_args["num_classes"], training=training, metrics=metrics,
        trainer="lightweight_cnn", config=config,
    )
