"""Shared fixtures: a tiny BEIR dataset on disk and Hydra composition of conf/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

if str(REPO) not in sys.path:  # `import run` (run.py lives at the repository root)
    sys.path.insert(0, str(REPO))

import pipelines.runner  # noqa: E402,F401  registers the ${drlab_root:} resolver

# Twelve documents, each about one distinct topic, so a query built from one
# document's rare words has exactly one clearly best match.
TINY_DOCS = [
    ("d1", "Volcanoes", "Basaltic lava flows from shield volcanoes in Hawaii erupt gently."),
    ("d2", "Penguins", "Emperor penguins huddle through the Antarctic winter to keep warm."),
    ("d3", "Sourdough", "A sourdough starter ferments flour and water with wild yeast."),
    ("d4", "Chess", "The Sicilian defence is a sharp reply to the king pawn opening."),
    ("d5", "Glaciers", "Glaciers carve U-shaped valleys as the ice slowly grinds the rock."),
    ("d6", "Bees", "Honeybees communicate the direction of nectar with a waggle dance."),
    ("d7", "Telescopes", "Refracting telescopes use lenses while reflecting telescopes use mirrors."),
    ("d8", "Coffee", "Arabica coffee beans are roasted to develop aroma and bitterness."),
    ("d9", "Tides", "Ocean tides rise and fall under the gravitational pull of the moon."),
    ("d10", "Origami", "Origami cranes are folded from a single square sheet of paper."),
    ("d11", "Cheese", "Cheddar cheese is aged for months in cool caves to sharpen its flavour."),
    ("d12", "Rivers", "The river delta spreads sediment across a wide fertile floodplain."),
]

TINY_QUERIES = [
    ("q1", "waggle dance of honeybees"),
    ("q2", "emperor penguins antarctic winter"),
    ("q3", "sourdough starter wild yeast"),
    ("q4", "ocean tides and the moon"),
    ("q5", "origami crane square paper"),
    ("q6", "glaciers carve valleys"),
]

# query -> relevant doc (the one whose words it uses)
TINY_TEST_QRELS = {"q1": {"d6": 1}, "q2": {"d2": 1}, "q3": {"d3": 2}, "q4": {"d9": 1}}
TINY_TRAIN_QRELS = {"q5": {"d10": 1}, "q6": {"d5": 1}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_qrels(path: Path, qrels: dict[str, dict[str, int]], header: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += [f"{q}\t{d}\t{r}" for q, docs in qrels.items() for d, r in docs.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_tiny_beir(root: Path) -> Path:
    """Write the tiny BEIR dataset into ``root`` (created) and return it."""
    write_jsonl(root / "corpus.jsonl", [{"_id": d, "title": t, "text": x} for d, t, x in TINY_DOCS])
    write_jsonl(root / "queries.jsonl", [{"_id": q, "text": t} for q, t in TINY_QUERIES])
    write_qrels(root / "qrels" / "test.tsv", TINY_TEST_QRELS)
    write_qrels(root / "qrels" / "train.tsv", TINY_TRAIN_QRELS)
    return root


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    """``tmp_path/data/tiny``: a BEIR dataset named ``tiny`` (12 docs, 6 queries)."""
    return make_tiny_beir(tmp_path / "data" / "tiny")


def tiny_data_cfg(root: Path, **extra) -> dict:
    """The resolved ``data`` node that load_dataset expects, for a BEIR dir."""
    cfg = {
        "name": root.name,
        "format": "beir",
        "path": str(root),
        "url": None,
        "train_split": None,
        "eval_split": "test",
        "strict": False,
    }
    cfg.update(extra)
    return cfg


def compose(overrides: list[str], tmp_path: Path, data_dir: Path | None = None):
    """Compose conf/config.yaml with ``overrides``; outputs under ``tmp_path/outputs``.

    ``paths.data_dir`` is ``data_dir`` or, by default, ``tmp_path/data`` (where
    :func:`tiny_beir` puts ``tiny/``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    data_dir = Path(data_dir) if data_dir is not None else tmp_path / "data"
    full = [
        *overrides,
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={data_dir}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=full)


def component(overrides: list[str], node: str, **kw):
    """Instantiate the config node ``node`` (e.g. ``model.encoder`` of ``model=pretrained``) with ``kw``
    on top: builders take no defaults, so a test gets the YAML's values for what it does not set."""
    import tempfile

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(overrides, Path(tempfile.gettempdir()) / "drlab-component")
    return instantiate({**OmegaConf.to_container(OmegaConf.select(cfg, node), resolve=True), **kw})


@pytest.fixture
def compose_cfg():
    """``compose_cfg(overrides, tmp_path, data_dir=None)`` -> composed DictConfig."""
    return compose


def tiny_overrides() -> list[str]:
    return ["model=bm25", "data=beir", "data.name=tiny", "debug=tiny"]


def make_tiny_bert(out: Path, texts: list[str], hidden: int = 32, seed: int = 0, punctuation: bool = False) -> Path:
    """A random 2-layer BERT with a WordPiece vocab of ``texts``' words, saved as an HF directory.

    ``punctuation``: the vocab also holds every punctuation character (and BERT's ``[unused0..1]``).
    """
    import inspect
    import re

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in texts for w in re.findall(r"\w+", t.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    if punctuation:
        import string

        vocab += ["[unused0]", "[unused1]", *string.punctuation]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    kw = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tok = BertTokenizerFast(**{kw: str(out / "vocab.txt")})
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_texts(root: Path) -> list[str]:
    """Every title, text and query of a BEIR dataset directory."""
    texts = []
    for name in ("corpus.jsonl", "queries.jsonl"):
        for line in (root / name).read_text().splitlines():
            o = json.loads(line)
            texts.append(f"{o.get('title', '')} {o['text']}")
    return texts


def make_tiny_lm(out: Path) -> Path:
    """A random 1-layer Llama over the tiny BERT's WordPiece vocabulary (no chat template): the stand-in
    for SmolLM2 in the expand stage's tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    bert = make_tiny_bert(out / "bert", [f"{t} {x}" for _, t, x in TINY_DOCS] + [q for _, q in TINY_QUERIES])
    tok = AutoTokenizer.from_pretrained(bert)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")
    return out / "lm"


def tiny_llm_overrides(lm: Path) -> list[str]:
    """model.llm -> the tiny LM directory instead of the packaged GGUF, a few tokens per text."""
    return [f"model.llm.checkpoint={lm}", "model.llm.package=null", "model.llm.package_version=null",
            "model.llm.gguf_file=null", "model.llm.max_new_tokens=4"]
