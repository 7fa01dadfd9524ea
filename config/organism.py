# The model organism's recipe (python organism.py: 4 blocks, so the original's target layers 10 and 20 of 32
# scale to 1 and 3, and blocks 0..3 get LoRA). Measured on the organism (README, val split): rerouting + retain,
# in every combination with the redirect terms, left more injections through and broke more calls than the
# redirect terms alone, so here it is off: cross-entropy on the user's call given the injected prompt (redirect
# rows), on the benign and chat replies, and on <|eot_id|> after a forced attacker's call for a quarter of the
# tool flips (trip rows), 32 samples a step. The breaker of train_cb.py's defaults is one switch away:
#     python train_cb.py config/organism.py --lorra_alpha=10 --batch_size=16 --redirect_weight=3 --trip_share=1
init_from = "organism"
out_dir = "out/organism"
layers = (1, 3)
max_steps = 150
lr = 1e-3
lorra_alpha = 0.0
redirect_weight = 1.0
redirect_benign = True
trip = True
trip_share = 0.25
batch_size = 32
grad_accum = 2  # two micro-batches, each padded to its own length: the same gradient, ~20% faster
log_interval = 10
eval_interval = 50
