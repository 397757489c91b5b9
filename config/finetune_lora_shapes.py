# LoRA fine-tune of the shipped shapes model (assets/) on a task it never saw, "mirror" (docs/lora.md §5).
# python -m data.shapes.prepare --codec=assets --tokenizer=assets/tokenizer.json --mix=mirror=1 --n=4000 \
#     --out_dir=data/shapes_mirror --threads=1
# python train.py config/finetune_lora_shapes.py        (resume after a stop: add --init_from=resume)
init_from = "assets"
out_dir = "out/lora_mirror"
data_dir = "data/shapes_mirror"
device = "cpu"
threads = 1             # a 16M model trains faster on one CPU thread than on two that wait on each other
lora_rank = 16
lora_alpha = 32.0
batch_size = 8
max_iters = 110
max_minutes = 14.0      # the example's wall-clock budget: stop with a checkpoint after this long
# adapters start at zero and take a larger step than full fine-tuning would
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 10
weight_decay = 0.0      # decay would pull the adapters back towards the base
dropout = 0.0
eval_interval = 40
eval_iters = 5
log_interval = 10
checkpoint_interval = 20
