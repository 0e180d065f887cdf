"""eval: see `python eval.py --help`. The code lives in src/nanogpt/evaluate.py."""
import os
import sys

try:
    from nanogpt.evaluate import main
except ImportError:  # a plain clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from nanogpt.evaluate import main

if __name__ == "__main__":
    main()
