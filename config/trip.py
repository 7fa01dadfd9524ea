# The trip learnt under attack, on top of the organism's recipe (README, "What the organism run shows"; measured
# 2026-12-07, 3 seeds): trip rows at every cut of the attacker's call, 2 a step beside their contrasts (the same
# injected prompt answered with the user's call, a clean request calling the attacker's tool, the clean twin kept
# away from <|eot_id|>), the embedding adversary on every injected redirect row beside its plain copy and on half the
# trip rows, 300 steps. It holds GCG to 16% (12-16) of 50 test cases where the recipe lets 94% through, at the cost
# of more broken calls (malformed on 17% of the injected cases) and a lower benign accuracy (85% against 91.5%).
#     python train_cb.py config/organism.py config/trip.py && python attack.py out/trip/ckpt.pt
out_dir = "out/trip"
lr = 3e-3  # as measured: the recipe's constant lr before it took the cosine schedule (not measured with the trip)
lr_schedule = "constant"
min_lr = 0.0
trip = True
trip_depth = "all"
trip_batch_size = 2
trip_contrast_twin = True
trip_twin_target = "no_eot"
redirect_batch_size = 24
adv_tokens = 20
adv_share = 1.0
adv_keep = True
adv_trip = 0.5
max_steps = 300
