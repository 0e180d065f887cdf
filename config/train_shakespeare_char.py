# A small character-level model on tiny Shakespeare: a good first run.
# On a GPU it reaches a val loss near 1.47 in a few minutes. On a laptop add
# --device=cpu --compile=False (and shrink it: see the README's CPU example).

out_dir = 'out-shakespeare-char'
eval_interval = 250  # evaluate often: this model over-fits quickly
eval_iters = 200
log_interval = 10

# only keep a checkpoint when val loss improves
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

# a baby GPT
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small models tolerate a higher rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # few tokens per step, so average the second moment a little longer

warmup_iters = 100
