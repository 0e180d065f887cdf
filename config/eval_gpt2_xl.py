# Evaluate the released gpt2-xl (1558M) on OpenWebText (train and val loss), no training.
batch_size = 8
eval_iters = 500  # more batches for a tighter estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-xl'
