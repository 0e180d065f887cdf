"""The console command: ``nanogpt train|sample|eval|bench|prepare|export|plot ...``."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("nanogpt.train", "train or finetune a model (config files and --key=value overrides)"),
    "sample": ("nanogpt.sample", "generate text from a checkpoint or GPT-2 weights"),
    "eval": ("nanogpt.evaluate", "perplexity, bits per byte, HellaSwag and LAMBADA of a checkpoint or GPT-2 weights; lm-eval tasks"),
    "bench": ("nanogpt.bench", "time training steps: ms/iter, tokens/s, MFU, peak memory"),
    "prepare": ("nanogpt.prepare", "prepare a dataset (shakespeare_char, shakespeare, openwebtext, corpus, chat) or train a tokenizer (tokenizer)"),
    "export": ("nanogpt.export", "write a checkpoint as a Hugging Face GPT2LMHeadModel folder (+ tokenizer files) or a GGUF file"),
    "chat": ("nanogpt.chat", "talk to a model in the terminal through the chat template"),
    "serve": ("nanogpt.serve", "an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions; needs starlette, uvicorn)"),
    "plot": ("nanogpt.plot", "plot metrics.jsonl of one or more runs into a PNG (needs matplotlib)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: nanogpt COMMAND [args]", ""] + ["  %-8s %s" % (k, v[1]) for k, v in COMMANDS.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print("error: unknown command %r" % argv[0], file=sys.stderr)
            print("\n".join(lines), file=sys.stderr)
            sys.exit(2)
        print("\n".join(lines))
        return
    import importlib
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
