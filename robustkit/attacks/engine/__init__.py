"""robustkit's own attack engine (issue 17): attacks whose every random draw is an example's own.

Randomness comes from :mod:`robustkit.attacks.engine.rng`, a counter-based generator keyed by the
example's seed and its own iteration count, so an example's result is the same at any batch size,
order or sharding; an example leaves the working batch the moment it is broken, and each attack
returns how many queries every example cost. The registered attacks that use the engine live in
:mod:`robustkit.attacks` (``square``).
"""

from robustkit.attacks.engine.square import square_l2, square_linf

__all__ = ["square_l2", "square_linf"]
