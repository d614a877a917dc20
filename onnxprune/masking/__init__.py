"""Masking: sparsity patterns, importance criteria, scope (local/global) and which weights are selected."""
