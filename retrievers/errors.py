"""User-facing errors: each message names the file, line or config key, and the fix.

``run.py`` prints these without a traceback and exits 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake (unknown stage, bad chain, a value of the wrong type, ...)."""


class GateError(ConfigError):
    """A gate (``gates.*`` in the config) stopped the chain: an input measured too poor to learn from."""


class IndexBuildError(ConfigError):
    """A problem building or searching an index (bad factory, mismatched files)."""
