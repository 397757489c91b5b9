# Lumina-mGPT 2.0 7B, stage 2 of 3: 512 px, from stage 1. The paper gives no stage-2 learning rate;
# 1e-4 (between stage 1's 2e-4 and stage 3's 2e-5) is our choice. The recipe: train.py's defaults.
# torchrun --standalone --nproc_per_node=8 train.py config/train_7b_stage2.py
out_dir = "out/7b_stage2"
init_from = "out/7b_stage1/ckpt-00100000"
data_dir = "data/images/stage2_512"
model_name = "7B"
max_seq_len = 4608                     # 512 px: 4,164 tokens for a square image + prompt
parallel = "fsdp"
activation_checkpointing = True
batch_size = 4
gradient_accumulation_steps = 16       # 8 x 4 x 16 = 512 sequences
max_iters = 50000
learning_rate = 1e-4
min_lr = 2e-5
warmup_iters = 1000
eval_interval = 2000
checkpoint_interval = 1000
