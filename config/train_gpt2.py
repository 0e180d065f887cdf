# Reproduce GPT-2 (124M) on OpenWebText. Prepare the data first:
#   python data/openwebtext/prepare.py
# One node with 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# tokens per optimizer step: 12 sequences * 1024 tokens * 40 micro-steps = 491,520 (~0.5M)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600,000 steps of ~0.5M tokens: about 300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
