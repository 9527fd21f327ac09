"""robustkit's own attack engine (issue 17): attacks whose every random draw is an example's own.

Randomness comes from :mod:`robustkit.attacks.engine.rng`, a counter-based generator keyed by the
example's seed and its own iteration count, so an example's result is the same at any batch size,
order or sharding; an example leaves the working batch the moment it is broken, and each attack
returns how many queries every example cost. The registered attacks that use the engine live in
:mod:`robustkit.attacks` (``square``).
"""

from robustkit.attacks.engine.square import square_l2, square_linf

# Bumped whenever a change to the engine can change a per-example result: results record it (as the
# attack's "implementation"), and a regression re-run names the change when it differs.
ENGINE_VERSION = 1

__all__ = ["ENGINE_VERSION", "square_l2", "square_linf"]
