"""A counter-based random number generator, one stream per example, in plain int64 tensor ops.

Every number is a hash of (example seed, counter, stream, element index): nothing is carried from
one draw to the next, so an example's numbers do not depend on which examples share its batch, on
its position there, on the order of the calls, or on the device. An attack passes each example's
own iteration count as ``counter`` and a constant per purpose as ``stream`` (window position,
colours, ...), and gets the same draws at batch size 1 or 10,000. No global RNG or
``torch.Generator`` is touched.

The hash is SplitMix64 (Steele, Lea and Flood, OOPSLA 2014, with Stafford's "variant 13"
finaliser ``mix``). With ``absorb(k, v) = mix(k + (v + 1) * GOLDEN)`` (mod 2**64):

    key     = absorb(absorb(0, seed), counter * 2**16 + stream)
    value_i = mix(key + (i + 1) * GOLDEN)          # the SplitMix64 stream from ``key``

int64 arithmetic wraps like uint64 arithmetic, except that ``>>`` shifts the sign bit in (torch
has no uint64 shifts): every right shift is masked. ``counter`` must lie in [0, 2**47) and
``stream`` in [0, 2**16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["Streams", "below", "derive_seeds", "integers", "normal", "signs", "uniform"]

_MASK64 = (1 << 64) - 1
STREAM_BITS = 16


def _signed(v: int) -> int:
    """A uint64 value as the int64 with the same bits."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


GOLDEN = _signed(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: SplitMix64's increment
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)

Counter = int | torch.Tensor
Shape = int | Sequence[int]


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed integers)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: a bijection of 64-bit words; every output bit depends on every input bit."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _absorb(key: torch.Tensor, value: Counter) -> torch.Tensor:
    """``mix(key + (value + 1) * GOLDEN)``; ``value`` an int, or int64 broadcasting against ``key``."""
    if isinstance(value, torch.Tensor):
        return _mix(key + (value.to(device=key.device, dtype=torch.int64) + 1) * GOLDEN)
    return _mix(key + _signed((int(value) + 1) * GOLDEN))


def _shape(shape: Shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class Streams:
    """The random streams of a set of examples, one per seed (int64, 1-d).

    The seeds' part of the hash is computed once; index a ``Streams`` like a tensor
    (``streams[keep]``) to follow a working batch that shrinks. Every draw has shape
    ``[n, *shape]`` and row ``e`` depends only on ``seeds[e]``, ``counter`` (an int, or int64
    with one value per example: each example's own iteration), ``stream`` and the element index.
    """

    def __init__(self, seeds: torch.Tensor) -> None:
        if seeds.dim() != 1:
            raise ValueError(f"seeds must be 1-d int64 (one per example), got shape {tuple(seeds.shape)}")
        self.keys = _absorb(torch.zeros_like(seeds, dtype=torch.int64), seeds.to(torch.int64))

    def __getitem__(self, rows: torch.Tensor | slice) -> Streams:
        sub = object.__new__(Streams)
        sub.keys = self.keys[rows]
        return sub

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def hash64(self, counter: Counter, shape: Shape, *, stream: int = 0) -> torch.Tensor:
        """Raw 64-bit hashes (as int64 bits)."""
        if not 0 <= stream < 1 << STREAM_BITS:
            raise ValueError(f"stream must be in [0, 2**{STREAM_BITS}), got {stream}")
        key = _absorb(self.keys, counter * (1 << STREAM_BITS) + stream)
        dims = _shape(shape)
        index = torch.arange(1, math.prod(dims) + 1, device=key.device, dtype=torch.int64)
        return _mix(key[:, None] + index * GOLDEN).view(-1, *dims)

    def uniform(self, counter: Counter, shape: Shape, *, stream: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Floats in [0, 1): the top ``mantissa + 1`` bits of each hash times 2**-bits, so every
        value is exact in ``dtype`` and none rounds up to 1."""
        bits = round(-math.log2(torch.finfo(dtype).eps)) + 1  # mantissa bits + the implicit one
        return _shr(self.hash64(counter, shape, stream=stream), 64 - bits).to(dtype) * 2.0 ** -bits

    def integers(self, counter: Counter, high: int | torch.Tensor, shape: Shape = (), *,
                 stream: int = 0) -> torch.Tensor:
        """int64 in ``[0, high)``; ``high`` an int or one int64 per example, in ``[1, 2**31)``.
        Lemire's multiply-shift of the top 32 bits: no division, a bias below ``high / 2**32``."""
        if isinstance(high, torch.Tensor):
            high = high.to(device=self.keys.device, dtype=torch.int64).view(-1, *([1] * len(_shape(shape))))
        return below(self.hash64(counter, shape, stream=stream), high)

    def signs(self, counter: Counter, shape: Shape, *, stream: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-1 or +1 with equal probability (the hash's top bit)."""
        return 1.0 - 2.0 * (self.hash64(counter, shape, stream=stream) < 0).to(dtype)

    def normal(self, counter: Counter, shape: Shape, *, stream: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws: Box-Muller on two float64 uniforms per value (hashes ``2i`` and
        ``2i + 1``); ``1 - u`` keeps the logarithm finite."""
        dims = _shape(shape)
        u = self.uniform(counter, (math.prod(dims), 2), stream=stream, dtype=torch.float64)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[..., 0]))
        return (radius * torch.cos(2.0 * math.pi * u[..., 1])).to(dtype).view(-1, *dims)


def below(words: torch.Tensor, high: int | torch.Tensor) -> torch.Tensor:
    """Map raw hashes to integers in ``[0, high)``, ``high`` in ``[1, 2**31)`` (broadcasting):
    ``(top 32 bits * high) >> 32``, what :meth:`Streams.integers` does; for an attack that takes
    several kinds of numbers from one :meth:`Streams.hash64` call."""
    if not isinstance(high, torch.Tensor) and not 1 <= int(high) < 2**31:
        raise ValueError(f"high must be in [1, 2**31), got {high}")
    return _shr(_shr(words, 32) * high, 32)


def uniform(seeds: torch.Tensor, counter: Counter, shape: Shape, *, stream: int = 0,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform floats in [0, 1), shape ``[n, *shape]`` (see :meth:`Streams.uniform`)."""
    return Streams(seeds).uniform(counter, shape, stream=stream, dtype=dtype)


def integers(seeds: torch.Tensor, counter: Counter, high: int | torch.Tensor, shape: Shape = (), *,
             stream: int = 0) -> torch.Tensor:
    """Integers in ``[0, high)``, shape ``[n, *shape]`` (see :meth:`Streams.integers`)."""
    return Streams(seeds).integers(counter, high, shape, stream=stream)


def signs(seeds: torch.Tensor, counter: Counter, shape: Shape, *, stream: int = 0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-1 or +1, shape ``[n, *shape]`` (see :meth:`Streams.signs`)."""
    return Streams(seeds).signs(counter, shape, stream=stream, dtype=dtype)


def normal(seeds: torch.Tensor, counter: Counter, shape: Shape, *, stream: int = 0,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws, shape ``[n, *shape]`` (see :meth:`Streams.normal`)."""
    return Streams(seeds).normal(counter, shape, stream=stream, dtype=dtype)


def derive_seeds(seed: int, n: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Example seeds for a caller that has none: positions 0..n-1 of one batch hashed with ``seed``,
    non-negative 63-bit int64 like the harness's ``example_seeds``. Results then depend on an
    example's position in its batch (not on the batch size)."""
    base = _absorb(torch.zeros((), device=device, dtype=torch.int64), seed)
    return _absorb(base, torch.arange(n, device=device, dtype=torch.int64)) & ((1 << 63) - 1)
