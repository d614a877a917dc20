"""Reports: per-layer tables built from pass records, inspection of a model, output comparison."""
