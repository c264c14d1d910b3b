"""Encoding precision: ``auto`` picks bf16 only on bf16 hardware and only when a check shows it safe;
stage keys hash what ``auto`` means on this hardware; the choice is recorded (retrievers/precision.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrievers import precision as P
from retrievers.errors import ConfigError


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend this CPU has (True) or lacks (False) a fast bf16 path."""
    def set_(has: bool):
        monkeypatch.setattr(P, "cpu_bf16_flags", lambda cpuinfo="/proc/cpuinfo": ("avx512_bf16",) if has else ())
    return set_


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert P.cpu_bf16_flags(str(f)) == ("avx512_bf16",)
    f.write_text("flags\t\t: fpu sse2 avx2\n")
    P.cpu_bf16_flags.cache_clear()
    assert P.cpu_bf16_flags(str(f)) == ()
    assert P.cpu_bf16_flags(str(tmp_path / "absent")) == ()
    P.cpu_bf16_flags.cache_clear()


def test_planned_follows_the_hardware_and_forced_values(bf16_cpu):
    bf16_cpu(True)
    assert P.planned("auto", "cpu") == "bf16"
    bf16_cpu(False)
    assert P.planned("auto", "cpu") == "fp32"
    assert P.planned("bf16", "cpu") == "bf16" and P.planned("fp32", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="precision 'fp16' unknown.*auto, fp32, bf16"):
        P.planned("fp16", "cpu")


class _Fake:
    """An encoder whose bf16 vectors are its fp32 vectors plus ``noise`` on the first component."""

    def __init__(self, noise: float):
        self.noise, self.calls = noise, []

    def encode(self, texts, side, batch_size=128, device="cpu", bf16=False, progress=True):
        self.calls.append((len(texts), side, bf16))
        v = np.ones((len(texts), 8), dtype=np.float32)
        if bf16:
            v[:, 0] += self.noise
        return v


def test_auto_keeps_bf16_only_when_the_check_passes(bf16_cpu, caplog):
    bf16_cpu(True)
    texts = [f"t{i}" for i in range(500)]
    close = _Fake(noise=1e-3)
    use, rec = P.choose("auto", close, texts, "doc", device="cpu", batch_size=16)
    assert use and rec["precision"] == "bf16" and rec["bf16_check_texts"] == P.CHECK_SAMPLE
    assert rec["bf16_check_min_cosine"] >= P.COSINE_FLOOR
    assert [c[2] for c in close.calls] == [True, False] and close.calls[0][0] == P.CHECK_SAMPLE

    far = _Fake(noise=0.2)  # cosine ~0.9997 < 0.9999
    use, rec = P.choose("auto", far, texts, "doc", device="cpu", batch_size=16)
    assert not use and rec["precision"] == "fp32" and rec["precision_planned"] == "bf16"
    assert rec["bf16_check_min_cosine"] < P.COSINE_FLOOR
    assert "bf16 check failed" in caplog.text and "precision=bf16 forces" in caplog.text
    assert P.precision_metrics(rec) == {"bf16": 0.0, "bf16_check_min_cosine": rec["bf16_check_min_cosine"]}

    forced = _Fake(noise=0.2)  # forced bf16: no check
    assert P.choose("bf16", forced, texts, "doc", device="cpu", batch_size=16)[0] and forced.calls == []
    bf16_cpu(False)
    plain = _Fake(noise=0.0)  # no bf16 hardware: fp32, no check
    use, rec = P.choose("auto", plain, texts, "doc", device="cpu", batch_size=16)
    assert not use and plain.calls == [] and rec == {"precision_requested": "auto", "precision_planned": "fp32",
                                                     "precision": "fp32"}


def test_keys_hash_what_auto_means_here(tmp_path, bf16_cpu):
    from conftest import compose, tiny_overrides

    from pipelines.keys import hashed_value

    cfg = {p: compose([*tiny_overrides(), f"precision={p}"], tmp_path) for p in ("auto", "bf16", "fp32")}
    bf16_cpu(True)
    assert hashed_value(cfg["auto"], "precision") == hashed_value(cfg["bf16"], "precision") == "bf16"
    assert hashed_value(cfg["auto"], "pipeline.retriever1")["precision"] == "bf16"  # training: auto by default
    bf16_cpu(False)
    assert hashed_value(cfg["auto"], "precision") == hashed_value(cfg["fp32"], "precision") == "fp32"
    assert hashed_value(cfg["auto"], "pipeline.retriever1")["precision"] == "fp32"


def test_training_under_auto_runs_the_check_and_records_it(tmp_path, bf16_cpu):
    from conftest import compose, make_tiny_beir, make_tiny_bert, tiny_texts

    from pipelines.runner import run_pipeline

    data = make_tiny_beir(tmp_path / "data" / "tiny")
    model = make_tiny_bert(tmp_path / "m", tiny_texts(data))
    bf16_cpu(True)
    cfg = compose(["model=dpr", "data=beir", "data.name=tiny", "data.train_split=train", "debug=tiny",
                   f"model.checkpoint={model}",
                   "stage=retriever1", "pipeline.retriever1.n_negatives=0", "pipeline.retriever1.batch_size=2",
                   "pipeline.retriever1.max_steps=1"], tmp_path)
    m = run_pipeline(cfg, tmp_path / "run")["stages"]["retriever1"]
    manifest = json.loads((Path(m["dir"]) / "manifest.json").read_text())
    assert manifest["reads"]["pipeline.retriever1"]["precision"] == "bf16"
    assert manifest["metrics"]["bf16"] in (0.0, 1.0) and "bf16_check_min_cosine" in manifest["metrics"]


