"""
One circuit-breaker training step: the function train_cb.py runs and bench.py times.

A step draws three sets of samples (train_cb.py decides which rows go where):
  harmful   injected prompts completed with the attacker's call: their states at the cb_mask positions of the
            target layers are pushed away from the frozen model's (rerouting, ReLU of the cosine -> 0);
  retain    benign requests and plain chat: every stacked state stays where the frozen model has it (L2);
  redirect  injected prompts completed with the user's own call: cross-entropy on that call, adapters on, so
            the injected agent still does the user's task instead of breaking (0 weight: the original recipe),
            optionally with an embedding-space adversary's vectors in a slot after the injection (adv_tokens);
            and/or the pull: the states that emit that call, pulled towards the frozen states of the clean twin
            (the same request without the injection) at the same call positions, which the frozen model
            already decodes into the user's call.
Frozen states come from the same weights with the adapters off (one model in memory). Each process takes its
slice of every micro-batch; the losses are divided by denominators of the whole step's batch, so that
accumulation and processes add up to the loss of one big batch exactly.
"""

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

import losses
from chat import collate
from lora import adapters_off
from model import class_cross_entropy, class_logits, target_only


# On a GPU every length a batch has never had before costs the step a first time in its kernels (an 8B step on an
# H200: 0.72 s median over new lengths, 0.50 s over lengths already seen). Padding each micro-batch to a multiple
# of 32 keeps the lengths to a few dozen, all met in the first steps (0.53 s), at ~6% more padded positions. The
# losses ignore pads, so the step's loss and gradient do not change. On the CPU there is no such cost: no padding.
GPU_PAD_MULTIPLE = 32


class StepError(Exception):
    """A step whose loss is not finite: every process raises it, so none waits in an all-reduce."""


def keep_positions(attn, multiple=1):
    """The positions a step computes when it unpads (train_cb.py's unpad): the real tokens attn (B, T), and as
    many pads after them (row-major) as make the count a multiple of `multiple`, so that the matmuls meet few
    distinct sizes (as pad_multiple does for the lengths). A pad's state is never in a loss."""
    extra = -int(attn.sum()) % multiple
    if not extra:
        return attn
    keep = attn.clone().reshape(-1)
    keep[(~keep).nonzero().squeeze(1)[:extra]] = True
    return keep.view_as(attn)


def hidden_states(model, fmodel, ids, frozen, stop=None, dynamic=False, embeds=None, keep=None):
    """Stacked hidden states (n+1, B, T, D) with the adapters on (trainable) or off (frozen, no graph).
    stop=l runs blocks 0..l-1 only. dynamic marks the length dimension for torch.compile (one graph for all).
    embeds (B, T, D), when given, are the input embeddings in place of ids' (an adversary's vectors in them).
    keep (B, T): compute these positions alone (model.forward's keep); the others' states come back zero."""
    if dynamic:
        torch._dynamo.maybe_mark_dynamic(ids if embeds is None else embeds, 1)
    ids = ids if embeds is None else None
    if frozen:
        with torch.no_grad(), adapters_off(model):
            return fmodel(ids, hidden=True, logits=False, stop=stop, embeds=embeds, keep=keep)[1]
    return fmodel(ids, hidden=True, logits=False, stop=stop, embeds=embeds, keep=keep)[1]


def retain_states(model, fmodel, ids, frozen, top, dynamic=False, keep=None):
    """hidden[0..top+1] as a model of blocks 0..top returns them (the original drops the blocks above its last
    target layer), the last after the final norm, also when the redirect terms loaded every block."""
    if len(model.layers) == top + 1:
        return hidden_states(model, fmodel, ids, frozen, dynamic=dynamic, keep=keep)
    h = hidden_states(model, fmodel, ids, frozen, stop=top + 1, dynamic=dynamic, keep=keep)
    with torch.no_grad() if frozen else nullcontext():
        return torch.cat([h[:-1], model.norm(h[-1:])])


