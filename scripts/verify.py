"""Check reproductions against the reference registry (``conf/reproductions.yaml``).

    python -m scripts.verify                 # every entry this machine can run within --budget
    python -m scripts.verify --quick         # the entries that take minutes (BM25, MiniLM)
    python -m scripts.verify --only bm25-flat-scifact dpr-scifact
    python -m scripts.verify --list          # every entry, what it needs, and whether it runs here
    python -m scripts.verify --readme        # print the README's results table from the registry
    python -m scripts.verify --only bm25-flat-scifact --override pipeline.bm25.k1=1.2   # must fail

Each runnable entry is run as ``python run.py <command> name=verify-<entry>`` (the stage cache
makes a second verification nearly free, and ``verify=true`` re-hashes every cached artifact it
reuses), and its metric is compared with the expected value: ``|got - expected| <= tolerance``.
Prints ``entry | expected | got | delta | status`` and writes the same table to
``outputs/tables/verify.md``; exits 1 if any entry fails. An entry that cannot run here is
``skipped`` with what it needs (a GPU, weights or data that are not on this machine, or more than
the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
REGISTRY = REPO / "conf" / "reproductions.yaml"
#: budgets, cheapest first: an entry runs when its cost is within the chosen budget
COSTS = ("cpu-minutes", "cpu-hours", "gpu-hours", "cluster")
README_BEGIN, README_END = "<!-- registry:begin (python -m scripts.verify --readme) -->", "<!-- registry:end -->"


def load_registry(path: Path = REGISTRY) -> list[dict]:
    entries = yaml.safe_load(path.read_text())["entries"]
    names = [e["name"] for e in entries]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"error: {path}: duplicate entry names {sorted(dupes)}")
    for e in entries:
        missing = [k for k in ("name", "data", "split", "metric", "expected", "tolerance", "provenance", "cost")
                   if k not in e]
        if missing:
            raise SystemExit(f"error: {path}: entry '{e.get('name')}' lacks {missing}")
        if e["cost"] not in COSTS:
            raise SystemExit(f"error: {path}: entry '{e['name']}' cost '{e['cost']}'; valid: {', '.join(COSTS)}")
        if "command" not in e and "experiment" not in e:
            raise SystemExit(f"error: {path}: entry '{e['name']}' has neither command nor experiment")
        if e.get("measured_in", "fp32") != "fp32":
            raise SystemExit(f"error: {path}: entry '{e['name']}' measured_in '{e['measured_in']}'; valid: fp32 "
                             "(leave it out for a row measured with the defaults)")
    return entries


#: what ``measured_in: fp32`` adds: the defaults every row measured before ``precision: auto`` (2026-11-30)
#: ran with, so the row reproduces what was measured on any hardware. A setting the entry's own command
#: makes (the MiniLM pre-training rows fine-tune with ``pipeline.retriever1.precision=bf16``) was no
#: default then and stays as the command says.
FP32 = ["precision=fp32", "backend=torch",
        *(f"pipeline.{s}.precision=fp32" for s in ("retriever1", "retriever2", "distill"))]


def command_of(e: dict) -> list[str]:
    """The run.py overrides of an entry (an ``experiment`` entry is ``experiment=<name>`` + its command)."""
    command = ([f"experiment={e['experiment']}"] if e.get("experiment") else []) + list(e.get("command") or [])
    own = {a.split("=", 1)[0].lstrip("+~") for a in command}
    pins = [p for p in FP32 if p.split("=", 1)[0] not in own] if e.get("measured_in") == "fp32" else []
    return command + pins


def why_not(e: dict, budget: str, data_dir: Path) -> str | None:
    """Why the entry cannot run on this machine within ``budget`` (None: it can)."""
    if COSTS.index(e["cost"]) > COSTS.index(budget):
        return f"needs {e['cost']} (budget: {budget}; --budget {e['cost']})"
    for need in e.get("needs") or []:
        kind, _, what = need.partition(":")
        if kind == "gpu":
            import torch

            if not torch.cuda.is_available():
                return "needs a GPU"
        elif kind == "weights":
            from retrievers.hub import resolve_model

            try:
                resolve_model(what, {})
            except Exception:  # noqa: BLE001  any failure means: not here
                return f"needs weights {what} (not installable offline)"
        elif kind == "data":
            if not (data_dir / what).exists():
                return f"needs data {what} (not in {data_dir})"
        else:
            raise SystemExit(f"error: entry '{e['name']}' needs '{need}'; kinds: gpu, weights:<id>, data:<dir>")
    where = e.get("data_path", e["data"])  # the dataset's directory under data_dir (STS sets: sts/<set>)
    if not (data_dir / where).exists():
        return f"needs data {where} (not in {data_dir})"
    return None


def run_entry(e: dict, outputs: Path, verify_cache: bool, extra: list[str] = ()) -> tuple[float | None, float, str]:
    args = [sys.executable, str(REPO / "run.py"), *command_of(e), *extra, f"name=verify-{e['name']}"]
    if verify_cache:
        args.append("verify=true")
    env = dict(os.environ, DRLAB_OUTPUT_DIR=str(outputs))
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, seconds, (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]
    summary = Path(proc.stdout.strip().splitlines()[-1].split("summary: ", 1)[1])
    metrics = json.loads(summary.read_text())["metrics"]
    key = e.get("key") or f"{e['split']}/{e['metric']}"
    if key not in metrics:
        return None, seconds, f"no metric {key} in {summary} (has {sorted(metrics)[:6]} ...)"
    return float(metrics[key]), seconds, ""


def table(rows: list[dict]) -> str:
    lines = ["| entry | metric | expected | got | delta | status | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        got = "-" if r["got"] is None else f"{r['got']:.4f}"
        delta = "-" if r["got"] is None else f"{r['got'] - r['expected']:+.4f}"
        lines.append(f"| {r['name']} | {r['metric']} | {r['expected']:.4f} ± {r['tolerance']:g} | {got} | {delta} | "
                     f"{r['status']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def environment() -> str:
    """The commit and package versions a table was measured with (a row that moves names its cause)."""
    from pipelines.provenance import git_state, package_versions

    g = git_state()
    commit = (g.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if g.get("dirty") else "")
    return f"commit {commit}; " + ", ".join(f"{k} {v}" for k, v in package_versions().items())


def write_table(out: Path, rows: list[dict], budget: str, partial: bool = False) -> str:
    text = table(rows)
    state = ", in progress" if partial else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# dr-lab verify ({time.strftime('%Y-%m-%d %H:%M')}, budget {budget}{state})\n\n"
                   f"Environment: {environment()}\n\n{text}\n")
    return text


def readme_table(entries: list[dict]) -> str:
    """The README's registry table: every entry, its expected number, provenance and cost."""
    lines = [README_BEGIN, "", "| entry | data (split) | metric | expected | source | runs on |", "|---|---|---|---|---|---|"]
    for e in entries:
        p = e["provenance"]
        src = p["source"] + (f": {p['ref']}" if p.get("ref") else "")
        needs = ", ".join([e["cost"], *(e.get("needs") or [])])
        lines.append(f"| `{e['name']}` | {e['data']} ({e['split']}) | {e['metric']} | {e['expected']:.4f} "
                     f"± {e['tolerance']:g} | {src} | {needs} |")
    return "\n".join([*lines, "", README_END])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only entries of cost cpu-minutes")
    ap.add_argument("--budget", choices=COSTS, default="cpu-hours", help="the most expensive cost to run")
    ap.add_argument("--only", nargs="+", help="these entries (by name)")
    ap.add_argument("--list", action="store_true", help="list the entries and whether each runs here")
    ap.add_argument("--readme", action="store_true", help="print the README's registry table")
    ap.add_argument("--override", nargs="+", default=[], help="run.py overrides added to every entry run (a check "
                    "that the registry catches a changed hyperparameter)")
    ap.add_argument("--no-verify-cache", action="store_true", help="do not re-hash the cached artifacts reused")
    ap.add_argument("--outputs", type=Path, default=Path(os.environ.get("DRLAB_OUTPUT_DIR", REPO / "outputs")))
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DRLAB_DATA_DIR", REPO / "data")))
    a = ap.parse_args(argv)
    entries = load_registry()
    if a.readme:
        print(readme_table(entries))
        return 0
    budget = "cpu-minutes" if a.quick else a.budget
    if a.only:
        unknown = sorted(set(a.only) - {e["name"] for e in entries})
        if unknown:
            raise SystemExit(f"error: unknown entries {unknown}; see python -m scripts.verify --list")
        entries = [e for e in entries if e["name"] in a.only]
    rows, t0 = [], time.perf_counter()
    out = a.outputs / "tables" / ("verify-quick.md" if a.quick else "verify.md")
    for e in entries:
        row = {k: e[k] for k in ("name", "metric", "expected", "tolerance")} | {"got": None, "seconds": 0.0}
        reason = why_not(e, budget, a.data_dir)
        if a.list:
            print(f"{e['name']:<40} {e['cost']:<12} {'runs here' if reason is None else 'skipped: ' + reason}")
            continue
        if reason is not None:
            row["status"] = f"skipped ({reason})"
        else:
            print(f"[verify] {e['name']}: python run.py {' '.join(command_of(e))}", flush=True)
            got, row["seconds"], err = run_entry(e, a.outputs, not a.no_verify_cache, a.override)
            row["got"] = got
            if got is None:
                row["status"] = f"fail (run failed: {err})"
            else:
                row["status"] = "pass" if abs(got - e["expected"]) <= e["tolerance"] + 1e-12 else "fail"
        rows.append(row)
        print(f"[verify] {row['name']}: {row['status']}", flush=True)
        if reason is None:  # the table so far, so a killed verify keeps what it measured
            write_table(out, rows, budget, partial=True)
    if a.list:
        return 0
    text = write_table(out, rows, budget)
    print(text)
    failed = [r["name"] for r in rows if r["status"].startswith("fail")]
    print(f"table: {out}")
    print(f"verify: {sum(r['status'] == 'pass' for r in rows)} passed, {len(failed)} failed, "
          f"{sum(r['status'].startswith('skipped') for r in rows)} skipped in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
