# Finetune GPT-2 XL on tiny Shakespeare (GPT-2 BPE). Prepare the data first:
#   python data/shakespeare/prepare.py
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2

# keep a checkpoint only when val loss improves
always_save_checkpoint = False

# 1 sequence * 32 micro-steps * 1024 tokens = 32,768 tokens per step; the dataset has
# about 301K training tokens, so one epoch is about 9.2 steps
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a small constant learning rate
learning_rate = 3e-5
decay_lr = False
