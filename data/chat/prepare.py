"""Prepare the conversations shipped here (conversations.jsonl) for chat SFT into this folder:
`python data/chat/prepare.py [options]` (`--help` lists them; the code is nanogpt.prepare).
With `--source=FILE.jsonl` (or .jsonl.gz, .parquet, a Hugging Face dataset name) it prepares
other conversations the same way."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from nanogpt.prepare import main
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
    from nanogpt.prepare import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("--source=") for a in args):
        args.append("--source=" + os.path.join(HERE, "conversations.jsonl"))
    main(args, name="chat", out_dir=HERE)
