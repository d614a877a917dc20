"""``python -m onnxprune`` runs the CLI."""

from onnxprune.cli import main

main()
