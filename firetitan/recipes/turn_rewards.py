"""Pure credit assignment for multi-turn RL: IGPO information gains and advantages, distillation advantages.

IGPO (Wang et al., arXiv 2510.14967): the policy's probability of the ground-truth answer `a` given the
conversation so far is `pi(a | ctx) = exp(mean_j log pi(a_j | ctx, a_<j))`. A turn's reward is the
information gain `pi(a | ctx after the turn) - pi(a | ctx before it)`; the last turn's reward is the
outcome reward instead. All turn rewards of a group are z-normalised together, and a turn's advantage
is the discounted sum of the normalised rewards from that turn on (gamma = 1: the plain sum).

On-policy distillation (as tinker-cookbook's): the per-token advantage is the negative reverse-KL
estimate on the student's own sample, `coef * (log p_teacher(x) - log p_student(x))`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def answer_probability(answer_logprobs: Sequence[float]) -> float:
    """Geometric-mean token probability of the teacher-forced answer."""
    if not answer_logprobs:
        raise ValueError("answer_logprobs: the ground-truth answer has no tokens")
    return math.exp(sum(answer_logprobs) / len(answer_logprobs))


def igpo_turn_rewards(probabilities: Sequence[float], outcome: float) -> list[float]:
    """Turn rewards of one trajectory with T turns.

    `probabilities[k]` is pi(a | prompt of turn k) for k = 0..T-1 (the context *before* turn k). Turn
    k < T-1 gets `probabilities[k+1] - probabilities[k]`; the last turn gets `outcome`.
    """
    if not probabilities:
        raise ValueError("probabilities: a trajectory needs at least one turn")
    gains = [probabilities[k + 1] - probabilities[k] for k in range(len(probabilities) - 1)]
    return [*gains, float(outcome)]


def igpo_advantages(group: Sequence[Sequence[float]], *, gamma: float = 1.0, eps: float = 1e-6) -> list[list[float]]:
    """Per-turn advantages of a group of trajectories from their turn rewards.

    Every reward of every trajectory in the group is z-normalised with the group's pooled mean and std;
    then turn t's advantage is `sum_{k >= t} gamma^(k-t) * normalised_k` within its trajectory.
    A group whose rewards are all equal gets all-zero advantages.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: must be in [0, 1], got {gamma}")
    pooled = [float(r) for rs in group for r in rs]
    if not pooled:
        return [[] for _ in group]
    mean = sum(pooled) / len(pooled)
    std = math.sqrt(sum((r - mean) ** 2 for r in pooled) / len(pooled))
    if std <= 1e-12:
        return [[0.0] * len(rs) for rs in group]
    out = []
    for rs in group:
        norm = [(float(r) - mean) / (std + eps) for r in rs]
        adv, acc = [0.0] * len(norm), 0.0
        for k in range(len(norm) - 1, -1, -1):
            acc = norm[k] + gamma * acc
            adv[k] = acc
        out.append(adv)
    return out


def distill_advantages(student_logprobs: Sequence[float], teacher_logprobs: Sequence[float], *,
                       coef: float = 1.0) -> list[float]:
    """`coef * (teacher - student)` per sampled token: the negative per-token reverse KL estimate."""
    if len(student_logprobs) != len(teacher_logprobs):
        raise ValueError(f"teacher_logprobs: {len(teacher_logprobs)} values for {len(student_logprobs)} "
                         f"student tokens")
    return [coef * (float(t) - float(s)) for s, t in zip(student_logprobs, teacher_logprobs, strict=True)]


def reverse_kl(student_logprobs: Sequence[float], teacher_logprobs: Sequence[float]) -> float:
    """Mean per-token reverse-KL estimate `log p_student - log p_teacher` over the student's samples."""
    if not student_logprobs:
        return 0.0
    return sum(float(s) - float(t) for s, t in zip(student_logprobs, teacher_logprobs, strict=True)) / len(
        student_logprobs)