def on_device(rows, pad_id, device, cfg):
    """rows collated (each padded to the longest, rounded up to cfg's pad_multiple) on the device, with the
    positions to compute (keep) where cfg's unpad is on."""
    multiple = cfg.get("pad_multiple", 1)
    b = collate(rows, pad_id, multiple)
    if cfg.get("unpad", False):
        b["keep"] = keep_positions(b["attn"], multiple)
    return {n: t.to(device, non_blocking=True) for n, t in b.items()}


def coefficients(step, cfg):
    """(c_rr, c_retain) of 0-based optimizer step `step`. The original counts steps from 1 before it computes
    the schedule, so its first step already has progress 1 / (multiplier * max_steps), and its last step ends
    the schedule; so does this. With cfg's reroute off the retain term is alone, at a constant lorra_alpha."""
    if not cfg.get("reroute", True):
        return 0.0, float(cfg["lorra_alpha"])
    return losses.coefficients(step + 1, cfg["max_steps"], cfg["lorra_alpha"], cfg["alpha_decay_multiplier"])


def completion_ce(model, h, b):
    """Summed cross-entropy of b's completion tokens (target_mask; towards b's labels, which are its ids except on
    trip rows at every depth) from the last hidden states h (B, T, D), after the final norm: only the target
    positions go through the lm_head, by its distinct rows where they are grouped (model.head). A label -(x + 1)
    asks for anything but token x there (the trip's clean-twin contrast with trip_twin_target='no_eot'): its term
    is the unlikelihood -log(1 - p(x)). Each term counts its row's b["weight"] times (train_cb's trip_weight); a
    row b["raise_only"] marks (train_cb's trip_raise) raises its targets' logits alone (model.target_only)."""
    emit = b["target_mask"][:, 1:]  # the state at t emits token t+1
    h, labels = h[:, :-1][emit], b["labels"][:, 1:][emit]
    w = b["weight"][:, None].expand_as(emit)[emit]  # (n_targets,) each term's row weight (collate's, 1 by default)
    like = labels >= 0
    r_like = b["raise_only"][:, None].expand_as(emit)[emit][like] if "raise_only" in b else None  # trip_raise
    if model.head is not None:
        ce = class_cross_entropy(model.head, h[like], labels[like], w[like], r_like)
        logits = class_logits(model.head, h[~like])  # (n_unlikely, U): a class per distinct row
        log_p = logits.gather(-1, model.head[2][-labels[~like] - 1][:, None])[:, 0] \
            - torch.logsumexp(logits + model.head[1].to(logits.dtype), -1)
    else:
        logits = model.lm_head(h)  # (n_targets, vocab)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the softmax in float32
        if r_like is None:
            ce = (F.cross_entropy(logits[like], labels[like], reduction="none") * w[like]).sum()
        else:
            z = logits[like]
            ce = (target_only(torch.logsumexp(z, -1), z.gather(-1, labels[like][:, None])[:, 0], r_like)
                  * w[like]).sum()
        log_p = logits[~like].log_softmax(-1).gather(-1, (-labels[~like] - 1)[:, None])[:, 0]
    return ce - (torch.log(-torch.expm1(log_p.clamp(max=-1e-6))) * w[~like]).sum()  # log(1 - p), stable as p -> 0


