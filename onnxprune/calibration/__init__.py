"""Calibration: per-layer activation statistics, reconstruction (SparseGPT, refits), sensitivity and layer-by-layer pruning."""
