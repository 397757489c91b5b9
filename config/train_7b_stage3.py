# Lumina-mGPT 2.0 7B, stage 3 of 3: 768 px, from stage 2, lr 2e-5 (paper §4; official train.sh lr = min_lr
# = 2e-5). The recipe: train.py's defaults (docs/training.md §1).
# torchrun --standalone --nproc_per_node=8 train.py config/train_7b_stage3.py
out_dir = "out/7b_stage3"
init_from = "out/7b_stage2/ckpt-00050000"
data_dir = "data/images/stage3_768"
model_name = "7B"
max_seq_len = 10240                    # 9,316 image tokens + prompt (official train.sh's 4096 truncates)
parallel = "fsdp"
activation_checkpointing = True
batch_size = 2
gradient_accumulation_steps = 32       # 8 x 2 x 32 = 512 sequences
max_iters = 20000
learning_rate = 2e-5
min_lr = 2e-5
warmup_iters = 200                     # official warmup_epochs 0.01
eval_interval = 1000
checkpoint_interval = 1000