def adversarial_embeds(model, fmodel, rows, b, cfg, anchors, pad_id, autocast=nullcontext(), dynamic=False):
    """The input embeddings of the redirect batch b with an embedding-space adversary in the slots of the rows that
    carry one (data.adversarial_sample: 'adv', 'attack'), or None where no row does. The adversary (PGD, as
    attack.py's embedding attack but inside training): n_adv vectors per slot, started at random real token
    embeddings (anchors (V, D), a fresh draw each step), moved by adv_steps signed-gradient steps that make the
    attacker's call likelier, each kept within adv_eps x the anchors' mean norm (L2) of its start. The model
    then learns the user's call with these vectors in place: no input in the ball moves the tool choice.
    -> (the embeddings, the attacker call's summed cross-entropy at the adversary's start and at its last step:
    how far it got)."""
    idx = [i for i, e in enumerate(rows) if "adv" in e]
    if not idx:
        return None, 0.0, 0.0
    W, n = model.embed_tokens.weight, cfg["adv_tokens"]
    dev = W.device
    att = on_device([rows[i]["attack"] for i in idx], pad_id, dev, cfg)
    r = torch.arange(len(idx), device=dev)[:, None].expand(-1, n)  # (A, n) the slot of each adversarial row
    pos = torch.tensor([rows[i]["adv"] for i in idx], device=dev)[:, None] + torch.arange(n, device=dev)
    anchors = anchors.to(torch.promote_types(anchors.dtype, torch.float32))  # the vectors move in float32 at least
    start = anchors[torch.randint(len(anchors), (len(idx), n), device=dev)]  # (A, n, D)
    eps = cfg["adv_eps"] * anchors.norm(dim=-1).mean()
    step_size = cfg["adv_lr"] * eps / start.shape[-1] ** 0.5  # a signed step of L2 length adv_lr x eps
    plain = W.detach()[att["ids"]]  # (A, T', D)
    delta, ce = torch.zeros_like(start), []
    for _ in range(cfg["adv_steps"]):
        x = delta.requires_grad_(True)
        with autocast:
            h = hidden_states(model, fmodel, att["ids"], False, dynamic=dynamic,
                              embeds=plain.index_put((r, pos), (start + x).to(plain.dtype)), keep=att.get("keep"))[-1]
            loss = completion_ce(model, h, att)  # the attacker's call: the adversary lowers it
        (g,) = torch.autograd.grad(loss, x)
        ce.append(loss.detach())
        delta = delta.detach() - step_size * g.sign()
        delta = delta * (eps / delta.norm(dim=-1, keepdim=True).clamp(min=eps))  # back into the ball
    embeds = W.detach()[b["ids"]]
    rows_of = torch.tensor(idx, device=dev)[:, None].expand(-1, n)
    return embeds.index_put((rows_of, pos), (start + delta).to(embeds.dtype)), ce[0], ce[-1]


def redirect_losses(model, fmodel, b, twins=None, has_twin=None, dynamic=False, embeds=None):
    """(summed cross-entropy of the completion tokens given everything before them, adapters on; summed pull
    distance or None). Only the target positions go through the lm_head. twins: the clean twins' batch of the
    rows has_twin (a list of row indices), whose completions are the same call: the pull is the L2 distance, per
    layer and emitting position, between these rows' states and the twins' frozen ones, as retain measures it.
    embeds: b's input embeddings, where an adversary has put its vectors (adversarial_embeds)."""
    h = hidden_states(model, fmodel, b["ids"], frozen=False, dynamic=dynamic, embeds=embeds, keep=b.get("keep"))
    ce = completion_ce(model, h[-1], b)
    emit = b["target_mask"][:, 1:]
    if twins is None:
        return ce, None
    frozen = hidden_states(model, fmodel, twins["ids"], frozen=True, dynamic=dynamic, keep=twins.get("keep"))
    # row-major selection: each row's call positions in order, and a row and its twin hold the same call
    mine = h[:, has_twin, :-1][:, emit[has_twin]]  # (L+1, N, D)
    theirs = frozen[:, :, :-1][:, twins["target_mask"][:, 1:]]
    return ce, losses.pull_distance(mine, theirs)


