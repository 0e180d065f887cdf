"""Prepare data/shakespeare: `python data/shakespeare/prepare.py [--mirror=DIR] [--out_dir=DIR]`
(see `--help`; the code is nanogpt.prepare)."""
import os
import sys

try:
    from nanogpt.prepare import main
except ImportError:  # a plain clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
    from nanogpt.prepare import main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    args = sys.argv[1:]
    if not any(a.startswith("--out_dir") for a in args):
        args = ["--out_dir", here] + args
    main(args, default_name="shakespeare")
