"""Square Attack (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020), Linf and L2, on
per-example randomness.

A score-based random search. Each query changes one square window of every image and keeps the
change if it lowers the margin loss or breaks the example. The window's side follows the paper's
schedule: a fraction ``p`` of the pixels, ``p`` halving at query 10, 50, 200, 500, 1,000, 2,000,
4,000, 6,000 and 8,000 (of 10,000 when ``rescale_schedule`` stretches it over ``n_queries``;
AutoAttack does not).

- Linf: start from vertical stripes of +-eps; a query moves the window to a random corner of the
  eps-cube (one sign per colour channel).
- L2: start from a 5 x 5 grid of +-"meta-patterns" (two opposite stacks of concentric squares
  whose weights fall as 1/distance**2), scaled to norm eps; a query moves the mass of a second
  window, and the budget left over, into the first window as a fresh pattern, and rescales the
  whole perturbation to norm eps.

What differs from the reference implementation (pyautoattack's ``SquareAttack``), on purpose:

- every draw of an example comes from :mod:`~robustkit.attacks.engine.rng` keyed by its seed and
  its own query number, and every example has its own windows, colours and pattern orientation
  (the reference draws one of each for the whole batch), so an example's result does not depend
  on its batch;
- an example leaves the working batch the moment it is misclassified, and the returned query
  counts are forward passes actually made per example: none on a broken one;
- Linf: a colour that would leave the window as it is gets redrawn before the query is spent, as
  the authors' original code does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.engine import rng
from robustkit.core.errors import ConfigError

__all__ = ["LOSSES", "check_square_params", "meta_pattern", "p_schedule", "square_l2", "square_linf",
           "window_side"]

LOSSES = ("margin", "ce")
# Query (of 10,000) after which p halves again.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# rng streams: one per purpose, so draws made at the same counter are independent. A query takes
# all its numbers (window corners, colours, pattern orientation) from one _QUERY draw.
_START, _QUERY, _COLOUR = 0, 1, 2
# A Linf redraw is needed with probability 2**-channels; 32 in a row never happen in practice.
_MAX_REDRAWS = 32

# propose(x, x_best, aux, streams, counter, side) -> candidate images of the working batch.
Proposal = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], rng.Streams, int, int], torch.Tensor]


def check_square_params(n_queries: object, p_init: object, loss: object) -> tuple[int, float, str]:
    """Validated ``(n_queries, p_init, loss)``; a ConfigError names the bad one."""
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
        raise ConfigError(f"n_queries must be an integer >= 1, got {n_queries!r}")
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
        raise ConfigError(f"p_init must be a number in (0, 1], got {p_init!r}")
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    return n_queries, float(p_init), str(loss)


def p_schedule(i: int, n_queries: int, p_init: float, rescale: bool) -> float:
    """Fraction of the image the window covers at iteration ``i`` (0-based, after the first query)."""
    it = int(i / n_queries * 10000) if rescale else i
    return p_init / 2 ** sum(it > t for t in _HALVINGS)


def window_side(p: float, h: int, w: int, norm: str = "Linf") -> int:
    """Side of a square covering a fraction ``p`` of an ``h`` x ``w`` image. Linf: at least 1 and at
    most ``min(h, w) - 1``, so a window always has somewhere to move (the authors' code). L2: odd,
    at least 3 (a pattern needs a centre and two halves), at most ``min(h, w)`` (the reference)."""
    side = int(round(math.sqrt(p * h * w)))
    if norm == "Linf":
        return max(min(side, min(h, w) - 1), 1)
    side = max(side, 3)
    return min(side + 1 - side % 2, min(h, w))


def _objective(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """What the search minimises: the margin ``z_y - max_{j != y} z_j`` (below 0 when broken) or
    minus the cross-entropy."""
    if loss == "ce":
        return -F.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)


def _corner(words: torch.Tensor, side: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners of windows from random words (``[k]``), uniform over
    ``[0, h - side) x [0, w - side)`` (the reference's range; 0 for a full-size window)."""
    span_h, span_w = max(h - side, 1), max(w - side, 1)
    corner = rng.below(words, span_h * span_w)
    return corner // span_w, corner % span_w


def _sign(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """+-1 from the top bit of random words (as :meth:`rng.Streams.signs`)."""
    return 1.0 - 2.0 * (words < 0).to(dtype)


def _mask(top: torch.Tensor, left: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
    """Boolean masks ``[k, 1, h, w]`` of the windows at ``top``, ``left`` (``[k]`` each)."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


# --------------------------------------------------------------------------- the search


def _search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_best: torch.Tensor, streams: rng.Streams,
            aux: tuple[torch.Tensor, ...], propose: Proposal, side_of: Callable[[int], int], *,
            n_queries: int, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The random search shared by both norms, from the start ``x_best``: query, keep improvements,
    drop broken examples from the working batch. ``aux``: per-example tensors the proposal needs,
    compacted with the batch; ``side_of(i)``: the window side at iteration ``i``."""
    logits = model(x_best)
    queries = torch.ones(x.shape[0], dtype=torch.int64, device=x.device)  # counted where the model runs
    alive = (logits.argmax(dim=1) == y).nonzero().squeeze(1)
    # The working batch: only examples not yet broken, compacted whenever one breaks.
    xs, xb, ys, st = x[alive], x_best[alive], y[alive], streams[alive]
    lb = _objective(logits, y, loss)[alive]
    aux = tuple(a[alive] for a in aux)
    for i in range(n_queries):
        if alive.numel() == 0:
            break
        counter = i + 1  # the example's own query number (query 0 was the start)
        x_new = propose(xs, xb, aux, st, counter, side_of(i))
        logits = model(x_new)
        queries[alive] += 1
        value = _objective(logits, ys, loss)
        broken = logits.argmax(dim=1) != ys
        improved = value < lb
        lb = torch.where(improved, value, lb)
        xb = torch.where((improved | broken)[:, None, None, None], x_new, xb)
        if bool(broken.any()):
            x_best[alive[broken]] = xb[broken]
            keep = ~broken
            alive, xs, xb, ys, st, lb = alive[keep], xs[keep], xb[keep], ys[keep], st[keep], lb[keep]
            aux = tuple(a[keep] for a in aux)
    x_best[alive] = xb
    return x_best, queries


def _check(x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or seeds.shape != (x.shape[0],) or y.shape != (x.shape[0],):
        raise ValueError(f"{name} needs x [n, c, h, w], y [n] and seeds [n]; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(seeds.shape)}")
    if min(x.shape[2:]) < 2:
        raise ConfigError(f"Square Attack needs images of at least 2 x 2 pixels, got {tuple(x.shape[2:])}")


# --------------------------------------------------------------------------- Linf


def _recolour(x: torch.Tensor, x_best: torch.Tensor, aux: tuple[torch.Tensor, ...], streams: rng.Streams,
              counter: int, side: int) -> torch.Tensor:
    """``x_best`` with each example's window moved to a corner of the eps-cube (one random sign per
    channel; ``aux``: ``x - eps`` and ``x + eps`` clipped to [0, 1]). Where that changes nothing,
    the colour is redrawn: a query on an unchanged image is a query wasted."""
    low, high = aux
    c, h, w = x.shape[1:]
    words = streams.hash64(counter, 1 + c, stream=_QUERY)  # the corner, then a colour per channel
    window = _mask(*_corner(words[:, 0], side, h, w), side, h, w)

    def paint(rows: torch.Tensor | slice, up: torch.Tensor) -> torch.Tensor:
        return torch.where(window[rows], torch.where(up, high[rows], low[rows]), x_best[rows])

    x_new = paint(slice(None), (words[:, 1:] < 0).view(-1, c, 1, 1))
    same = (x_new == x_best).flatten(1).all(dim=1)
    for redraw in range(1, _MAX_REDRAWS):
        if not bool(same.any()):
            break
        j = same.nonzero().squeeze(1)
        x_new[j] = paint(j, streams[j].hash64(counter, (c, 1, 1), stream=_COLOUR + redraw) < 0)
        same[j] = (x_new[j] == x_best[j]).flatten(1).all(dim=1)
    return x_new


@torch.no_grad()
def square_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seeds: torch.Tensor,
                n_queries: int = 5000, p_init: float = 0.8, loss: str = "margin",
                rescale_schedule: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Square Attack in the Linf ball of radius ``eps`` around images ``x`` (``[n, c, h, w]`` in
    [0, 1]) with labels ``y``.

    ``seeds``: int64, one per example (the harness's ``example_seeds``): an example's result is a
    function of its image, label, seed and the model's logits for it, whatever batch it is in.
    ``n_queries``: iterations after the first query (the start), as in the reference, so an
    example costs at most ``n_queries + 1`` forward passes.

    Returns ``(x_adv, queries)``: per example the first misclassified point found, or the point of
    lowest loss; and the forward passes spent on it (int64).
    """
    n_queries, p_init, loss = check_square_params(n_queries, p_init, loss)
    _check(x, y, seeds, "square_linf")
    n, c, h, w = x.shape
    if n == 0 or eps == 0:
        return x.clone(), torch.zeros(n, dtype=torch.int64, device=x.device)
    streams = rng.Streams(seeds.to(device=x.device))
    stripes = streams.signs(0, (c, 1, w), stream=_START, dtype=x.dtype)
    x_best = (x + eps * stripes).clamp(0.0, 1.0)
    aux = ((x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0))
    return _search(model, x, y, x_best, streams, aux, _recolour,
                   lambda i: window_side(p_schedule(i, n_queries, p_init, rescale_schedule), h, w),
                   n_queries=n_queries, loss=loss)


# --------------------------------------------------------------------------- L2


def _rectangle(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Concentric squares around the centre ``(rows // 2, cols // 2)``: square ``k`` (half-side
    ``k``) adds ``1 / (k + 1)**2``, so a pixel at Chebyshev distance ``d`` holds the sum over
    ``k = d .. K - 1``; unit L2 norm."""
    reach = max(rows // 2, cols // 2) + 1
    i = torch.arange(rows, device=device)[:, None]
    j = torch.arange(cols, device=device)[None, :]
    dist = torch.maximum((i - rows // 2).abs(), (j - cols // 2).abs())
    weights = 1.0 / torch.arange(1, reach + 1, device=device, dtype=torch.float64) ** 2
    tails = weights.flip(0).cumsum(0).flip(0)  # tails[d] = sum of weights[d:]
    pattern = tails[dist]
    return (pattern / pattern.norm().clamp_min(1e-12)).to(dtype)


def meta_pattern(side: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The L2 attack's ``side`` x ``side`` pattern: concentric squares on the top half, their negative
    on the bottom half, unit L2 norm (the paper's eta)."""
    device = torch.device(device)
    half = side // 2
    pattern = torch.cat([_rectangle(half, side, device, torch.float64),
                         -_rectangle(side - half, side, device, torch.float64)])
    return (pattern / pattern.norm().clamp_min(1e-12)).to(dtype)


# A query needs the pattern of its window side: a handful of sides per run, built once each.
_cached_pattern = functools.lru_cache(maxsize=64)(meta_pattern)


def _patterns(words: torch.Tensor, side: int, dtype: torch.dtype) -> torch.Tensor:
    """``[k, m, side, side]``: the meta-pattern, transposed where the word ``[k, m]`` says so
    (probability 1/2 per example and slot; the reference flips once for the whole batch)."""
    base = _cached_pattern(side, words.device, dtype)
    return torch.where((words < 0)[:, :, None, None], base.T, base)


def _l2_start(x: torch.Tensor, streams: rng.Streams, eps: float) -> torch.Tensor:
    """A grid of ``side = h // 5`` blocks, each a pattern with a random sign per channel, scaled to
    norm eps and clipped to [0, 1] (the reference's start)."""
    c, h, w = x.shape[1:]
    side = max(h // 5, 1)
    offset = (h - 5 * side) // 2
    tops = [offset + k * side for k in range(h // side)]
    lefts = [offset + k * side for k in range(w // side)]
    blocks = len(tops) * len(lefts)
    words = streams.hash64(0, blocks * (c + 1), stream=_START)  # colours per block and channel, then flips
    colours = _sign(words[:, :blocks * c], x.dtype).view(-1, blocks, c, 1, 1)
    patterns = _patterns(words[:, blocks * c:], side, x.dtype)
    delta = torch.zeros_like(x)
    for b, (top, left) in enumerate((t, v) for t in tops for v in lefts):
        rows, cols = min(side, h - top), min(side, w - left)
        if rows > 0 and cols > 0:
            delta[:, :, top:top + rows, left:left + cols] += \
                patterns[:, b, None, :rows, :cols] * colours[:, b]
    return (x + eps * _unit(delta)).clamp(0.0, 1.0)


def _unit(delta: torch.Tensor) -> torch.Tensor:
    """``delta`` scaled to unit L2 norm per example (a zero stays zero)."""
    return delta / (delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


def _gather(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: int) -> tuple[torch.Tensor, ...]:
    """Index tensors selecting each example's ``side`` x ``side`` window of ``t`` ([k, c, h, w]):
    ``t[index]`` is ``[k, c, side, side]``, and ``t[index] = v`` writes it back."""
    k, c = t.shape[:2]
    span = torch.arange(side, device=t.device)
    return (torch.arange(k, device=t.device)[:, None, None, None], torch.arange(c, device=t.device)[None, :, None, None],
            (top[:, None] + span)[:, None, :, None], (left[:, None] + span)[:, None, None, :])


def _move_mass(x: torch.Tensor, x_best: torch.Tensor, aux: tuple[torch.Tensor, ...], streams: rng.Streams,
               counter: int, side: int, *, eps: float) -> torch.Tensor:
    """One L2 proposal: window 1 gets a fresh pattern (random sign per channel) added to its old
    content, carrying window 1's and window 2's energy plus the unused budget (per channel);
    window 2 is emptied; the whole perturbation is rescaled to norm eps and clipped to [0, 1]."""
    c, h, w = x.shape[1:]
    delta = x_best - x
    words = streams.hash64(counter, 2 + c + 1, stream=_QUERY)  # two corners, a colour per channel, a flip
    top, left = _corner(words[:, :2], side, h, w)
    first = _gather(delta, top[:, 0], left[:, 0], side)
    old = delta[first]
    old_energy = old.flatten(2).norm(dim=2)[:, :, None, None]
    both = _mask(top[:, 0], left[:, 0], side, h, w) | _mask(top[:, 1], left[:, 1], side, h, w)
    window_energy = (delta * both).flatten(2).norm(dim=2)[:, :, None, None]
    spare = (eps**2 - delta.flatten(1).norm(dim=1) ** 2).clamp_min(0.0).view(-1, 1, 1, 1)
    colour = _sign(words[:, 2:2 + c], x.dtype).view(-1, c, 1, 1)
    new = _patterns(words[:, 2 + c:], side, x.dtype) * colour + old / (old_energy + 1e-12)
    new = new / (new.flatten(2).norm(dim=2)[:, :, None, None] + 1e-12) * (spare / c + window_energy**2).sqrt()
    delta = delta.masked_fill(_mask(top[:, 1], left[:, 1], side, h, w), 0.0)
    delta[first] = new
    return (x + eps * _unit(delta)).clamp(0.0, 1.0)


@torch.no_grad()
def square_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seeds: torch.Tensor,
              n_queries: int = 5000, p_init: float = 0.8, loss: str = "margin",
              rescale_schedule: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Square Attack in the L2 ball of radius ``eps``; arguments and results as :func:`square_linf`."""
    n_queries, p_init, loss = check_square_params(n_queries, p_init, loss)
    _check(x, y, seeds, "square_l2")
    n, c, h, w = x.shape
    if n == 0 or eps == 0:
        return x.clone(), torch.zeros(n, dtype=torch.int64, device=x.device)
    streams = rng.Streams(seeds.to(device=x.device))
    return _search(model, x, y, _l2_start(x, streams, eps), streams, (), functools.partial(_move_mass, eps=eps),
                   lambda i: window_side(p_schedule(i, n_queries, p_init, rescale_schedule), h, w, "L2"),
                   n_queries=n_queries, loss=loss)
