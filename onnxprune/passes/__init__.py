"""Passes: each a step of the pipeline that declares what it requires and ensures and returns a typed record."""
