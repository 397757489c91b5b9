# Lumina-mGPT 2.0 7B, stage 1 of 3: 256 px (paper §4). AdamW betas, weight decay, clipping, z-loss and
# dropout 0.05 are train.py's defaults, the official train.sh values (docs/training.md §1, §2).
# torchrun --standalone --nproc_per_node=8 train.py config/train_7b_stage1.py
out_dir = "out/7b_stage1"
data_dir = "data/images/stage1_256"    # data/images/prepare.py --target_size=256
model_name = "7B"
max_seq_len = 2048                     # a 256-px image is <= ~1.1k tokens with any aspect ratio
parallel = "fsdp"                      # 7B + AdamW = 126 GB of state: shard it
activation_checkpointing = True
batch_size = 16
gradient_accumulation_steps = 8        # 8 GPUs x 16 x 8 = 1,024 sequences
max_iters = 100000
learning_rate = 2e-4                   # the paper's stage-1 lr; warm-up, then cosine to min_lr
min_lr = 2e-5
warmup_iters = 2000
eval_interval = 2000
checkpoint_interval = 1000             # official: save every 1000 iterations
