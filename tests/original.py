"""
The original circuit-breaker recipe (Zou et al. 2024, its Llama-3 training script) written afresh on transformers'
LlamaForCausalLM + peft: the reference that tests/test_losses.py checks nanocb's losses and gradients against and
that bench.py times nanocb's step against. transformers and peft are test and bench dependencies only.

What the original does, and this file with it:
- keeps blocks 0..max(target layers) (drop_layers_after) and puts peft LoRA on q/k/v/o/gate/up/down of every kept
  block (transform_layers=-1);
- pads each rerouting sample to a fixed request length on the left plus a fixed response length on the right, each
  retain sample to a fixed length on the left, and cuts what is longer;
- compute_loss: the frozen hidden states under disable_adapter() and no_grad, the LoRA passes, the retain L2 over
  every stacked hidden state (nanmean over all positions), the ReLU-cosine over the target layers and every real
  position, the coefficients alpha * progress and alpha * (1 - progress) with progress = step / 300;
- around it the Hugging Face Trainer's step: autocast, one backward, gradient clipping at 1.0, AdamW.
"""

import warnings

import peft
import torch
import transformers

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the original's


def with_lora(hf, r, lora_alpha, dropout):
    """peft LoRA on every projection of every block `hf` keeps, as the original configures it."""
    return peft.get_peft_model(hf, peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=TARGET_MODULES, bias="none",
        layers_to_transform=list(range(hf.config.num_hidden_layers)), task_type="CAUSAL_LM"))


def sharing(model, lm_head_init):
    """A LlamaForCausalLM over the very weight tensors of the nanocb Llama `model` (its blocks, no copy: one set
    of frozen weights in memory, identical on both sides), with an lm_head of its own that lm_head_init(param)
    fills (a model built for training has none). Built on meta, so nothing is allocated twice."""
    hf_dict = {k: v for k, v in model.config.to_hf().items() if k not in ("torch_dtype", "bos_token_id",
                                                                          "eos_token_id")}
    hf_cfg = transformers.LlamaConfig(**hf_dict)
    hf_cfg._attn_implementation = "sdpa"  # transformers' default, which the original ran with
    weights = dict(model.named_parameters())
    dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(default)
    for name, p in list(hf.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        shared = weights.get(name.removeprefix("model."))
        if shared is None:  # the lm_head
            shared = torch.nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
            lm_head_init(shared)
        elif shared.shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(p.shape)} in transformers, {tuple(shared.shape)} in nanocb")
        setattr(hf.get_submodule(owner_name), attr, shared)
    with torch.device(device):  # its buffers were built on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)
    on_meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(f"{on_meta[0]} was not materialised (transformers {transformers.__version__})")
    return hf


