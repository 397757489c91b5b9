# The shipped reduced-scale model: shapes world, T2I + the five task families, 2-core CPU.
# python train.py config/train_shapes.py   (resume after a stop: add --init_from=resume)
out_dir = "out/shapes"
data_dir = "data/shapes"
model_name = "shapes"
device = "cpu"
batch_size = 32
max_iters = 12000
# small models take a larger step than the paper's 7B (2e-4); warm-up + cosine and the rest as train.py's
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
dropout = 0.0           # the shapes world is plentiful; dropout only slows a short run
eval_interval = 500
eval_iters = 10
log_interval = 20
checkpoint_interval = 250
