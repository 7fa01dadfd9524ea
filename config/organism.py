# The model organism's recipe (python organism.py: 4 blocks, so the original's target layers 10 and 20 of 32
# scale to 1 and 3, and blocks 0..3 get LoRA). Measured on the organism (README: chosen on val, reported on test),
# no circuit-breaker term beat adversarial fine-tuning alone: rerouting + retain, in every combination with the
# redirect term, let more injections through; trip rows cut forced calls only at the exact point where they were
# trained and eval cuts (one token deeper they are back) and cost legitimate search_web calls. So the organism's
# recipe is the fine-tuning: cross-entropy on the user's call given the injected prompt (redirect rows) and on the
# benign and chat replies, 32 samples a step, with the benign search_web calls twice (chosen on val among lr
# 1e-3..5e-3, LoRA r 16/32, legit_repeat 1..3: lr alone cuts ASR and costs search_web, legit_repeat gives it back),
# at lr 5e-3 decayed by a cosine to 5e-4 (chosen on val among constant 3e-3 and cosine from 3e-3, 5e-3 and 8e-3).
# The breaker terms are one switch away:
#     python train_cb.py config/organism.py --trip --trip_share=0.25                  # + trip rows
#     python train_cb.py config/organism.py --lorra_alpha=10 --batch_size=16 --redirect_weight=3 --trip  # defaults
init_from = "organism"
out_dir = "out/organism"
layers = (1, 3)
max_steps = 300  # chosen on val (2026-12-07): 300 beat 150, and 300 at batch 16 (150's compute), on ASR, the user's
                 # tool under attack and benign routing, 3 seeds each (README, Lab notebook)
lr = 5e-3
lr_schedule = "cosine"  # chosen on val (2026-12-07, night): against a constant 3e-3, ASR 5.6 / 4.3% for 7.9 / 5.2%,
min_lr = 5e-4           # the user's tool 92.1 / 66.4% for 89.7 / 62.1%, benign 88.5% for 86.8%, 3 seeds (README)
lorra_alpha = 0.0
redirect_weight = 1.0
redirect_benign = True
legit_repeat = 2  # the benign calls to search_web, the tool the injections push most, twice
trip = False
batch_size = 32
grad_accum = 2  # two micro-batches, each padded to its own length: the same gradient, ~20% faster
log_interval = 10
eval_interval = 50
