"""Train, finetune, sample and benchmark GPT-2 class language models in plain PyTorch."""

__version__ = "0.1.0"
