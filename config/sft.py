# Adversarial fine-tuning alone, no circuit-breaker term: cross-entropy on the user's call given the injected
# prompt (the redirect rows) and on the benign and chat replies, 32 samples a step (on the organism, the same
# LoRA, data, steps and lr as every breaker row of ablate.py). The organism's recipe (config/organism.py) is this.
#     python train_cb.py config/sft.py --init_from=/models/Llama-3.1-8B-Instruct --layers=10,20
lorra_alpha = 0.0
redirect_weight = 1.0
redirect_benign = True
batch_size = 32
grad_accum = 2
trip = False
