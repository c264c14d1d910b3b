"""Datasets: BEIR layout, MS MARCO TSV and DPR JSON, validated, with clear errors.

Formats (``data.format``):

* ``beir``: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
  (``_id``, ``text``), ``qrels/<split>.tsv`` (``query-id corpus-id score``, with or
  without header; a 4-column TREC qrels line is accepted too; LF or CRLF).
* ``msmarco``: ``collection.tsv`` (``pid<TAB>text``), ``queries.<split>.tsv``
  (``qid<TAB>text``), ``qrels.<split>.tsv`` (TREC 4 columns ``qid 0 pid rel``).
  File names are configurable under ``data.files``.
* ``sts``: sentence pairs with gold scores, ``<set>/<split>.tsv`` (:mod:`retrievers.sts`); no
  corpus or qrels, so only the ``pretrain`` and ``eval`` stages apply to it.
* ``dpr``: ``<split>.json`` lists of ``{question, positive_ctxs, hard_negative_ctxs}``
  (DPR's retriever training files) and an optional passage TSV (``id text title``,
  DPR's ``psgs_w100.tsv``). Without the TSV the corpus is the union of the contexts.

Validation policy (documented in the README):

* errors (exit non-zero, nothing cached): malformed JSON (file:line), a line without
  ``_id``, duplicate ids, a query with empty text, a malformed qrels line, a missing file.
* warnings (``data.strict=true`` turns them into errors): qrels naming a query that is
  not in the queries file (that query is dropped from evaluation: it cannot be
  searched); qrels naming a document that is not in the corpus (kept, as trec_eval
  would: it counts against recall); documents whose title and text are both empty
  (kept: they are simply never retrieved).
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from retrievers.errors import ConfigError

log = logging.getLogger("drlab")

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


class DataError(ValueError):
    """Bad or missing input data. The message names the file (and line) and the fix."""


@dataclass
class Dataset:
    name: str
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> qid -> docid -> relevance
    hard_negatives: dict[str, list[str]] = field(default_factory=dict)  # from DPR JSON
    warnings: list[str] = field(default_factory=list)

    def split_queries(self, split: str) -> dict[str, str]:
        """Queries judged in ``split``, in qrels order."""
        return {q: self.queries[q] for q in self.qrels[split] if q in self.queries}

    def positives(self, split: str) -> dict[str, list[str]]:
        """Judged positives (relevance > 0) of each ``split`` query that has some and is in the queries file."""
        out = {q: [d for d, r in docs.items() if r > 0] for q, docs in self.qrels[split].items()}
        return {q: v for q, v in out.items() if v and q in self.queries}

    def doc_text(self, doc_id: str, sep: str = " ") -> str:
        d = self.corpus[doc_id]
        return f"{d['title']}{sep}{d['text']}".strip() if d["title"] else d["text"].strip()


def train_split_of(data: dict[str, Any], stage: str) -> str:
    """``data.train_split``, or a ConfigError saying which stage needs it and what to do."""
    split = data.get("train_split")
    if not split:
        raise ConfigError(
            f"stage {stage} trains on data.train_split, but data '{data.get('name')}' has train_split=null. "
            f"Fix: use a dataset with training judgments (e.g. data=scifact, data=nfcorpus), set "
            f"data.train_split=<split> if its judgments exist, or pick a family without training "
            f"(model=pretrained, model=bm25)."
        )
    return str(split)


# --------------------------------------------------------------------------- availability


def expected_files(cfg: dict[str, Any], splits: list[str]) -> list[Path]:
    root = Path(cfg["path"])
    fmt = cfg.get("format", "beir")
    files = dict(cfg.get("files") or {})
    if fmt == "beir":
        return [root / "corpus.jsonl", root / "queries.jsonl"] + [root / "qrels" / f"{s}.tsv" for s in splits]
    if fmt == "msmarco":
        return [root / files.get("corpus", "collection.tsv")] + [
            root / (files.get("queries") or {}).get(s, f"queries.{s}.tsv") for s in splits
        ] + [root / (files.get("qrels") or {}).get(s, f"qrels.{s}.tsv") for s in splits]
    if fmt == "dpr":
        return [root / (files.get("splits") or {}).get(s, f"{s}.json") for s in splits]
    if fmt == "sts":
        from retrievers.sts import expected_files as sts_files

        return sts_files(cfg)
    raise DataError(f"data.format '{fmt}' is unknown; valid choices: beir, msmarco, dpr, sts")


def ensure_available(cfg: dict[str, Any], splits: list[str], download: bool = True) -> None:
    """Check the files are there; if not, download ``data.url`` or explain what to put where."""
    missing = [p for p in expected_files(cfg, splits) if not p.exists()]
    if not missing:
        return
    url = cfg.get("url")
    root = Path(cfg["path"])
    where = "\n".join(f"  - {p}" for p in missing)
    if not url or not download:
        raise DataError(
            f"dataset '{cfg['name']}' is incomplete; missing:\n{where}\n"
            f"Put the files there, or point paths.data_dir (env DRLAB_DATA_DIR) at a directory holding '{root.name}/'."
        )
    try:
        if isinstance(url, dict):  # one URL per file (DPR); .gz files are decompressed
            for name, u in url.items():
                _download_file(u, root / name)
        else:
            _download_and_extract(url, root)
    except Exception as e:  # network, HTTP, bad archive: all reported the same way
        raise DataError(
            f"dataset '{cfg['name']}' is not at {root} (missing:\n{where}\n) and downloading it failed: "
            f"{type(e).__name__}: {e}\n"
            f"Fix: on a machine with internet, download {url} and unpack it so that the files above exist "
            f"(for BEIR: {root}/corpus.jsonl, queries.jsonl, qrels/), or set paths.data_dir=/dir/holding/{root.name}."
        ) from None
    still = [p for p in expected_files(cfg, splits) if not p.exists()]
    if still:
        raise DataError(f"downloaded {url} but these files are still missing: {[str(p) for p in still]}")


def _download_file(url: str, dest: Path) -> None:
    import gzip

    log.info("downloading %s -> %s", url, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".download")
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as fh:
        shutil.copyfileobj(gzip.GzipFile(fileobj=r) if url.endswith(".gz") else r, fh)
    tmp.replace(dest)


def _download_and_extract(url: str, root: Path) -> None:
    log.info("downloading %s -> %s", url, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        archive = Path(tmp) / Path(url).name
        with urllib.request.urlopen(url, timeout=30) as r, open(archive, "wb") as fh:
            shutil.copyfileobj(r, fh)
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            # BEIR zips hold one top-level folder named like the dataset.
            inner = [p for p in Path(tmp).iterdir() if p.is_dir()]
            src = inner[0] if len(inner) == 1 else Path(tmp)
            shutil.move(str(src), str(root))
        else:
            import tarfile

            with tarfile.open(archive) as t:
                t.extractall(root, filter="data")


# --------------------------------------------------------------------------- readers


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}). "
            f"Fix: re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed"
        ) from None


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its ending) of a UTF-8 text file. A UTF-8 byte-order mark is
    skipped; invalid UTF-8 is a DataError naming the file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            yield lineno, _decode(raw, path, lineno).rstrip("\r\n")


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). "
                f"Fix or remove that line."
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _id_of(obj: dict, path: Path, lineno: int, key: str = "_id") -> str:
    if key not in obj or obj[key] is None or str(obj[key]).strip() == "":
        raise DataError(f"{path}:{lineno}: missing '{key}' (every line needs a non-empty '{key}')")
    return str(obj[key])


def iter_beir_corpus(path: Path) -> Iterator[tuple[str, str, str]]:
    """Yield (id, title, text), raising DataError on malformed lines and duplicate ids."""
    seen: dict[str, int] = {}
    for lineno, obj in _jsonl(path):
        did = _id_of(obj, path, lineno)
        if did in seen:
            raise DataError(f"{path}:{lineno}: duplicate document id '{did}' (first on line {seen[did]})")
        seen[did] = lineno
        yield did, str(obj.get("title") or ""), str(obj.get("text") or "")


def read_beir_queries(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, obj in _jsonl(path):
        qid = _id_of(obj, path, lineno)
        if qid in out:
            raise DataError(f"{path}:{lineno}: duplicate query id '{qid}' (first on line {lines[qid]})")
        text = str(obj.get("text") or "").strip()
        if not text:
            raise DataError(f"{path}:{lineno}: query '{qid}' has empty text")
        out[qid], lines[qid] = text, lineno
    return out


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR (``qid docid score``, optional header) or TREC (``qid iter docid rel``) qrels."""
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) == 4:
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise DataError(
                f"{path}:{lineno}: expected 3 columns (query-id, corpus-id, score) or 4 (TREC), got {len(cols)}"
            )
        try:
            rel = int(float(cols[2]))
        except ValueError:
            if lineno == 1:  # header line
                continue
            raise DataError(f"{path}:{lineno}: relevance '{cols[2]}' is not a number") from None
        qrels.setdefault(cols[0].strip(), {})[cols[1].strip()] = rel
    if not qrels:
        raise DataError(f"{path}: no judgments found")
    return qrels


