"""One SentEval-style STS table from finished runs: Spearman x 100 of the cosine per set, and their mean.

    python -m scripts.sts_table sgopt-minilm-sts cls-minilm-sts minilm-sts --out outputs/tables/sts.md

Each name is an experiment (``outputs/experiments/<name>.json``, the newest run of ``name=<name>``) of an
STS dataset (``data=sts`` for all seven sets). Columns are the sets its eval scored, in SentEval's order;
``avg`` is their mean (as in the SG-BERT and SimCSE tables). ``--metric spearman_wmean`` gives SentEval's
weighted mean over subsets for STS12-16 instead of the correlation over all pairs pooled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr"]
REPO = Path(__file__).resolve().parents[1]


def metrics_of(name: str, outputs: Path) -> dict[str, float]:
    ptr = outputs / "experiments" / f"{name}.json"
    if not ptr.exists():
        raise SystemExit(f"error: no experiment '{name}' ({ptr} is missing; run it with name={name})")
    return json.loads(Path(json.loads(ptr.read_text())["summary"]).read_text())["metrics"]


def table(names: list[str], outputs: Path, metric: str = "spearman") -> str:
    rows = {n: metrics_of(n, outputs) for n in names}
    sets = [s for s in ORDER if any(f"{s}/spearman" in m for m in rows.values())]
    out = ["| run | " + " | ".join(sets) + " | avg |", "|---" * (len(sets) + 2) + "|"]
    for n, m in rows.items():
        vals = [m.get(f"{s}/{metric}", m.get(f"{s}/spearman")) for s in sets]
        cells = [f"{100 * v:.2f}" if v is not None else "-" for v in vals]
        avg = f"{100 * sum(vals) / len(vals):.2f}" if all(v is not None for v in vals) else "-"
        out.append(f"| {n} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+")
    ap.add_argument("--metric", default="spearman", choices=["spearman", "spearman_wmean", "pearson"])
    ap.add_argument("--outputs", type=Path, default=REPO / "outputs")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    text = table(a.names, a.outputs, a.metric)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
