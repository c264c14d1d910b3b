"""Knowledge-distillation losses for bi-encoder students (the ``distill`` stage).

Scores are logits: a student's ``q . d / temperature`` and a teacher's raw score (cross-
encoder logit, ColBERT MaxSim) divided by its own temperature. Every loss takes plain
tensors, so it can be checked by hand.

* :func:`kl_teacher_student` -- ``KL(p_teacher || p_student)`` over each row's candidates;
  zero exactly when the two distributions match.
* :func:`simlm_loss` -- SimLM (Wang et al., ACL 2023, "SimLM: Pre-training with
  Representation Bottleneck for Dense Passage Retrieval"), Retriever_distill: KL over each
  query's group (positive + hard negatives) scored by the cross-encoder re-ranker, plus
  ``alpha`` times the contrastive loss (paper: alpha 0.2, student temperature 0.02 on cosine).
* :func:`tct_inbatch_kd` -- TCT-ColBERT (Lin, Yang & Lin, RepL4NLP 2021, "In-Batch Negatives
  for Knowledge Distillation with Tightly-Coupled Teachers for Dense Retrieval"): the ColBERT
  teacher scores *every* query-passage pair of the batch (N queries x all passages), the
  student matches the teacher's softmax over the whole batch row; in the paper the final
  loss mixes this KD term with the student's own cross-entropy (``gamma``).
* :func:`margin_mse` -- Margin-MSE (Hofstätter et al. 2020, "Improving Efficient Neural
  Ranking Models with Cross-Architecture Knowledge Distillation"): the student's margin
  ``s(q, d+) - s(q, d-)`` regresses onto the teacher's, for every negative of the group.
"""

from __future__ import annotations

import torch
from torch import nn


def kl_teacher_student(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(teacher) || softmax(student))``; ``mask`` True = excluded."""
    if mask is not None:
        student = student.masked_fill(mask, float("-inf"))
        teacher = teacher.masked_fill(mask, float("-inf"))
    log_s = nn.functional.log_softmax(student, dim=-1)
    log_t = nn.functional.log_softmax(teacher, dim=-1)
    p_t = log_t.exp()
    terms = p_t * (log_t - log_s)
    terms = torch.where(p_t > 0, terms, torch.zeros_like(terms))  # 0 log 0 = 0 (masked columns)
    return terms.sum(dim=-1).mean()


def group_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Each query's own group from an in-batch score matrix [N, N*group] -> [N, group]."""
    n = scores.shape[0]
    idx = torch.arange(n, device=scores.device)[:, None] * group + torch.arange(group, device=scores.device)
    return scores.gather(1, idx)


def simlm_loss(
    scores: torch.Tensor, teacher_group: torch.Tensor, group: int, alpha: float = 0.2,
    teacher_temperature: float = 1.0, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimLM's ``KL(teacher || student)`` over each group + ``alpha`` x InfoNCE over the batch.

    ``scores``: student logits [N, N*group] (positive of row i in column i*group);
    ``teacher_group``: teacher scores [N, group] for the same candidates, positive first.
    """
    student_group = group_scores(scores, group)
    kl = kl_teacher_student(student_group, teacher_group / teacher_temperature)
    targets = torch.arange(scores.shape[0], device=scores.device) * group
    logits = scores if mask is None else scores.masked_fill(mask, float("-inf"))
    ce = nn.functional.cross_entropy(logits, targets)
    return kl + alpha * ce


def tct_inbatch_kd(
    scores: torch.Tensor, teacher_scores: torch.Tensor, teacher_temperature: float = 1.0,
    gamma: float = 0.0, group: int = 1,
) -> torch.Tensor:
    """TCT-ColBERT: KL over all N x (N*group) in-batch pairs + ``gamma`` x the student's CE."""
    if scores.shape != teacher_scores.shape:
        raise ValueError(f"student scores {tuple(scores.shape)} != teacher scores {tuple(teacher_scores.shape)}")
    loss = kl_teacher_student(scores, teacher_scores / teacher_temperature)
    if gamma:
        targets = torch.arange(scores.shape[0], device=scores.device) * group
        loss = loss + gamma * nn.functional.cross_entropy(scores, targets)
    return loss


def margin_mse(student_group: torch.Tensor, teacher_group: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher margins ``s(q,d+) - s(q,d-)`` ([N, 1 + negatives] each)."""
    s = student_group[:, :1] - student_group[:, 1:]
    t = teacher_group[:, :1] - teacher_group[:, 1:]
    return nn.functional.mse_loss(s, t)


# --------------------------------------------------------------------------- the distill stage's `_target_`s
# conf/loss/*.yaml. ``teacher_input`` says what the teacher gives: ``group`` = the teacher's scores of
# each query's group (positive first), read from the rerank stage's teacher_scores.jsonl; ``batch`` =
# the teacher model scores every query x passage pair of the batch on the fly ([N, N*group]).


class GroupKL:
    """SimLM's Retriever_distill: :func:`simlm_loss` (KL over the group + ``alpha`` x InfoNCE)."""

    teacher_input = "group"

    def __init__(self, alpha: float, teacher_temperature: float):
        self.alpha, self.teacher_temperature = float(alpha), float(teacher_temperature)

    def __call__(self, scores: torch.Tensor, teacher: torch.Tensor, batch) -> torch.Tensor:
        return simlm_loss(scores, teacher, batch.group, self.alpha, self.teacher_temperature, batch.mask(scores.device))


class MarginMSE:
    """Margin-MSE over each query's group: :func:`margin_mse`."""

    teacher_input = "group"

    def __call__(self, scores: torch.Tensor, teacher: torch.Tensor, batch) -> torch.Tensor:
        return margin_mse(group_scores(scores, batch.group), teacher)


class InBatchKD:
    """TCT-ColBERT's in-batch KD: :func:`tct_inbatch_kd` against the teacher's [N, N*group] scores."""

    teacher_input = "batch"

    def __init__(self, teacher_temperature: float, gamma: float):
        self.teacher_temperature, self.gamma = float(teacher_temperature), float(gamma)

    def __call__(self, scores: torch.Tensor, teacher: torch.Tensor, batch) -> torch.Tensor:
        return tct_inbatch_kd(scores, teacher, self.teacher_temperature, self.gamma, batch.group)
