"""OpenVINO as the CPU encoding backend: the transformer tower compiled by OpenVINO, the rest in torch.

``backend: auto`` (the default, a top-level config node) encodes on the CPU through OpenVINO when the
``openvino`` package is importable, else through torch; ``torch`` / ``openvino`` force one. Only the
transformer forward moves: tokenisation, the length-sorted batches, pooling, the head and the
normalisation stay :meth:`retrievers.encoder.BiEncoder.encode`'s. bf16 is OpenVINO's
``INFERENCE_PRECISION_HINT`` (fp32 otherwise), so :mod:`retrievers.precision`'s check compares
OpenVINO's bf16 with its fp32 exactly as it does torch's.

Why: on this 2-core AVX512-BF16 CPU OpenVINO's bf16 encodes all-MiniLM-L6-v2 1.2-1.3x faster than
torch's bf16 autocast at the same cosine to fp32 (``scripts/bench_encode.py``; README, "Performance").
ONNX Runtime was measured too and not kept (its fp32 equals torch's; its int8 is slower than bf16 and
loses accuracy).

A compiled tower is cached on the encoder and recompiled when any weight changed in place (an optimiser
step bumps the tensors' version counters), so a model that trains is never encoded with stale weights.
A model OpenVINO cannot convert is encoded by torch, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger("drlab")

CHOICES = ("auto", "torch", "openvino")


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def planned(requested: str, device: str) -> str:
    """``torch`` or ``openvino``: what ``requested`` means on ``device`` (stage keys hash this)."""
    from retrievers.encoder import resolve_device

    if requested not in CHOICES:
        from retrievers.errors import ConfigError

        raise ConfigError(f"backend '{requested}' unknown; valid choices: {', '.join(CHOICES)} (key 'backend')")
    on_cpu = resolve_device(str(device)).type == "cpu"
    if requested == "openvino" and not (on_cpu and available()):
        from retrievers.errors import ConfigError

        raise ConfigError("backend=openvino needs the CPU and the openvino package (pip install openvino); "
                          "use backend=auto or backend=torch")
    if requested == "auto":
        return "openvino" if on_cpu and available() else "torch"
    return requested


class _Tower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs)), return_dict=True).last_hidden_state


def _version(model: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in model.parameters())


def compiled_tower(model: torch.nn.Module, cache: dict, names: tuple[str, ...], bf16: bool,
                   example: dict[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor] | None:
    """``feats -> last_hidden_state`` through OpenVINO for ``model``, cached in ``cache``; None if it cannot convert."""
    key = (id(model), names, bool(bf16))
    hit = cache.get(key)
    if hit is not None and hit[0] == _version(model):
        return hit[1]
    import openvino as ov

    try:
        with torch.no_grad():
            converted = ov.convert_model(_Tower(model.eval(), names), example_input=tuple(example[n] for n in names))
        compiled = ov.Core().compile_model(converted, "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
        })
    except Exception as e:  # noqa: BLE001 -- any conversion failure: encode with torch, and say so
        log.warning("OpenVINO could not convert %s (%s: %s); encoding with torch (backend=torch hides this)",
                    type(model).__name__, type(e).__name__, str(e).splitlines()[0][:200])
        cache[key] = (_version(model), None)
        return None
    request = compiled.create_infer_request()

    def run(feats: dict[str, torch.Tensor]) -> torch.Tensor:
        out: Any = request.infer({i: feats[n].numpy().astype(np.int64) for i, n in enumerate(names)})
        return torch.from_numpy(np.array(next(iter(out.values())), dtype=np.float32))

    cache[key] = (_version(model), run)
    log.info("[encode] %s compiled by OpenVINO %s (%s)", type(model).__name__, ov.__version__,
             "bf16" if bf16 else "fp32")
    return run
