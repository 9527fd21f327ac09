"""The pieces every other package uses: registry, config, errors, threat model, provenance,
checkpoints. Nothing in ``core`` imports models, attacks, data or training."""
