"""Direct Preference Optimisation (Rafailov et al., 2023) against a frozen reference.

For adapter methods the reference is the base model itself: the same network with the adapter
switched off (PEFT's `disable_adapter()`), so DPO costs no second copy of the weights. A full
fine-tune needs an explicit frozen reference model.

Loss per pair, with margin m = beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]:
  sigmoid: -log sigmoid(m)         ipo: (m / beta - 1 / (2 beta))^2         hinge: max(0, 1 - m)
"""

import contextlib

import torch
import torch.nn.functional as F

from .acceleration import LOSS_KEYWORD, fused_loss


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the reply tokens (labels != -100), one value per sequence."""
    if fused_loss(model):  # token log-probabilities from the hidden states in chunks: no logits held
        request = {LOSS_KEYWORD: ("logps", labels)}
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **request).loss.sum(-1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, -labels.shape[1] :][:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def both_sides(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of chosen and rejected replies in one forward pass (concatenated batch)."""
    keys = ("input_ids", "labels", "attention_mask")
    joined = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}
    logps = sequence_logps(model, **joined)
    half = batch["chosen_input_ids"].shape[0]
    return logps[:half], logps[half:]


def preference_losses(
    policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor], beta: float, loss_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit reward margins (for logging and tests)."""
    chosen_ratio = policy[0] - reference[0]
    rejected_ratio = policy[1] - reference[1]
    margin = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margin)
    elif loss_type == "ipo":
        losses = (margin / beta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - margin)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return losses, margin.detach()


def reference_context(model, reference_model):
    """Run the reference: the same model without its adapter, or a separate frozen model."""
    if reference_model is not None:
        return contextlib.nullcontext(reference_model)
    return _adapter_disabled(model)


@contextlib.contextmanager
def _adapter_disabled(model):
    peft_model = model.module if hasattr(model, "module") else model
    with peft_model.disable_adapter():
        yield model


def dpo_loss_sum(
    model, batch: dict, beta: float, loss_type: str, reference_model=None
) -> tuple[torch.Tensor, int, dict]:
    """Sum of pair losses in this micro-batch, the number of pairs, and reward statistics."""
    with torch.no_grad(), reference_context(model, reference_model) as reference:
        reference_logps = both_sides(reference, batch)
    policy_logps = both_sides(model, batch)
    losses, margin = preference_losses(policy_logps, reference_logps, beta, loss_type)
    stats = {"reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item()}
    return losses.sum(), losses.shape[0], stats