def train_step(model, fmodel, optimizer, params, batches, step, cfg, pad_id, device="cpu", autocast=nullcontext(),
               rank=0, world=1, logging=False, dynamic=False, anchors=None):
    """
    One optimizer step over `batches` = dict(harmful=[...], retain=[...], redirect=[...]): the whole step's
    encoded samples over all processes (data.step_batch order; each list's length divisible by processes x
    grad_accum, the redirect list's may differ from the others'; an absent or empty list is a term that is off).
    cfg holds the recipe's settings (train_cb.py's config): layers, lorra_alpha, alpha_decay_multiplier,
    max_steps, grad_accum, retain_call_weight, retain_len, redirect_weight, pull_weight, grad_clip, and for the
    adversary on the redirect rows' slots adv_tokens, adv_steps, adv_eps, adv_lr with anchors (V, D), the real
    token embeddings its vectors start from (adversarial_embeds). Returns the
    step's record: coefficients, the losses (summed over processes), the gradient norm, and on logging steps the
    diagnostics merged over this process's share of the batch (not all-reduced: train_cb logs rank 0's).
    """
    layers, top = list(cfg["layers"]), max(cfg["layers"])
    accum = cfg["grad_accum"]
    c_rr, c_retain = coefficients(step, cfg)
    c_redirect, c_pull = cfg["redirect_weight"], cfg.get("pull_weight", 0.0)
    harmful, retain, redirect = (batches.get(k) or [] for k in ("harmful", "retain", "redirect"))
    for name, rows in (("harmful", harmful), ("retain", retain), ("redirect", redirect)):
        if len(rows) % (world * accum):
            raise ValueError(f"{name} batch of {len(rows)} is not divisible by processes ({world}) x grad_accum "
                             f"({accum})")
    on = dict(rr=c_rr > 0 and bool(harmful), retain=c_retain > 0 and bool(retain),
              redirect=c_redirect > 0 and bool(redirect), pull=c_pull > 0 and bool(redirect))
    # denominators of the whole step: rerouted positions; the retain nanmean's L x B x T with T fixed at
    # retain_len positions (the original pads every retain sample to 1024), so a batch's weight does not
    # depend on its padding; the redirect call's target tokens, each counted its row's weight
    rr_count = sum(sum(e["cb_mask"]) for e in harmful)
    retain_norm = len(retain) * cfg["retain_len"]
    redirect_count = sum(e.get("weight", 1.0) * sum(e["target_mask"]) for e in redirect)  # weighted tokens
    pull_count = sum(sum(e["target_mask"]) for e in redirect if e.get("twin")) or 1
    adversary = any("adv" in e for e in redirect) and bool(cfg.get("adv_tokens", 0)) and anchors is not None
    adv_count = sum(sum(e["attack"]["target_mask"]) for e in redirect if "adv" in e) or 1
    # this process's loss_rr, _retain, _redirect, _pull; the adversary's attacker-call loss at its start and end
    sums = torch.zeros(6, device=device, dtype=torch.float64)
    parts = {"rr": [], "retain": [], "call": []}
    for k in range(accum):
        def piece_of(rows):  # this process's k-th of world x accum equal pieces of a term's batch (its own size)
            m = len(rows) // (world * accum)
            return rows[(k * world + rank) * m:(k * world + rank + 1) * m]

        piece = lambda rows: on_device(piece_of(rows), pad_id, device, cfg)
        # one backward per term, so that only one LoRA graph is alive at a time
        if on["retain"]:
            b = piece(retain)
            with autocast:
                frozen_h = retain_states(model, fmodel, b["ids"], True, top, dynamic, b.get("keep"))
                lora_h = retain_states(model, fmodel, b["ids"], False, top, dynamic, b.get("keep"))
                w = None
                if cfg["retain_call_weight"] != 1.0:  # the replies (benign calls, chat answers) count more
                    w = 1.0 + (cfg["retain_call_weight"] - 1.0) * b["target_mask"].to(lora_h.dtype)
                l_ret = losses.retain_loss(lora_h, frozen_h, b["attn"], w) * (b["ids"].numel() / retain_norm)
            (c_retain * l_ret).backward()
            sums[1] += l_ret.detach()
            if logging:
                parts["retain"].append(losses.retain_diagnostics(lora_h, frozen_h, b["attn"]))
                parts["call"].append(losses.retain_diagnostics(lora_h, frozen_h, b["target_mask"]))
        if on["rr"]:
            rows = piece_of(harmful)
            b = on_device(rows, pad_id, device, cfg)
            with autocast:
                frozen_h = hidden_states(model, fmodel, b["ids"], True, top, dynamic, keep=b.get("keep"))[layers]
                lora_h = hidden_states(model, fmodel, b["ids"], False, top, dynamic, keep=b.get("keep"))[layers]
                share = sum(sum(e["cb_mask"]) for e in rows) / rr_count
                l_rr = losses.rerouting_loss(lora_h, frozen_h, b["cb_mask"]) * share
            (c_rr * l_rr).backward()
            sums[0] += l_rr.detach()
            if logging:
                parts["rr"].append(losses.rerouting_diagnostics(lora_h, frozen_h, b["cb_mask"]))
        if on["redirect"] or on["pull"]:
            rows = piece_of(redirect)
            b = on_device(rows, pad_id, device, cfg)
            has_twin = [i for i, e in enumerate(rows) if e.get("twin")]  # benign replies (redirect_benign) have none
            twins = None
            if on["pull"] and has_twin:
                twins = on_device([rows[i]["twin"] for i in has_twin], pad_id, device, cfg)
            embeds = None
            if adversary:
                embeds, adv0, adv1 = adversarial_embeds(model, fmodel, rows, b, cfg, anchors, pad_id, autocast,
                                                        dynamic)
                sums[4] += adv0 / adv_count
                sums[5] += adv1 / adv_count
            with autocast:
                ce, pull = redirect_losses(model, fmodel, b, twins, has_twin, dynamic, embeds)
                l_red, l_pull = ce / redirect_count, (pull / pull_count if pull is not None else ce * 0)
            (c_redirect * l_red + c_pull * l_pull).backward()
            sums[2] += l_red.detach()
            sums[3] += l_pull.detach()
    if world > 1:  # each process holds its share of the step's loss: sum the gradients and the losses
        # an adapter no term reached (blocks above the rerouting pass when no other term runs) has no
        # gradient on any process alike: AdamW skips it, as on one process
        reached = [p for p in params if p.grad is not None]
        if reached:
            flat = torch.cat([p.grad.flatten() for p in reached])
            dist.all_reduce(flat)
            for p, g in zip(reached, flat.split([p.numel() for p in reached])):
                p.grad.copy_(g.view_as(p))
        dist.all_reduce(sums)
    if not bool(torch.isfinite(sums).all()):  # the summed losses are the same on every process: all stop
        names = ("loss_rr", "loss_retain", "loss_redirect", "loss_pull", "adv_start", "adv_end")
        names = [n for n, v in zip(names, sums.tolist()) if not math.isfinite(v)]
        raise StepError(f"step {step}: {', '.join(names)} is not finite; lower lr, or look for a broken sample")
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    call = losses.merge_diagnostics(parts["call"])
    return dict(c_rr=c_rr, c_retain=c_retain, c_redirect=c_redirect, c_pull=c_pull, loss_rr=sums[0].item(),
                loss_retain=sums[1].item(), loss_redirect=sums[2].item(), loss_pull=sums[3].item(), gnorm=gnorm.item(),
                **({"adv_start": sums[4].item(), "adv_end": sums[5].item()} if adversary else {}),
                terms=[t for t in ("rr", "retain", "redirect", "pull") if on[t]],
                **losses.merge_diagnostics(parts["rr"]), **losses.merge_diagnostics(parts["retain"]),
                **({"call_l2": call["l2"], "call_cos": call["cos"]} if call else {}))


def lr_at(step, lr, max_steps, warmup_steps=0, min_lr=0.0, schedule="cosine"):
    """Learning rate of 0-based step `step`: linear warm-up over warmup_steps, then constant or a cosine decay
    from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
