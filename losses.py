"""
The circuit-breaker losses of Representation Rerouting (Zou et al. 2024), written to follow the original
recipe's compute_loss step by step, plus its dual coefficient schedule and the diagnostics the trainer logs.

Pure tensor functions: hidden states in, scalars out. Nothing here touches the model or the optimizer.
Shapes: hidden states are stacked (L, B, T, D) as model(..., hidden=True) returns them (or a subset of
layers); masks are (B, T), 1 where a position counts, 0 elsewhere (padding, or tokens outside the mask).

Two facts about the original worth knowing before changing anything here:

1. The retain loss masks the *states*, takes the L2 norm of their difference per position, and averages with
   nanmean over every (layer, batch, position), padded ones included: a padded position contributes a
   distance of exactly 0 and still counts in the denominator. That is NOT sum / number-of-real-tokens once a
   batch has padding; the two differ by the factor sum(mask) / (B*T), which changes from batch to batch with
   the amount of padding (a batch of mostly padding gets a smaller retain loss for the same per-token drift).
   An audit of a similar implementation called the two equivalent; they are equivalent only without padding.
   nanocb follows the original (tests/test_losses.py pins both facts); retain_diagnostics reports the
   per-real-token mean beside it.
2. The rerouting loss divides by the mask count over the target layers, L * sum(mask), so it is a true mean
   of ReLU(cosine) over masked positions: 1 at the start (B = 0), 0 when every masked state is orthogonal or
   opposed to the frozen one.
"""

import torch
import torch.nn.functional as F


def _check(lora_h, frozen_h, mask, what):
    if lora_h.shape != frozen_h.shape or lora_h.dim() != 4:
        raise ValueError(f"{what}: hidden states must both be (L, B, T, D), "
                         f"got {tuple(lora_h.shape)} and {tuple(frozen_h.shape)}")
    if tuple(mask.shape) != tuple(lora_h.shape[1:3]):
        raise ValueError(f"{what}: mask must be (B, T) = {tuple(lora_h.shape[1:3])}, got {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise ValueError(f"{what}: the mask is empty (no position to train on in this batch)")


def _wide(h):
    # float32, the original's accumulation dtype for norms, or the states' own dtype when wider (float64 tests)
    return torch.promote_types(h.dtype, torch.float32)


def _unit(h):
    # the original divides by a norm computed in float32, so bf16 states come out as float32 unit vectors;
    # the clamp only matters for an all-zero state, where the original would produce NaN
    return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=_wide(h)).clamp_min(1e-12)


def rerouting_loss(lora_h, frozen_h, mask):
    """
    Mean over masked positions and target layers of ReLU(cos(lora state, frozen state)).
    lora_h, frozen_h: (L_target, B, T, D); mask: (B, T). Returns a float32 (float64 states: float64) scalar.
    """
    _check(lora_h, frozen_h, mask, "rerouting loss")
    m = mask.to(_wide(lora_h))[None, :, :, None]  # (1, B, T, 1), broadcast over layers and D
    cos = (_unit(lora_h) * _unit(frozen_h) * m).sum(dim=-1)  # (L, B, T)
    return torch.relu(cos).sum() / (lora_h.shape[0] * m.sum())


def retain_loss(lora_h, frozen_h, mask, weight=None):
    """
    nanmean over (L, B, T) of ||lora_h * m - frozen_h * m||_2 (norm over D in float32), as the original.
    lora_h, frozen_h: (L_all, B, T, D), every stacked hidden state; mask: (B, T). Padded positions count in the
    mean with distance 0 (see the module docstring). weight: None (the original) or (B, T) per-position
    factors on the distance before the mean (train_cb.py's retain_call_weight: the benign calls count more).
    """
    _check(lora_h, frozen_h, mask, "retain loss")
    m = mask.to(lora_h.dtype)[None, :, :, None]  # the states' dtype, so a bf16 difference stays bf16 as in the original
    dist = torch.linalg.vector_norm(lora_h * m - frozen_h * m, dim=-1, dtype=_wide(lora_h))  # (L, B, T)
    if weight is not None:
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"retain loss: weight must be (B, T) = {tuple(mask.shape)}, got {tuple(weight.shape)}")
        dist = dist * weight.to(dist.dtype)[None]
    return dist.nanmean()


