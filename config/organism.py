# Circuit breaker on the embedded model organism (python organism.py): 4 blocks, so the original's
# target layers 10 and 20 of 32 scale to 1 and 3 (blocks 0..3 get LoRA).
init_from = "organism"
out_dir = "out/organism"
layers = (1, 3)
max_steps = 150
batch_size = 16
grad_accum = 2  # the same gradient as one micro-batch of 16; two, each padded to its own length, are ~20% faster
lr = 1e-3
log_interval = 10
eval_interval = 50