def test_index_and_eval_record_and_share_the_precision(tmp_path, bf16_cpu):
    """On bf16 hardware, ``auto`` runs the check in the index stage, records it, and eval encodes the queries
    the same way; ``precision=fp32`` is another key (never served the bf16 cache)."""
    from conftest import make_tiny_bert
    from test_index import DOCS, QUERIES
    from test_index import compose as index_compose

    from pipelines.runner import run_pipeline

    model = make_tiny_bert(tmp_path / "m", [f"{t} {x}" for _, t, x in DOCS] + list(QUERIES.values()))
    bf16_cpu(True)
    s1 = run_pipeline(index_compose(tmp_path, model), tmp_path / "r1")
    d1 = Path(s1["stages"]["index"]["dir"])
    rec = json.loads((d1 / "encoder.json").read_text())
    assert rec["precision_requested"] == "auto" and rec["precision_planned"] == "bf16"
    assert rec["precision"] in ("bf16", "fp32") and rec["bf16"] == (rec["precision"] == "bf16")
    manifest = json.loads((d1 / "manifest.json").read_text())
    assert manifest["reads"]["precision"] == "bf16"
    assert manifest["metrics"]["bf16"] == float(rec["bf16"]) and "bf16_check_min_cosine" in manifest["metrics"]
    stats = json.loads((d1 / "index_stats.json").read_text())
    assert stats["precision"] == rec["precision"] and stats["backend"] == rec["backend"]
    pad = stats["padding"]
    assert pad["tokens"] <= pad["padded"] <= pad["padded_unsorted"] and 0 <= pad["saved"] < 1

    s2 = run_pipeline(index_compose(tmp_path, model, "precision=fp32"), tmp_path / "r2")
    d2 = Path(s2["stages"]["index"]["dir"])
    assert d2 != d1 and s2["stages"]["index"]["status"] == "ran"
    rec2 = json.loads((d2 / "encoder.json").read_text())
    assert rec2["precision"] == "fp32" and not rec2["bf16"] and "bf16_check_min_cosine" not in rec2
    from retrievers.openvino_backend import available

    assert rec["backend"] == rec2["backend"] == ("openvino" if available() else "torch")
    s3 = run_pipeline(index_compose(tmp_path, model, "precision=fp32", "backend=torch"), tmp_path / "r3")
    rec3 = json.loads((Path(s3["stages"]["index"]["dir"]) / "encoder.json").read_text())
    assert rec3["backend"] == "torch"
    assert s3["metrics"]["test/ndcg@10"] == pytest.approx(s2["metrics"]["test/ndcg@10"], abs=1e-6)


# --------------------------------------------------------------------------- the OpenVINO backend

def test_backend_plan_follows_the_package_and_device(monkeypatch):
    from retrievers import openvino_backend as OV

    monkeypatch.setattr(OV, "available", lambda: True)
    assert OV.planned("auto", "cpu") == "openvino" and OV.planned("torch", "cpu") == "torch"
    monkeypatch.setattr(OV, "available", lambda: False)
    assert OV.planned("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match="backend=openvino needs .*pip install openvino"):
        OV.planned("openvino", "cpu")
    with pytest.raises(ConfigError, match="backend 'onnx' unknown"):
        OV.planned("onnx", "cpu")


def test_openvino_encodes_like_torch_and_recompiles_after_a_weight_update(tmp_path):
    pytest.importorskip("openvino")
    import torch
    from conftest import TINY_DOCS, make_tiny_bert

    from retrievers.encoder import build_biencoder

    texts = [f"{t} {x}" for _, t, x in TINY_DOCS]
    enc = build_biencoder(str(make_tiny_bert(tmp_path / "m", texts)), pooling="mean", normalize=True)
    ref = enc.encode(texts, "doc", progress=False)
    enc.backend = "openvino"
    np.testing.assert_allclose(enc.encode(texts, "doc", progress=False), ref, atol=1e-5)
    bf16 = enc.encode(texts, "doc", progress=False, bf16=True)
    assert P.cosine_rows(bf16, ref).min() > 0.999 and np.abs(bf16 - ref).max() > 0  # bf16 is its own program
    with torch.no_grad():  # what an optimiser step does: the compiled copy must not be reused
        for p in enc.query_model.parameters():
            p.mul_(1.05)
    moved = enc.encode(texts, "doc", progress=False)
    enc.backend = "torch"
    np.testing.assert_allclose(moved, enc.encode(texts, "doc", progress=False), atol=1e-5)
    assert np.abs(moved - ref).max() > 1e-4


def test_encode_counts_the_padding_length_sorting_saves(tmp_path):
    from conftest import TINY_DOCS, make_tiny_bert

    from retrievers.encoder import build_biencoder

    texts = ["a", "b c d e f g h", "i", "j k l m n o p q r"]  # long and short alternate
    words = [w for t in texts for w in t.split()] + [f"{t} {x}" for _, t, x in TINY_DOCS]
    enc = build_biencoder(str(make_tiny_bert(tmp_path / "m", words)), pooling="mean")
    enc.encode(texts, "doc", batch_size=2, progress=False)
    lens = [3, 9, 3, 11]  # [CLS] + words + [SEP]
    assert enc.padding == {"tokens": sum(lens), "padded": 2 * 11 + 2 * 3, "padded_unsorted": 2 * 9 + 2 * 11}