def pull_distance(lora_h, frozen_h):
    """Summed L2 distance (norm over D, in float32 or wider) between gathered states: lora_h, frozen_h (L, N, D),
    the injected sample's states at its call positions and its clean twin's frozen states at the same call
    positions; divided by L here, by the step's position count in the trainer."""
    if lora_h.shape != frozen_h.shape or lora_h.dim() != 3:
        raise ValueError(f"pull: states must both be (L, N, D), got {tuple(lora_h.shape)} and {tuple(frozen_h.shape)}")
    return torch.linalg.vector_norm(lora_h - frozen_h, dim=-1, dtype=_wide(lora_h)).sum() / lora_h.shape[0]


def coefficients(step, max_steps, alpha, decay_multiplier=2.0):
    """
    The dual schedule (c_rr, c_retain): rerouting weight decays linearly, retain weight grows linearly, both
    reaching/leaving alpha at step = decay_multiplier * max_steps. The original hard-codes progress = step/300
    for a 150-step run, i.e. decay_multiplier 2.0, so training ends with c_rr = c_retain = alpha/2. Note that
    the original increments its step counter before use: its first optimisation step already has step = 1.
    """
    if not alpha >= 0:
        raise ValueError(f"lorra alpha must be >= 0, got {alpha!r}")
    if not max_steps > 0:
        raise ValueError(f"max_steps must be positive, got {max_steps!r}")
    if not decay_multiplier > 0:
        raise ValueError(f"alpha decay multiplier must be positive, got {decay_multiplier!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    progress = step / (decay_multiplier * max_steps)
    return float(alpha * max(0.0, 1.0 - progress)), float(alpha * min(1.0, progress))


@torch.no_grad()
def rerouting_diagnostics(lora_h, frozen_h, mask):
    """
    Over masked positions of the target layers: cos_mean (mean cosine, the original's cb_cos_sim),
    cos_pos_share (share of positions whose cosine is still > 0: ReLU still pushes them), and the mean
    activation norms lora_norm / frozen_norm (rerouting may shrink or blow up the states); n, the number of
    (layer, position) pairs behind the means (merge_diagnostics weighs micro-batches by it).
    Also serves as the validation cosine on held-out harmful samples.
    """
    _check(lora_h, frozen_h, mask, "rerouting diagnostics")
    wide = _wide(lora_h)
    m = mask.to(wide)[None].expand(lora_h.shape[:3])  # (L, B, T)
    n = m.sum()
    cos = F.cosine_similarity(lora_h.to(wide), frozen_h.to(wide), dim=-1)
    lora_norm = torch.linalg.vector_norm(lora_h, dim=-1, dtype=wide)
    frozen_norm = torch.linalg.vector_norm(frozen_h, dim=-1, dtype=wide)
    return dict(
        cos_mean=((cos * m).sum() / n).item(),
        cos_pos_share=(((cos > 0).float() * m).sum() / n).item(),
        lora_norm=((lora_norm * m).sum() / n).item(),
        frozen_norm=((frozen_norm * m).sum() / n).item(),
        n=n.item(),
    )


@torch.no_grad()
def retain_diagnostics(lora_h, frozen_h, mask):
    """Over real (masked) positions of all layers: l2 (mean L2 distance per token), cos (mean cosine), and n
    (the number of (layer, position) pairs)."""
    _check(lora_h, frozen_h, mask, "retain diagnostics")
    wide = _wide(lora_h)
    m = mask.to(wide)[None].expand(lora_h.shape[:3])  # (L, B, T)
    n = m.sum()
    l2 = torch.linalg.vector_norm(lora_h.to(wide) - frozen_h.to(wide), dim=-1)
    cos = F.cosine_similarity(lora_h.to(wide), frozen_h.to(wide), dim=-1)
    return dict(l2=((l2 * m).sum() / n).item(), cos=((cos * m).sum() / n).item(), n=n.item())


def merge_diagnostics(parts):
    """Diagnostics of several micro-batches (dicts from the functions above) as those of their union: each
    mean weighted by its n. No parts gives {}."""
    n = sum(p["n"] for p in parts)
    return {k: sum(p[k] * p["n"] for p in parts) / n for k in parts[0] if k != "n"} if parts else {}
