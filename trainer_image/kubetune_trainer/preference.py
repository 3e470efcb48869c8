"""Preference objectives beside DPO: ORPO and SimPO on preference pairs, KTO on unpaired good/bad replies.

Notation: for a prompt x and a reply y, log p(y) is the sum of the reply tokens' log-probabilities
(dpo.sequence_logps) and |y| the number of reply tokens; avg(y) = log p(y) / |y| is the
length-normalised log-probability. y_w is the chosen reply, y_l the rejected one.

ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference Model"), per pair:
    odds(y)  = P(y) / (1 - P(y))  with  P(y) = exp(avg(y))
    log OR   = log odds(y_w) - log odds(y_l) = (avg_w - avg_l) - (log(1 - e^avg_w) - log(1 - e^avg_l))
    loss     = -avg_w  +  lambda * -log sigmoid(log OR)
  -avg_w is the chosen reply's per-token NLL (the SFT term), so ORPO needs no SFT stage before it and
  no reference model. lambda is spec.orpo.beta, as TRL calls it.

SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
    loss = -log sigmoid(beta * avg_w - beta * avg_l - gamma),   gamma = beta * gammaBetaRatio
  The reward beta * avg(y) is the policy's own, length-normalised: no reference model, and no
  premium on long replies.

KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"), per example:
    r(x, y) = log pi(y | x) - log ref(y | x)
    z0      = max(0, mean over the batch of r(x_i, y'_i)),  y'_i another example's reply (mismatched),
              detached: the reference point, an estimate of KL(pi || ref), is not trained through
    desirable y:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable y: lambda_U * (1 - sigmoid(beta * (z0 - r)))
  The reference is the base model, the adapter switched off (dpo.reference_context). The mismatched
  replies come from the data (data.pair_mismatched), so z0 is the mean over each micro-batch's own
  mismatched pairs whatever its size.

Each `*_loss_sum` returns what dpo.dpo_loss_sum returns: the sum of the per-example losses of the
micro-batch, how many examples that is (the trainer's loss is their mean over the global batch),
and statistics for the log: reward_margin and reward_accuracy (chosen over rejected) for the paired
objectives; desirable_reward, undesirable_reward and kl for KTO.
"""

import math

import torch
import torch.nn.functional as F

from .data import IGNORE
from .dpo import both_sides, reference_context, sequence_logps

# log(1 - e^avg) is -inf when a reply is certain (avg = 0): ORPO's odds are taken at most this close to it.
MAX_AVERAGE_LOGP = -1e-6


def reply_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Tokens each sequence's log-probability sums over: labels past the first that are not masked."""
    return (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)


def average_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-normalised log-probabilities avg(y_w), avg(y_l) of a collate_preference batch."""
    chosen, rejected = both_sides(model, batch)
    return chosen / reply_lengths(batch["chosen_labels"]), rejected / reply_lengths(batch["rejected_labels"])


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurately at both ends: log(-expm1(x)) near 0, log1p(-e^x) far below it
    (Maechler, "Accurately computing log(1 - exp(-|a|))"). x is capped at MAX_AVERAGE_LOGP."""
    x = x.clamp(max=MAX_AVERAGE_LOGP)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses and the log odds ratios (detached)."""
    log_odds = (chosen_avg - rejected_avg) - (log1m_exp(chosen_avg) - log1m_exp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def simpo_losses(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma_beta_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and the reward margins beta * (avg_w - avg_l) (detached)."""
    margin = beta * (chosen_avg - rejected_avg)
    losses = -F.logsigmoid(margin - beta * gamma_beta_ratio)
    return losses, margin.detach()


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    mismatched_policy: torch.Tensor,
    mismatched_reference: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses, the implied rewards beta * r (detached) and the reference point z0."""
    ratio = policy - reference
    z0 = (mismatched_policy - mismatched_reference).mean().clamp(min=0).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, good, bad), (beta * ratio).detach(), z0


def paired_stats(margin: torch.Tensor) -> dict:
    return {"reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item()}


def orpo_loss_sum(model, batch: dict, beta: float) -> tuple[torch.Tensor, int, dict]:
    """ORPO over a collate_preference micro-batch: one forward pass, no reference."""
    chosen_avg, rejected_avg = average_logps(model, batch)
    losses, log_odds = orpo_losses(chosen_avg, rejected_avg, beta)
    stats = paired_stats(beta * (chosen_avg - rejected_avg).detach())
    stats.update(log_odds_ratio=log_odds.mean().item(), nll=-chosen_avg.detach().mean().item())
    return losses.sum(), losses.shape[0], stats


def simpo_loss_sum(model, batch: dict, beta: float, gamma_beta_ratio: float) -> tuple[torch.Tensor, int, dict]:
    """SimPO over a collate_preference micro-batch: one forward pass, no reference."""
    chosen_avg, rejected_avg = average_logps(model, batch)
    losses, margin = simpo_losses(chosen_avg, rejected_avg, beta, gamma_beta_ratio)
    return losses.sum(), losses.shape[0], paired_stats(margin)


def kto_loss_sum(
    model, batch: dict, beta: float, desirable_weight: float, undesirable_weight: float, reference_model=None
) -> tuple[torch.Tensor, int, dict]:
    """KTO over a collate_unpaired micro-batch. The policy's pass on the mismatched pairs runs without
    gradients (z0 is detached anyway); the reference scores both halves in one pass."""
    own = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    mismatched = {k: batch[f"kl_{k}"] for k in ("input_ids", "labels", "attention_mask")}
    with torch.no_grad():
        mismatched_policy = sequence_logps(model, **mismatched)
        with reference_context(model, reference_model) as reference:
            joined = {k: torch.cat([own[k], mismatched[k]]) for k in own}
            reference_logps = sequence_logps(reference, **joined)
    policy = sequence_logps(model, **own)
    half = policy.shape[0]
    losses, rewards, z0 = kto_losses(
        policy,
        reference_logps[:half],
        mismatched_policy,
        reference_logps[half:],
        batch["desirable"],
        beta,
        desirable_weight,
        undesirable_weight,
    )
    return losses.sum(), half, kto_stats(rewards, batch["desirable"], z0)


def kto_stats(rewards: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor) -> dict:
    """Mean implied reward of the good and of the bad replies (each only when the batch has some), and z0."""
    stats = {"kl": z0.item()}
    if desirable.any():
        stats["desirable_reward"] = rewards[desirable].mean().item()
    if (~desirable).any():
        stats["undesirable_reward"] = rewards[~desirable].mean().item()
    return stats
