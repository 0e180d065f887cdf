# Chat SFT: finetune GPT-2 (124M) on the conversations shipped in data/chat, learning only the
# assistant replies (the loss mask of `nanogpt prepare chat`). Prepare the data first:
#   python data/chat/prepare.py
# then:  python train.py config/sft_gpt2.py
# Another starting point: --init_from=gpt2-medium, or a Hugging Face folder such as one written by
#   python export.py --out_dir=out-mine --hf_dir=out-mine-hf   (then --init_from=out-mine-hf)
# Another conversation file: python data/chat/prepare.py --source=FILE.jsonl (or nanogpt prepare chat
#   --source=FILE.jsonl --out_dir=data/mychat, then --dataset=mychat).

out_dir = 'out-sft'
init_from = 'gpt2'
dataset = 'chat'

# windows start at a conversation and run on into the next ones (packed); the conversations are
# short, so 512 tokens hold a dozen or more of them
block_size = 512
batch_size = 4
gradient_accumulation_steps = 4  # 16 windows, 8,192 tokens a step: a little over the 6,481 training tokens

# a small constant learning rate, a few epochs; keep the checkpoint with the best masked val loss
learning_rate = 2e-5
decay_lr = False
warmup_iters = 0
max_iters = 40
eval_interval = 5
eval_iters = 10
log_interval = 1
always_save_checkpoint = False
dropout = 0.1
