# Lumina-mGPT 2.0 2B (paper Table 2; no official release), stage 1: 256 px, as train_7b_stage1.py.
# torchrun --standalone --nproc_per_node=8 train.py config/train_2b_stage1.py
out_dir = "out/2b_stage1"
data_dir = "data/images/stage1_256"
model_name = "2B"
max_seq_len = 2048
parallel = "fsdp"                      # 2B + AdamW = 46 GB: plain DDP fits 80 GB, sharding leaves room for batch
batch_size = 16
gradient_accumulation_steps = 8        # 8 x 16 x 8 = 1,024 sequences
max_iters = 100000
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 2000
eval_interval = 2000
checkpoint_interval = 1000
