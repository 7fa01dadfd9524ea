# The baseline users ask for first: adversarial fine-tuning alone, no circuit breaker. Cross-entropy on the user's
# call given the injected prompt (the redirect rows), and on the benign and chat replies, with the same LoRA, data,
# steps and lr as the breaker. Equal compute: 32 samples per step through every block (forward and backward), as
# the breaker's 16 harmful + 16 retain (frozen and LoRA forwards, backward) + 16 redirect samples.
#     python train_cb.py config/organism.py config/sft.py --out_dir=out/sft
lorra_alpha = 0.0
redirect_weight = 1.0
redirect_benign = True
batch_size = 32
grad_accum = 2
trip = False
