"""Dataset loaders: formats, validation errors with file:line, warnings, missing data."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_tiny_beir, tiny_data_cfg, write_jsonl, write_qrels

from retrievers.data import DataError, ensure_available, load_dataset, read_beir_queries, read_qrels


def load(root: Path, splits=("test",), **extra):
    return load_dataset(tiny_data_cfg(root, **extra), list(splits))


@pytest.fixture
def ds_dir(tmp_path) -> Path:
    return make_tiny_beir(tmp_path / "tiny")


def set_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- happy path


def test_tiny_beir_loads(ds_dir):
    ds = load(ds_dir, splits=("test", "train"))
    assert len(ds.corpus) == 12 and len(ds.queries) == 6
    assert ds.corpus["d3"] == {"title": "Sourdough", "text": "A sourdough starter ferments flour and water with wild yeast."}
    assert ds.qrels["test"] == {"q1": {"d6": 1}, "q2": {"d2": 1}, "q3": {"d3": 2}, "q4": {"d9": 1}}
    assert ds.qrels["train"] == {"q5": {"d10": 1}, "q6": {"d5": 1}}
    assert list(ds.split_queries("test")) == ["q1", "q2", "q3", "q4"]
    assert ds.doc_text("d3") == "Sourdough A sourdough starter ferments flour and water with wild yeast."
    assert ds.warnings == []


def test_without_corpus(ds_dir):
    ds = load_dataset(tiny_data_cfg(ds_dir), ["test"], with_corpus=False)
    assert ds.corpus == {} and len(ds.qrels["test"]) == 4


# --------------------------------------------------------------------------- errors with file:line


def test_malformed_json_names_file_and_line(ds_dir):
    corpus = ds_dir / "corpus.jsonl"
    set_line(corpus, 5, '{"_id": "d5", "title": "Glaciers", "text": "unterminated')
    with pytest.raises(DataError) as e:
        load(ds_dir)
    assert f"{corpus}:5" in str(e.value)
    assert "malformed JSON" in str(e.value)


def test_non_object_line(ds_dir):
    queries = ds_dir / "queries.jsonl"
    set_line(queries, 2, '["q2", "a list"]')
    with pytest.raises(DataError, match=r"queries\.jsonl:2: expected a JSON object"):
        load(ds_dir)


@pytest.mark.parametrize("bad", ['{"title": "t", "text": "no id"}', '{"_id": "", "text": "empty id"}', '{"_id": null}'])
def test_missing_id_names_line(ds_dir, bad):
    corpus = ds_dir / "corpus.jsonl"
    set_line(corpus, 7, bad)
    with pytest.raises(DataError) as e:
        load(ds_dir)
    assert f"{corpus}:7" in str(e.value) and "_id" in str(e.value)


def test_duplicate_doc_id_names_both_lines(ds_dir):
    corpus = ds_dir / "corpus.jsonl"
    set_line(corpus, 9, json.dumps({"_id": "d2", "title": "again", "text": "duplicate of line 2"}))
    with pytest.raises(DataError) as e:
        load(ds_dir)
    msg = str(e.value)
    assert f"{corpus}:9" in msg and "line 2" in msg and "'d2'" in msg and "duplicate" in msg


def test_duplicate_query_id_names_both_lines(ds_dir):
    queries = ds_dir / "queries.jsonl"
    set_line(queries, 4, json.dumps({"_id": "q1", "text": "another query"}))
    with pytest.raises(DataError) as e:
        load(ds_dir)
    msg = str(e.value)
    assert f"{queries}:4" in msg and "line 1" in msg and "'q1'" in msg


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_query_text(ds_dir, text):
    queries = ds_dir / "queries.jsonl"
    set_line(queries, 3, json.dumps({"_id": "q3", "text": text}))
    with pytest.raises(DataError) as e:
        load(ds_dir)
    assert f"{queries}:3" in str(e.value) and "empty text" in str(e.value)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(ds_dir):
    corpus = ds_dir / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    lines.insert(1, "")  # the old line 2 is now line 3
    lines[3] = "{broken"
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{corpus}:4:"):
        load(ds_dir)


# --------------------------------------------------------------------------- qrels formats

QRELS = {"q1": {"d6": 1, "d1": 0}, "q2": {"d2": 2}, "q10": {"d12": 1}}


@pytest.mark.parametrize(
    "content",
    [
        "query-id\tcorpus-id\tscore\nq1\td6\t1\nq1\td1\t0\nq2\td2\t2\nq10\td12\t1\n",  # BEIR, header
        "q1\td6\t1\nq1\td1\t0\nq2\td2\t2\nq10\td12\t1\n",  # no header
        "query-id\tcorpus-id\tscore\r\nq1\td6\t1\r\nq1\td1\t0\r\nq2\td2\t2\r\nq10\td12\t1\r\n",  # CRLF
        "q1 0 d6 1\nq1 0 d1 0\nq2 0 d2 2\nq10 0 d12 1\n",  # TREC, spaces
        "q1\t0\td6\t1\r\nq1\t0\td1\t0\r\nq2\t0\td2\t2\r\nq10\t0\td12\t1",  # TREC, tabs, CRLF, no final EOL
        "q1 Q0 d6 1.0\n\nq1 Q0 d1 0\nq2 Q0 d2 2\nq10 Q0 d12 1\n\n",  # blank lines, float relevance
    ],
    ids=["beir-header", "beir-noheader", "beir-crlf", "trec", "trec-tabs-crlf", "trec-blank"],
)
def test_qrels_formats_parse_the_same(tmp_path, content):
    path = tmp_path / "qrels.tsv"
    path.write_bytes(content.encode())
    qrels = read_qrels(path)
    assert qrels == QRELS
    assert all(isinstance(r, int) for docs in qrels.values() for r in docs.values())


def test_qrels_bad_line(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\n")
    with pytest.raises(DataError, match=rf"{path}:3: expected 3 columns"):
        read_qrels(path)
    path.write_text("q1\td1\t1\nq2\td2\thigh\n")
    with pytest.raises(DataError, match=rf"{path}:2: relevance 'high'"):
        read_qrels(path)


def test_qrels_empty(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(DataError, match="no judgments"):
        read_qrels(path)


# --------------------------------------------------------------------------- warnings


def test_qrels_unknown_query_warns_and_is_dropped(ds_dir, caplog):
    write_qrels(ds_dir / "qrels" / "test.tsv", {"q1": {"d6": 1}, "q99": {"d2": 1}, "q2": {"d2": 1}})
    with caplog.at_level(logging.WARNING, logger="drlab"):
        ds = load(ds_dir)
    assert set(ds.qrels["test"]) == {"q1", "q2"}
    assert list(ds.split_queries("test")) == ["q1", "q2"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("q99" in w and "dropped" in w for w in warned), warned
    assert any("q99" in w for w in ds.warnings)


def test_qrels_unknown_query_strict_is_error(ds_dir):
    write_qrels(ds_dir / "qrels" / "test.tsv", {"q1": {"d6": 1}, "q99": {"d2": 1}})
    with pytest.raises(DataError) as e:
        load(ds_dir, strict=True)
    assert "q99" in str(e.value) and "strict" in str(e.value)


def test_qrels_only_unknown_queries_is_error(ds_dir):
    write_qrels(ds_dir / "qrels" / "test.tsv", {"q98": {"d6": 1}, "q99": {"d2": 1}})
    with pytest.raises(DataError, match="no query that is in the queries file"):
        load(ds_dir)


def test_qrels_unknown_doc_is_kept_with_warning(ds_dir, caplog):
    write_qrels(ds_dir / "qrels" / "test.tsv", {"q1": {"d6": 1, "d404": 1}, "q2": {"d2": 1}})
    with caplog.at_level(logging.WARNING, logger="drlab"):
        ds = load(ds_dir)
    assert ds.qrels["test"]["q1"] == {"d6": 1, "d404": 1}, "kept: it counts against recall, as in trec_eval"
    assert any("d404" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    with pytest.raises(DataError, match="d404"):
        load(ds_dir, strict=True)


def test_empty_document_warns(ds_dir, caplog):
    set_line(ds_dir / "corpus.jsonl", 11, json.dumps({"_id": "d11", "title": "", "text": "  "}))
    with caplog.at_level(logging.WARNING, logger="drlab"):
        ds = load(ds_dir)
    assert "d11" in ds.corpus, "an empty document is kept"
    assert any("d11" in r.getMessage() and "empty" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="d11"):
        load(ds_dir, strict=True)


# --------------------------------------------------------------------------- other formats


def test_msmarco_tsv(tmp_path):
    root = tmp_path / "msm"
    root.mkdir()
    (root / "collection.tsv").write_text("0\tThe capital of France is Paris.\n1\tBerlin is in Germany.\n2\tRome.\n")
    (root / "queries.dev.tsv").write_text("100\tcapital of france\n101\twhere is berlin\n")
    (root / "qrels.dev.tsv").write_text("100\t0\t0\t1\n101\t0\t1\t1\n")
    cfg = {"name": "msm", "format": "msmarco", "path": str(root), "eval_split": "dev"}
    ds = load_dataset(cfg, ["dev"])
    assert ds.corpus == {
        "0": {"title": "", "text": "The capital of France is Paris."},
        "1": {"title": "", "text": "Berlin is in Germany."},
        "2": {"title": "", "text": "Rome."},
    }
    assert ds.queries == {"100": "capital of france", "101": "where is berlin"}
    assert ds.qrels == {"dev": {"100": {"0": 1}, "101": {"1": 1}}}


def test_msmarco_configured_file_names(tmp_path):
    root = tmp_path / "msm"
    root.mkdir()
    (root / "c.tsv").write_text("7\tseven\n8\teight\n")
    (root / "q.small.tsv").write_text("1\tseven?\n")
    (root / "r.small.tsv").write_text("1 0 7 1\n")
    cfg = {
        "name": "msm",
        "format": "msmarco",
        "path": str(root),
        "files": {"corpus": "c.tsv", "queries": {"dev": "q.small.tsv"}, "qrels": {"dev": "r.small.tsv"}},
    }
    ds = load_dataset(cfg, ["dev"])
    assert set(ds.corpus) == {"7", "8"} and ds.qrels["dev"] == {"1": {"7": 1}}


def test_msmarco_duplicate_passage(tmp_path):
    root = tmp_path / "msm"
    root.mkdir()
    (root / "collection.tsv").write_text("0\ta\n1\tb\n0\tc\n")
    (root / "queries.dev.tsv").write_text("1\tq\n")
    (root / "qrels.dev.tsv").write_text("1 0 0 1\n")
    with pytest.raises(DataError, match=r"collection\.tsv:3: duplicate passage id '0'"):
        load_dataset({"name": "msm", "format": "msmarco", "path": str(root)}, ["dev"])


def _dpr_items():
    return [
        {
            "question": "who wrote hamlet",
            "answers": ["Shakespeare"],
            "positive_ctxs": [{"title": "Hamlet", "text": "Hamlet is a tragedy by Shakespeare.", "passage_id": "p1"}],
            "hard_negative_ctxs": [
                {"title": "Macbeth", "text": "Macbeth is a tragedy.", "passage_id": "p2"},
                {"title": "Othello", "text": "Othello is a tragedy.", "passage_id": "p3"},
            ],
        },
        {
            "id": "nq-7",
            "question": "capital of peru",
            "positive_ctxs": [
                {"title": "Lima", "text": "Lima is the capital of Peru.", "passage_id": "p4"},
                {"title": "Peru", "text": "Peru's capital city is Lima.", "passage_id": "p5"},
            ],
            "hard_negative_ctxs": [{"title": "Hamlet", "text": "Hamlet is a tragedy by Shakespeare.", "passage_id": "p1"}],
        },
    ]


def test_dpr_json(tmp_path):
    root = tmp_path / "nq"
    root.mkdir()
    (root / "dev.json").write_text(json.dumps(_dpr_items()))
    ds = load_dataset({"name": "nq", "format": "dpr", "path": str(root)}, ["dev"])
    assert ds.queries == {"dev-0": "who wrote hamlet", "nq-7": "capital of peru"}
    assert ds.qrels == {"dev": {"dev-0": {"p1": 1}, "nq-7": {"p4": 1, "p5": 1}}}
    assert ds.hard_negatives == {"dev-0": ["p2", "p3"], "nq-7": ["p1"]}
    assert set(ds.corpus) == {"p1", "p2", "p3", "p4", "p5"}
    assert ds.corpus["p4"] == {"title": "Lima", "text": "Lima is the capital of Peru."}


def test_dpr_with_passage_tsv(tmp_path):
    root = tmp_path / "nq"
    root.mkdir()
    (root / "train.json").write_text(json.dumps(_dpr_items()))
    (root / "psgs.tsv").write_text(
        "id\ttext\ttitle\n"
        + "".join(f"p{i}\tpassage {i} text\tTitle {i}\n" for i in range(1, 7))
    )
    cfg = {"name": "nq", "format": "dpr", "path": str(root), "files": {"corpus": "psgs.tsv"}}
    ds = load_dataset(cfg, ["train"])
    assert len(ds.corpus) == 6, "the TSV is the corpus (p6 is in no question)"
    assert ds.corpus["p1"] == {"title": "Title 1", "text": "passage 1 text"}, "the TSV wins over the context copy"
    assert ds.qrels["train"]["train-0"] == {"p1": 1}


def test_dpr_malformed(tmp_path):
    root = tmp_path / "nq"
    root.mkdir()
    (root / "dev.json").write_text('[{"question": "q",\n  "positive_ctxs": [}]')
    with pytest.raises(DataError, match=r"dev\.json:2: malformed JSON"):
        load_dataset({"name": "nq", "format": "dpr", "path": str(root)}, ["dev"])
    (root / "dev.json").write_text(json.dumps([{"question": "q", "positive_ctxs": [{"title": "no id"}]}]))
    with pytest.raises(DataError, match="passage_id"):
        load_dataset({"name": "nq", "format": "dpr", "path": str(root)}, ["dev"])


def test_unknown_format(tmp_path):
    with pytest.raises(DataError, match="valid choices: beir, msmarco, dpr"):
        load_dataset({"name": "x", "format": "parquet", "path": str(tmp_path)}, ["test"])


# --------------------------------------------------------------------------- missing data


def test_missing_dataset_without_url_names_files(tmp_path):
    root = tmp_path / "nowhere" / "mydata"
    cfg = tiny_data_cfg(root)
    with pytest.raises(DataError) as e:
        ensure_available(cfg, ["test", "train"])
    msg = str(e.value)
    for f in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv"):
        assert str(root / f) in msg
    assert "paths.data_dir" in msg and "mydata/" in msg


def test_partly_missing_dataset_names_only_missing(ds_dir):
    (ds_dir / "qrels" / "train.tsv").unlink()
    with pytest.raises(DataError) as e:
        ensure_available(tiny_data_cfg(ds_dir), ["test", "train"])
    assert str(ds_dir / "qrels" / "train.tsv") in str(e.value)
    assert "corpus.jsonl" not in str(e.value)


def test_missing_dataset_unreachable_url(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = "http://127.0.0.1:9/nothing.zip"
    root = tmp_path / "data" / "gone"
    with pytest.raises(DataError) as e:
        ensure_available(tiny_data_cfg(root, url=url), ["test"])
    msg = str(e.value)
    assert url in msg and "downloading it failed" in msg
    assert str(root / "corpus.jsonl") in msg, "says which files are expected"
    assert "paths.data_dir" in msg and "unpack" in msg, "says what to put where"
    assert not root.exists(), "a failed download leaves nothing half-written"
    assert list((tmp_path / "data").iterdir()) == [], "no temporary files left behind"


def test_available_dataset_is_not_downloaded(ds_dir):
    ensure_available(tiny_data_cfg(ds_dir, url="http://127.0.0.1:9/nothing.zip"), ["test", "train"])


# --------------------------------------------------------------------------- CLI: bad data caches nothing


def test_cli_corrupt_corpus_fails_and_caches_nothing(tmp_path):
    data = tmp_path / "data"
    root = make_tiny_beir(data / "tiny")
    set_line(root / "corpus.jsonl", 3, '{"_id": "d3", "title": "Sourdough", "text": oops}')
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "run.py"),
            "model=bm25", "data=beir", "data.name=tiny", "debug=tiny",
            f"paths.data_dir={data}", f"paths.output_dir={out}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    both = proc.stdout + proc.stderr
    assert "corpus.jsonl:3" in both, both[-3000:]
    assert "Traceback" not in proc.stderr, "a data error is reported without a traceback"
    cache = out / "cache"
    manifests = list(cache.rglob("manifest.json")) if cache.exists() else []
    assert manifests == [], f"nothing may be cached: {manifests}"
    leftovers = [p for p in cache.rglob("*") if p.is_dir()] if cache.exists() else []
    assert leftovers == [], f"no stage directories left behind: {leftovers}"


def test_read_queries_direct(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"_id": 1, "text": " padded "}, {"_id": "2", "text": "x"}])
    assert read_beir_queries(path) == {"1": "padded", "2": "x"}


# --------------------------------------------------------------------------- encodings and empty files


def test_invalid_utf8_names_file_and_line(tmp_path):
    root = make_tiny_beir(tmp_path / "tiny")
    corpus = root / "corpus.jsonl"
    lines = corpus.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"Sourdough", b"Sourd\xf6ugh")  # latin-1 o-umlaut
    corpus.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"corpus\.jsonl:3: not valid UTF-8 \(byte 0xf6.*iconv"):
        load(root)
    qrels = root / "qrels" / "test.tsv"
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\nq1\td\xe96\t1\n")
    with pytest.raises(DataError, match=r"test\.tsv:2: not valid UTF-8"):
        read_qrels(qrels)


def test_invalid_utf8_in_dpr_json_names_the_line(tmp_path):
    root = tmp_path / "nq"
    root.mkdir()
    (root / "dev.json").write_bytes(b'[\n {"question": "ok", "positive_ctxs": []},\n {"question": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=r"dev\.json:3: not valid UTF-8"):
        load_dataset({"name": "nq", "format": "dpr", "path": str(root)}, ["dev"])


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    root = make_tiny_beir(tmp_path / "tiny")
    for f in (root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / "test.tsv"):
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    ds = load(root)
    assert "d1" in ds.corpus and "q1" in ds.queries and ds.qrels["test"]["q1"] == {"d6": 1}


@pytest.mark.parametrize("which", ["corpus.jsonl", "queries.jsonl"])
def test_an_empty_corpus_or_query_set_is_an_error(tmp_path, which):
    root = make_tiny_beir(tmp_path / "tiny")
    (root / which).write_text("\n")
    with pytest.raises(DataError, match="has no documents" if which == "corpus.jsonl" else "has no queries"):
        load(root)
