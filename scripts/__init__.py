"""Command-line tools around dr-lab's outputs; run each from the repo root as ``python -m scripts.<name>``."""
