"""export: see `python export.py --help`. The code lives in src/nanogpt/export.py."""
import os
import sys

try:
    from nanogpt.export import main
except ImportError:  # a plain clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from nanogpt.export import main

if __name__ == "__main__":
    main()
