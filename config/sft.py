# The baseline users ask for first: adversarial fine-tuning alone. Cross-entropy on the user's call given the
# injected prompt (the redirect rows) and on the benign and chat replies, with the same LoRA, data, steps, lr and
# batch as config/organism.py, which adds the trip rows to it (equal compute: 32 samples a step through every
# block, forward and backward).
#     python train_cb.py config/organism.py config/sft.py --out_dir=out/sft
lorra_alpha = 0.0
redirect_weight = 1.0
redirect_benign = True
batch_size = 32
grad_accum = 2
trip = False
