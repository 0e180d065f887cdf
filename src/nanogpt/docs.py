"""Regenerate the README's tables of config keys from the config classes' field docs:
``python -m nanogpt.docs`` (rewrites README.md in place between the marker comments)."""

from __future__ import annotations

import re
import sys

from .bench import BenchConfig
from .bpe import TokenizerConfig
from .chat import ChatConfig
from .config import markdown_table
from .evaluate import EvalConfig
from .export import ExportConfig
from .prepare import PrepareConfig
from .sample import SampleConfig
from .serve import ServeConfig
from .train import TrainConfig

SECTIONS = {"train": TrainConfig, "sample": SampleConfig, "bench": BenchConfig, "eval": EvalConfig, "export": ExportConfig,
            "prepare": PrepareConfig, "tokenizer": TokenizerConfig, "chat": ChatConfig, "serve": ServeConfig}


def render(text: str) -> str:
    for name, cls in SECTIONS.items():
        begin, end = "<!-- keys:%s -->" % name, "<!-- /keys:%s -->" % name
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit("README.md lacks the markers %s ... %s" % (begin, end))
        text = pattern.sub(lambda _: "%s\n%s\n%s" % (begin, markdown_table(cls), end), text)
    return text


def main(path: str = "README.md") -> None:
    with open(path, encoding="utf-8") as f:
        old = f.read()
    new = render(old)
    if new != old:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print("updated %s" % path)


if __name__ == "__main__":
    main(*sys.argv[1:])
