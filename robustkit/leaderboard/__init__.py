"""RobustBench-format leaderboards: entries, rendering and submission bundles."""

from robustkit.leaderboard.entries import (
    DATASETS,
    FULL_TEST_SET,
    LP_EPS,
    THREAT_MODELS,
    Entry,
    Problem,
    boards,
    load_entries,
    rank,
    read_entry,
    validate_data,
)

__all__ = ["DATASETS", "FULL_TEST_SET", "LP_EPS", "THREAT_MODELS", "Entry", "Problem", "boards",
           "load_entries", "rank", "read_entry", "validate_data"]
