"""Set-based representation losses of SCoRe (Majee et al., ICML 2024) and the SupCon baselines.

A batch of ``B`` images seen in ``V`` views gives ``N = B * V`` anchors, partitioned by label into
class sets ``A_1 .. A_C``. SCoRe scores that partition with a submodular set function ``f`` of a
similarity kernel ``S`` in two forms (``LossSpec.form``):

* ``"c"``, total correlation ``C_f = sum_k f(A_k) - f(V)``: what the class sets share, i.e. the
  inter-class bias a classifier has to undo;
* ``"s"``, total information ``S_f = sum_k f(A_k)``: what the class sets hold, which for some ``f``
  also rewards compact classes.

Only Graph Cut and Log-Det differ between the forms (Facility Location's coincide, see
:func:`representation_loss`). Every loss is normalised by ``N`` (or is a mean over anchors), so its
value does not grow with the batch, and is a tensor computation over ``[N, N]`` matrices: no Python
loop over classes or anchors, so it runs at the speed of the matmuls on any device and dtype.

The hard set functions :func:`facility_location`, :func:`graph_cut` and :func:`log_det` are exposed
on their own because they are what the tests compare with an independent implementation
(``submodlib``); the training losses are written in closed forms that are proved equal to them
(Graph Cut, Log-Det) or are their documented smooth relaxation (Facility Location).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.core.errors import ConfigError, close_matches_hint

__all__ = [
    "FORMS", "KERNELS", "LOSSES", "LossSpec", "facility_location", "graph_cut", "log_det",
    "representation_loss", "similarity_kernel",
]

KERNELS = ("cosine", "rbf", "euclidean")
LOSSES = ("supcon", "submod_supcon", "fl", "gc", "gc_ratio", "logdet")  # "ce" belongs to the trainer
FORMS = ("c", "s")  # total correlation C_f (default) / total information S_f


def _choice(kind: str, value: object, known: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in known:
        hint = close_matches_hint(value, known) if isinstance(value, str) else ""
        raise ConfigError(f"unknown {kind} {value!r}{hint}; choose {', '.join(known)}")
    return value


def _number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r}: must be a finite number")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} = {value}: must be {'> 0' if positive else '>= 0'}")
    return float(value)


# --------------------------------------------------------------------------------------- kernels
def _gram(z: Tensor) -> tuple[Tensor, Tensor]:
    """L2-normalise (every kernel compares directions, as SCoRe's projections are normalised) and
    return the normalised features with their Gram matrix of cosines."""
    zh = F.normalize(z, dim=-1)
    return zh, zh @ zh.transpose(-1, -2)


def _sq_dist(zh: Tensor, cos: Tensor) -> Tensor:
    """|zh_i - zh_j|^2 from norms and the Gram matrix: unlike cdist, its gradient stays finite at
    distance 0 (duplicate views), and it is exact for zero vectors too."""
    sq = (zh * zh).sum(-1)
    return (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * cos).clamp_min(0)


def similarity_kernel(z: Tensor, kernel: str = "cosine", width: float = 1.0) -> Tensor:
    """Pairwise similarities ``S [..., N, N]`` of features ``z [..., N, D]``, on L2-normalised rows.

    * ``cosine``: ``S_ij = z_i.z_j / (|z_i| |z_j|)`` in [-1, 1]; PSD (a Gram matrix), may be negative.
    * ``rbf``: ``exp(-|zh_i - zh_j|^2 / (2 width^2))`` in (0, 1]; PSD, strictly positive, ``width``
      sets how fast similarity decays (on the unit sphere distances are at most 2).
    * ``euclidean`` (the paper's "normalised Euclidean"): ``1 - |zh_i - zh_j|^2 / 4 = (1 + cos) / 2``
      in [0, 1]; PSD (half a constant plus half a Gram matrix) and non-negative, which Graph Cut's
      and Facility Location's classical theory assumes. Computed as ``(1 + cos) / 2``.
    """
    _choice("kernel", kernel, KERNELS)
    width = _number("kernel_width", width, positive=True)
    zh, cos = _gram(z)
    if kernel == "cosine":
        return cos
    if kernel == "euclidean":
        return (1 + cos) / 2
    return torch.exp(-_sq_dist(zh, cos) / (2 * width * width))


def _log_positive_kernel(z: Tensor, kernel: str, width: float) -> Tensor:
    """``log S`` for the positive kernels, exact for rbf (no exp underflow to log 0 at small widths)."""
    zh, cos = _gram(z)
    if kernel == "rbf":
        return -_sq_dist(zh, cos) / (2 * width * width)
    return torch.log(((1 + cos) / 2).clamp_min(torch.finfo(cos.dtype).tiny))


# --------------------------------------------------------------------------- hard set functions
def _check_set_args(S: Tensor, members: Tensor) -> None:
    if S.dim() < 2 or S.shape[-1] != S.shape[-2]:
        raise ConfigError(f"S has shape {tuple(S.shape)}: must be a square [..., N, N] kernel")
    if members.dtype != torch.bool or members.dim() < 1 or members.shape[-1] != S.shape[-1]:
        raise ConfigError(f"members must be a bool [..., {S.shape[-1]}] mask of sets, "
                          f"got {members.dtype} {tuple(members.shape)}")


def facility_location(S: Tensor, members: Tensor) -> Tensor:
    """``f(A) = sum_{i in V} max_{j in A} S_ij`` for each mask in ``members [..., N]`` (empty A -> 0).

    How well the set A "covers" every element. submodlib clips each max at 0 (it assumes a
    non-negative kernel); this does not, so they agree on non-negative kernels (rbf, euclidean).
    """
    _check_set_args(S, members)
    cols = members.unsqueeze(-2)  # [..., 1, N]: j ranges over A
    best = S.masked_fill(~cols, float("-inf")).amax(-1)  # [..., N] over i
    return torch.where(members.any(-1, keepdim=True), best, torch.zeros_like(best)).sum(-1)


def graph_cut(S: Tensor, members: Tensor, lam: float) -> Tensor:
    """``f(A) = sum_{i in V} sum_{j in A} S_ij - lam sum_{i,j in A} S_ij`` for each mask (empty -> 0).

    The first term is A's total similarity to the ground set (representation), the second its
    internal similarity (diversity); submodular for ``lam >= 0`` on non-negative kernels.
    """
    _check_set_args(S, members)
    lam = _number("lam", lam, positive=False)
    m = members.to(S.dtype)
    to_all = (S.sum(-2) * m).sum(-1)
    inside = torch.einsum("...i,...ij,...j->...", m, S, m)
    return to_all - lam * inside


def _logdet_pd(mat: Tensor, what: str) -> Tensor:
    """log det of symmetric positive definite matrices via Cholesky (half precision upcast: cholesky
    has no half kernels). A failure means ``S`` is not PSD or ``lam`` too small for the precision."""
    work = mat.float() if mat.dtype in (torch.float16, torch.bfloat16) else mat
    chol, info = torch.linalg.cholesky_ex(work)
    if bool((info != 0).any()):
        raise ConfigError(f"log-det: {what} is not positive definite; use a PSD kernel and a larger lam")
    return (2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)).to(mat.dtype)


def log_det(S: Tensor, members: Tensor, lam: float) -> Tensor:
    """``f(A) = log det(S_AA + lam I)`` for each mask in ``members [..., N]`` (empty A -> 0).

    The volume A's elements span: large for diverse sets, small for near-duplicates. Batched without
    gathering per-set submatrices: rows/columns outside A are replaced by the identity's, so the
    matrix is ``S_AA + lam I`` and ``I`` up to a permutation and has the same determinant.
    """
    _check_set_args(S, members)
    lam = _number("lam", lam, positive=False)
    m = members.to(S.dtype)
    inside = m.unsqueeze(-1) * m.unsqueeze(-2)
    mat = S * inside + torch.diag_embed(lam * m + (1 - m))
    return _logdet_pd(mat, "S_AA + lam I")


# ---------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class LossSpec:
    """One representation loss and its hyper-parameters, validated at construction.

    * ``lam`` (default 1.0): Graph Cut's lambda and Log-Det's ridge. Graph Cut's total information
      is ``X + (1 - lam) W`` (X cross-class, W within-class similarity, both over ordered pairs), so
      ``lam = 1`` is the cross term alone, ``lam > 1`` adds a compactness reward and ``lam < 1``
      (the reference code's 0.5) would penalise within-class similarity. As a ridge, 1.0 is safer
      than the reference's 0.5 for classes with more samples than dimensions or duplicate views.
    * ``fl_scale`` t: FL's soft max ``(1/t) log sum exp(t s)`` over-estimates the max by at most
      ``log(n) / t``; the reference's t = 1 over cosines in [-1, 1] is nearly a mean, 10 is a max.
    * ``temperature``: SupCon / Submod-SupCon's temperature, inside the exponent.
    * ``loss_scale``: multiplies the loss. The reference's FL/GC/Log-Det "temperature / 0.07" never
      enters an exponent: it is only this rescale.
    """

    loss: str = "fl"
    form: str = "c"
    kernel: str = "cosine"
    kernel_width: float = 1.0
    lam: float = 1.0
    fl_scale: float = 10.0
    temperature: float = 0.1
    loss_scale: float = 1.0

    def __post_init__(self) -> None:
        _choice("loss", self.loss, LOSSES)
        _choice("form", self.form, FORMS)
        _choice("kernel", self.kernel, KERNELS)
        _number("kernel_width", self.kernel_width, positive=True)
        _number("lam", self.lam, positive=self.loss in ("logdet", "gc_ratio"))
        _number("fl_scale", self.fl_scale, positive=True)
        _number("temperature", self.temperature, positive=True)
        _number("loss_scale", self.loss_scale, positive=True)
        if self.loss == "gc_ratio" and self.kernel == "cosine":
            raise ConfigError("loss 'gc_ratio' takes the log of similarity sums: it needs a positive kernel "
                              "(rbf or euclidean), not cosine")


# -------------------------------------------------------------------------------------- losses
def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over ``valid`` anchors; 0 (still on the graph) when none is valid. Invalid
    rows are selected out with ``where``, never multiplied by 0, so their inf/nan cannot leak."""
    kept = torch.where(valid, values, torch.zeros_like(values))
    return kept.sum() / valid.sum().clamp_min(1).to(values.dtype)


def _lse(logits: Tensor, mask: Tensor, safe: Tensor) -> Tensor:
    """Row-wise log sum exp over ``mask``; rows not ``safe`` (possibly empty) use every entry instead,
    so no row is all -inf (whose softmax gradient would be nan). Those rows must be discarded."""
    mask = mask | ~safe.unsqueeze(-1)
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)


def _supcon(S: Tensor, pos: Tensor, neg: Tensor, eye: Tensor, spec: LossSpec, submodular: bool) -> Tensor:
    """SupCon's L_out: per anchor i with positives P(i),
    ``-(1/|P(i)|) sum_p log(exp(s_ip/T) / sum_{a in D(i)} exp(s_ia/T))`` with D(i) every a != i
    (SupCon) or the negatives only (Submod-SupCon, which makes it submodular), averaged over the
    anchors that have a positive (and, for Submod-SupCon, a negative); 0 when there is none."""
    logits = S / spec.temperature
    valid = pos.any(-1) & neg.any(-1) if submodular else pos.any(-1)
    denominator = neg if submodular else ~eye
    log_prob = logits - _lse(logits, denominator, valid).unsqueeze(-1)
    per_anchor = -torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(-1) / pos.sum(-1).clamp_min(1)
    return _masked_mean(per_anchor, valid)


def _fl(S: Tensor, inv: Tensor, n_classes: int, t: float) -> Tensor:
    """Soft Facility-Location cross term, ``(1/N) sum_i sum_{k != y_i} smax_{j in A_k} s_ij``.

    Per-class soft maxima without a loop: ``exp(t (S - m)) @ onehot`` sums each row's exponentials
    class by class. The shift ``m`` is the row's hard max within the column's class (scatter amax),
    so every class has a term exp(0) = 1 and nothing underflows to log 0 at any t; it is detached
    because the soft max does not depend on it.
    """
    n = S.shape[-1]
    onehot = F.one_hot(inv, n_classes).to(S.dtype)  # [N, C]
    index = inv.unsqueeze(0).expand(n, n)
    class_max = S.detach().new_zeros(n, n_classes).scatter_reduce(
        1, index, S.detach(), reduce="amax", include_self=False)
    shift = class_max.gather(1, index)  # [N, N]: m_i at column j's class
    z = torch.exp(t * (S - shift)) @ onehot  # [N, C], each entry >= 1
    smax = class_max + torch.log(z) / t
    return (smax * (1 - onehot)).sum() / n


def _gc_ratio(features: Tensor, pos: Tensor, neg: Tensor, spec: LossSpec) -> Tensor:
    """The reference code's ratio form of Graph Cut: per anchor ``-log(lam sum_pos s / sum_neg s)``,
    in log space, averaged over anchors with a positive and a negative (others have no ratio)."""
    log_s = _log_positive_kernel(features, spec.kernel, spec.kernel_width)
    valid = pos.any(-1) & neg.any(-1)
    per_anchor = _lse(log_s, neg, valid) - _lse(log_s, pos, valid) - math.log(spec.lam)
    return _masked_mean(per_anchor, valid)


def _check_inputs(features: object, labels: object, spec: object) -> tuple[Tensor, Tensor]:
    if not isinstance(spec, LossSpec):
        raise ConfigError(f"spec must be a LossSpec, got {type(spec).__name__}")
    if not isinstance(features, Tensor) or features.dim() != 3 or not features.is_floating_point():
        what = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ConfigError(f"features must be a float [batch, views, dim] tensor, got {what}")
    b, v, d = features.shape
    if b < 1 or v < 1 or d < 1:
        raise ConfigError(f"features {tuple(features.shape)}: batch, views and dim must be >= 1")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != b:
        what = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ConfigError(f"labels must be a [batch] = [{b}] tensor, got {what}")
    return features.reshape(b * v, d), labels.to(features.device).repeat_interleave(v)


def representation_loss(features: Tensor, labels: Tensor, spec: LossSpec) -> Tensor:
    """The loss ``spec`` of ``features [B, V, D]`` (views of one image share its label ``labels [B]``).

    With ``s`` the kernel on L2-normalised features, ``N = B V`` anchors, the self pair never a
    positive or negative, ``X``/``W`` the cross-/within-class similarity sums over ordered pairs:

    * ``fl``: ``(1/N) sum_i sum_{k != y_i} smax_{j in A_k} s_ij``, the soft (scale ``fl_scale``)
      Facility-Location cross term. Its C_f and S_f coincide: the ``i in A_k`` terms of
      ``sum_k f(A_k)`` are ``max_j s_ij = s_ii``, a constant (1), as is ``f(V) = sum_i s_ii``.
    * ``gc``: form c ``lam X / N = (sum_k f_GC(A_k) - f_GC(V)) / N``; form s
      ``sum_k f_GC(A_k) / N = (X + (1 - lam) W) / N`` (W includes the constant diagonal so that the
      value is exactly the set function's).
    * ``gc_ratio``: the reference code's ratio form, mean of ``-log(lam sum_pos s / sum_neg s)``.
    * ``logdet``: form s ``sum_k logdet(S_{A_k} + lam I) / N``, computed as ``logdet(S * M + lam I)``
      with M the same-label mask (block diagonal up to a permutation); form c subtracts
      ``logdet(S + lam I) / N``, and is >= 0 (Fischer), 0 iff classes are mutually orthogonal.
    * ``supcon`` / ``submod_supcon``: see :func:`_supcon`.

    The result is multiplied by ``loss_scale``. It is finite with a finite gradient on a class with one
    sample, one class in the batch, no positives at all and duplicate views; where a loss has no
    term (no other class, no anchor with a positive) it is a 0 still connected to ``features``.
    """
    z, y = _check_inputs(features, labels, spec)
    n = z.shape[0]
    same = y.unsqueeze(0) == y.unsqueeze(1)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos, neg = same & ~eye, ~same
    if spec.loss == "gc_ratio":
        return spec.loss_scale * _gc_ratio(z, pos, neg, spec)
    S = similarity_kernel(z, spec.kernel, spec.kernel_width)
    if spec.loss in ("supcon", "submod_supcon"):
        loss = _supcon(S, pos, neg, eye, spec, submodular=spec.loss == "submod_supcon")
    elif spec.loss == "fl":
        classes, inv = torch.unique(y, return_inverse=True)
        loss = _fl(S, inv, classes.numel(), spec.fl_scale)
    elif spec.loss == "gc":
        total, within = S.sum(), (S * same).sum()
        loss = (spec.lam * (total - within) if spec.form == "c" else total - spec.lam * within) / n
    else:
        ridge = spec.lam * torch.eye(n, dtype=S.dtype, device=S.device)
        loss = _logdet_pd(S * same + ridge, "S_Ak + lam I")
        if spec.form == "c":
            loss = loss - _logdet_pd(S + ridge, "S_V + lam I")
        loss = loss / n
    return spec.loss_scale * loss
