"""Prepare tiny Shakespeare in GPT-2 BPE into this folder:
`python data/shakespeare/prepare.py [options]` (`--help` lists them; the code is nanogpt.prepare)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from nanogpt.prepare import main
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
    from nanogpt.prepare import main

if __name__ == "__main__":
    main(name="shakespeare", out_dir=HERE)
