"""LLM query expansion: LameR, HyDE and query2doc as one prompt -> generations -> new query recipe.

* LameR (Shen et al. 2023, "Large Language Models are Strong Zero-Shot Retriever", arXiv
  2304.14233): the query's top BM25 passages are put into the prompt as (possibly wrong) answer
  demonstrations; the LLM writes ``n`` answers; BM25 searches again with the query + the answers.
  The paper: 10 demonstrations, 5 answers, DL19 nDCG@10 69.1 with GPT-3.5 (BM25 50.6).
* HyDE (Gao et al. 2022, "Precise Zero-Shot Dense Retrieval without Relevance Labels"): a
  hypothetical passage per sample, no demonstrations; with BM25 the query + passages are searched.
* query2doc (Wang et al. 2023, "Query2doc: Query Expansion with Large Language Models"): one
  pseudo-document; for BM25 the query is repeated ``query_repeat`` (5) times before it.

The families differ only in ``prompt``, ``demos`` and ``query_repeat`` (``conf/model/{lamer,hyde,
query2doc}.yaml``). What differs from the papers: the LLM (offline: SmolLM2-135M-Instruct, not
GPT-3.5 / InstructGPT), zero-shot prompts for query2doc (the paper: 4 MS MARCO examples), and the
prompt wording (paraphrased: ``conf/model/*.yaml`` hold them). Demonstration passages are cut to
``passage_chars`` characters to bound the prompt. Nothing the LLM writes is executed: its text only
becomes BM25 query terms, and an empty or malformed generation leaves the original query.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("drlab")


def build_prompt(template: str, query: str, demos: list[str], passage_chars: int) -> str:
    numbered = "\n".join(f"{i}. {d[: int(passage_chars)].strip()}" for i, d in enumerate(demos, 1))
    return template.format(query=query, passages=numbered)


def expanded_query(query: str, texts: list[str], query_repeat: int) -> str:
    return " ".join([query] * int(query_repeat) + [t.replace("\n", " ") for t in texts if t.strip()])


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Generations already written (a torn last line from a kill is ignored)."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["qid"]] = rec
    return done


def generate_all(llm, prompts: dict[str, str], n: int, path: Path, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Generate for every query in fixed batches, appending each finished batch to ``path`` (JSONL).

    A batch is the same slice of the sorted query ids in every run and is seeded by its index, so a
    killed run resumes at the first batch with a missing query and ends with the texts an
    uninterrupted run writes.
    """
    from tqdm.auto import tqdm

    qids = sorted(prompts)
    bs = int(getattr(llm, "batch_size", 1))
    done = read_done(path)
    batches = [qids[i:i + bs] for i in range(0, len(qids), bs)]
    todo = [(b, chunk) for b, chunk in enumerate(batches) if any(q not in done for q in chunk)]
    if done and todo:
        log.info("[expand] resuming: %d of %d queries already generated; starting at query %s (batch %d)",
                 sum(q in done for q in qids), len(qids), todo[0][1][0], todo[0][0])
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(qids), initial=len(qids) - sum(len(c) for _, c in todo), desc="expand", unit="q",
               disable=not progress, mininterval=2)
    t0, n_done = time.perf_counter(), 0
    with open(path, "a", encoding="utf-8") as fh:
        for b, chunk in todo:
            texts, errors = llm.generate([prompts[q] for q in chunk], n, batch_seed=b)
            for q, t, e in zip(chunk, texts, errors):
                done[q] = {"qid": q, "texts": t, "error": e}
                fh.write(json.dumps(done[q]) + "\n")
            fh.flush()
            bar.update(len(chunk))
            n_done += len(chunk)
            bar.set_postfix(s_per_q=f"{(time.perf_counter() - t0) / n_done:.2f}")
    bar.close()
    return {q: done[q] for q in qids}