def _read_tsv_pairs(path: Path, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, line in text_lines(path):
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            raise DataError(f"{path}:{lineno}: expected '<id><TAB><text>', got {len(cols)} column(s)")
        if cols[0] in out:
            raise DataError(f"{path}:{lineno}: duplicate {what} id '{cols[0]}'")
        out[cols[0]] = cols[1]
    return out


# --------------------------------------------------------------------------- loading


def load_dataset(cfg: dict[str, Any], splits: list[str], with_corpus: bool = True) -> Dataset:
    """Load and validate. ``cfg`` is the resolved ``data`` config node."""
    ensure_available(cfg, splits)
    fmt = cfg.get("format", "beir")
    root = Path(cfg["path"])
    files = dict(cfg.get("files") or {})
    ds = Dataset(cfg["name"], {}, {}, {})
    if fmt == "beir":
        if with_corpus:
            ds.corpus = {d: {"title": t, "text": x} for d, t, x in iter_beir_corpus(root / "corpus.jsonl")}
        ds.queries = read_beir_queries(root / "queries.jsonl")
        for s in splits:
            ds.qrels[s] = read_qrels(root / "qrels" / f"{s}.tsv")
    elif fmt == "msmarco":
        if with_corpus:
            cpath = root / files.get("corpus", "collection.tsv")
            ds.corpus = {d: {"title": "", "text": t} for d, t in _read_tsv_pairs(cpath, "passage").items()}
        for s in splits:
            qpath = root / (files.get("queries") or {}).get(s, f"queries.{s}.tsv")
            for qid, text in _read_tsv_pairs(qpath, "query").items():
                if not text.strip():
                    raise DataError(f"{qpath}: query '{qid}' has empty text")
                ds.queries[qid] = text
            ds.qrels[s] = read_qrels(root / (files.get("qrels") or {}).get(s, f"qrels.{s}.tsv"))
    elif fmt == "dpr":
        _load_dpr(ds, root, files, splits, with_corpus)
    elif fmt == "sts":
        raise DataError(f"data '{cfg['name']}' is STS sentence pairs (format sts): it has no corpus, queries or "
                        f"relevance judgments. Only the pretrain and eval stages run on it (retrievers/sts.py).")
    else:
        raise DataError(f"data.format '{fmt}' is unknown; valid choices: beir, msmarco, dpr, sts")
    _check(ds, bool(cfg.get("strict", False)), root, with_corpus)
    return ds


def _load_dpr(ds: Dataset, root: Path, files: dict, splits: list[str], with_corpus: bool) -> None:
    corpus_file = files.get("corpus")
    if with_corpus and corpus_file and (root / corpus_file).exists():
        reader = csv.reader((line for _, line in text_lines(root / corpus_file)), delimiter="\t")
        for lineno, row in enumerate(reader, 1):
            if lineno == 1 and row and row[0] == "id":
                continue
            if len(row) < 3:
                raise DataError(f"{root / corpus_file}:{lineno}: expected 'id<TAB>text<TAB>title'")
            ds.corpus[row[0]] = {"title": row[2], "text": row[1]}
    for s in splits:
        path = root / (files.get("splits") or {}).get(s, f"{s}.json")
        raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _decode(raw.splitlines(keepends=True)[raw.count(b"\n", 0, e.start)], path, raw.count(b"\n", 0, e.start) + 1)
        try:
            items = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of questions")
        ds.qrels[s] = {}
        for i, it in enumerate(items):
            question = str(it.get("question") or "").strip()
            if not question:
                raise DataError(f"{path}: item {i} has no 'question'")
            qid = str(it.get("id", f"{s}-{i}"))
            ds.queries[qid] = question

            def pid(ctx: dict, where: str = f"{path}: item {i}") -> str:
                p = ctx.get("passage_id", ctx.get("psg_id", ctx.get("id")))
                if p is None:
                    raise DataError(f"{where} has a context without 'passage_id'")
                if with_corpus and str(p) not in ds.corpus:
                    ds.corpus[str(p)] = {"title": str(ctx.get("title") or ""), "text": str(ctx.get("text") or "")}
                return str(p)

            ds.qrels[s][qid] = {pid(c): 1 for c in it.get("positive_ctxs") or []}
            ds.hard_negatives[qid] = [pid(c) for c in it.get("hard_negative_ctxs") or []]


def _check(ds: Dataset, strict: bool, root: Path, with_corpus: bool) -> None:
    if with_corpus and not ds.corpus:
        raise DataError(f"{root}: the corpus has no documents. Fix: check the corpus file (empty, or only blank lines?)")
    if ds.qrels and not ds.queries:
        raise DataError(f"{root}: the queries file has no queries. Fix: check the queries file (empty?)")
    problems: list[str] = []
    for split, qrels in ds.qrels.items():
        unknown_q = [q for q in qrels if q not in ds.queries]
        if unknown_q:
            problems.append(
                f"qrels/{split}: {len(unknown_q)} query id(s) not in the queries file (e.g. {unknown_q[:3]}); "
                f"they are dropped from evaluation"
            )
            for q in unknown_q:
                del qrels[q]
        if with_corpus:
            unknown_d = sorted({d for q in qrels.values() for d in q if d not in ds.corpus})
            if unknown_d:
                problems.append(
                    f"qrels/{split}: {len(unknown_d)} document id(s) not in the corpus (e.g. {unknown_d[:3]}); "
                    f"kept, as trec_eval would"
                )
        if not qrels:
            raise DataError(f"{root}: qrels/{split} has no query that is in the queries file")
    if with_corpus:
        empty = [d for d, v in ds.corpus.items() if not (v["title"].strip() or v["text"].strip())]
        if empty:
            problems.append(f"corpus: {len(empty)} document(s) with empty title and text (e.g. {empty[:3]})")
    for p in problems:
        if strict:
            raise DataError(f"{root}: {p} (data.strict=true)")
        log.warning("%s: %s", ds.name, p)
    ds.warnings = problems