def setup(model, r, lora_alpha, dropout, lr, betas, lm_head_init):
    """The original's model and optimizer over the frozen weights of the nanocb Llama `model` (see sharing):
    peft LoRA, gradient checkpointing (the original trains with it), the Trainer's AdamW (adamw_torch).
    -> (peft model, LoRA parameters, optimizer)."""
    hf = sharing(model, lm_head_init)
    hf.config.use_cache = False  # training: no KV cache (gradient checkpointing would turn it off anyway)
    with warnings.catch_warnings():  # transformers 5 renames gradient checkpointing, and warns; 4.x knows this name
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = with_lora(hf, r, lora_alpha, dropout).to(model.embed_tokens.weight.device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, params, torch.optim.AdamW(params, lr=lr, betas=betas)


def fixed(ids, length, left, pad_id):
    """The original dataset's tokenizer call on a sequence: cut the end to `length`, pad on the left or right.
    -> (ids, attention mask, whether it was cut)."""
    cut = len(ids) > length
    ids = ids[:length]
    pad, real = [pad_id] * (length - len(ids)), [1] * len(ids)
    return (pad + ids, [0] * len(pad) + real, cut) if left else (ids + pad, real + [0] * len(pad), cut)


def inputs(harmful, retain, pad_id, request_len=512, response_len=512, retain_len=1024):
    """The original's batch from nanocb's encoded samples (dicts with ids and target_mask; a harmful sample's
    request is what precedes its completion): the rerouting samples as request (left-padded) + response
    (right-padded), the retain samples left-padded. -> (inputs dict under the original's keys, sequences cut)."""
    cb, ret = [], []
    for e in harmful:
        start = e["target_mask"].index(1)
        request = fixed(e["ids"][:start], request_len, True, pad_id)
        response = fixed(e["ids"][start:], response_len, False, pad_id)
        cb.append((request[0] + response[0], request[1] + response[1], request[2] + response[2]))
    ret = [fixed(e["ids"], retain_len, True, pad_id) for e in retain]
    t = lambda rows, i: torch.tensor([r[i] for r in rows], dtype=torch.long)
    return (dict(input_ids=t(ret, 0), attention_mask=t(ret, 1), input_ids_circuit_breaker=t(cb, 0),
                 attention_mask_circuit_breaker=t(cb, 1)), sum(r[2] for r in cb + ret))


def compute_loss(model, inputs, target_layers, alpha, step, lm_head=True, norm_dtype=torch.float):
    """The original's compute_loss at its step count `step` (it counts from 1): retain over all hidden states,
    rerouting over the target layers, on a peft model. lm_head=False takes the hidden states from the body alone
    (the original computes the logits too, on every pass). norm_dtype: the original takes its norms in float32;
    the float64 parity test takes them in float64. -> (loss, retain loss, rerouting loss)."""
    retain_ids, retain_attn = inputs["input_ids"], inputs["attention_mask"]
    cb_ids, cb_attn = inputs["input_ids_circuit_breaker"], inputs["attention_mask_circuit_breaker"]
    progress = step / 300  # the original's fixed horizon, here step / (2 * 150)
    retain_coeff, cb_coeff = alpha * progress, alpha * (1 - progress)
    run = model if lm_head else model.get_base_model().model
    hidden = lambda ids, attn: run(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states

    cb_layer_mask = cb_attn.repeat(len(target_layers), 1, 1).unsqueeze(-1)
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            frozen_retain = hidden(retain_ids, retain_attn)
            frozen_retain_h = torch.stack(frozen_retain).detach()
            retain_layer_mask = retain_attn.repeat(len(frozen_retain), 1, 1).unsqueeze(-1)
            frozen_retain_h *= retain_layer_mask
            del frozen_retain
            frozen_cb = hidden(cb_ids, cb_attn)
            frozen_cb_h = torch.stack([frozen_cb[l].detach() for l in target_layers])
            del frozen_cb
    model.train()

    lora_retain = hidden(retain_ids, retain_attn)
    lora_retain_h = torch.stack(lora_retain) * retain_layer_mask
    del lora_retain
    retain = torch.norm(lora_retain_h - frozen_retain_h, dim=-1, p=2, dtype=norm_dtype).nanmean()

    lora_cb = hidden(cb_ids, cb_attn)
    lora_cb_h = torch.stack([lora_cb[l] for l in target_layers])
    del lora_cb
    unit_lora = lora_cb_h / torch.norm(lora_cb_h, dim=-1, keepdim=True, dtype=norm_dtype)
    unit_frozen = frozen_cb_h / torch.norm(frozen_cb_h, dim=-1, keepdim=True, dtype=norm_dtype)
    inner = unit_lora * unit_frozen * cb_layer_mask
    cb = torch.relu(inner.sum(dim=-1)).sum() / cb_layer_mask.sum()
    return retain_coeff * retain + cb_coeff * cb, retain, cb


def trainer_step(model, optimizer, params, inputs, target_layers, alpha, step, autocast, lm_head=True):
    """The Hugging Face Trainer's step around compute_loss: autocast, one backward, clip to 1.0, AdamW.
    -> (rerouting loss, retain loss), detached."""
    with autocast:
        loss, retain, cb = compute_loss(model, inputs, target_layers, alpha, step, lm_head)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cb.detach(), retain.detach()
