"""Talk to a model in the terminal: ``nanogpt chat --out_dir=DIR`` (or ``--init_from=gpt2``).

Each reply is generated from the whole conversation through the chat template (chat_template.py)
and printed as it is generated; it ends at ``<|endoftext|>`` or after ``max_new_tokens``. When the
conversation no longer fits in the model's context with room for a reply, the oldest turns are
dropped (the system message stays). Commands: ``/reset`` forgets the conversation, ``/temp 0.7``
sets the temperature (0 = greedy), ``/quit`` (or Ctrl-D) ends; Ctrl-C stops a reply.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from . import chat_template, runtime
from .checkpoint import load_for_inference
from .config import Config, Section, check_init_from, setting
from .engine import Engine, Params
from .errors import UserError, run_command
from .runtime import RuntimeConfig
from .tokenizer import vocabulary_for

HELP = "commands: /reset (forget the conversation), /temp 0.7 (temperature; 0 = greedy), /quit (or Ctrl-D); Ctrl-C stops a reply"


@dataclass
class ChatSettings(Section):
    """The model to talk to, and how it replies."""

    init_from: str = setting("resume", "'resume' (from out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = setting("out", "Folder holding ckpt.pt when init_from='resume'.")
    system: str = setting("", "A system message opening the conversation (kept when old turns are dropped); empty for none.")
    max_new_tokens: int = setting(256, "Most tokens of one reply (fewer when the context has less room).", gt=0)
    temperature: float = setting(0.8, "Softmax temperature; 0 means greedy decoding (/temp changes it).", ge=0, note="0 = greedy")
    top_k: int = setting(200, "Keep only the k most likely tokens (0 disables).", ge=0, note="0 disables it")
    top_p: float = setting(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 disables).",
                           gt=0, le=1)
    data_root: str = setting("data", "Where dataset folders (with meta.json) are looked up for the character vocabulary.")

    def check(self) -> None:
        check_init_from(self.init_from, ("resume",))


class ChatConfig(Config):
    """Every key of ``nanogpt chat``."""

    sections = (("chat", ChatSettings), ("runtime", RuntimeConfig))
    defaults = {"compile": False}


def fit_history(system: list[dict], turns: list[dict], tokenizer, block_size: int, max_new: int):
    """(prompt ids, turns kept, reply budget): the newest turns whose prompt leaves room for a reply of
    ``max_new`` tokens, or, when even the last message alone leaves less, whatever room there is.
    The turns kept always start with a user message. None for the ids when nothing fits."""
    kept = list(turns)
    while True:
        ids = chat_template.prompt_ids(system + kept, tokenizer)
        if len(ids) + max_new <= block_size or len(kept) <= 1:
            break
        kept = kept[1:]
        while kept and kept[0]["role"] != "user":
            kept = kept[1:]
    room = block_size - len(ids)
    if room < 1:
        return None, kept, 0
    return ids, kept, min(max_new, room)


class Chat:
    """A conversation with one model: its history, settings and the engine that writes replies."""

    def __init__(self, model, vocab, cfg: ChatConfig, autocast=None, out=sys.stdout):
        self.model, self.vocab, self.out = model, vocab, out
        self.engine = Engine(model, vocab, max_batch=1, seed=cfg.seed, autocast=autocast)
        self.system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        self.turns: list[dict] = []
        self.temperature, self.top_k, self.top_p, self.max_new = cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to quit."""
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.turns = []
            self.say("(conversation cleared)")
        elif name == "/temp":
            try:
                t = float(arg)
                if not t >= 0:
                    raise ValueError
            except ValueError:
                self.say("(/temp takes a number >= 0, e.g. /temp 0.7; it is %g)" % self.temperature)
            else:
                self.temperature = t
                self.say("(temperature %g%s)" % (t, ", greedy" if t == 0 else ""))
        elif name == "/help":
            self.say("(%s)" % HELP)
        else:
            self.say("(unknown command %s; %s)" % (name, HELP))
        return True

    def reply(self, message: str) -> str | None:
        """Add the user's message, print the model's reply as it comes and return it (None when the
        message cannot fit the context)."""
        turns = self.turns + [{"role": "user", "content": message}]
        ids, kept, budget = fit_history(self.system, turns, self.vocab.tokenizer, self.model.config.block_size, self.max_new)
        if ids is None:
            self.say("(that message is too long for the model's context of %d tokens; send a shorter one)"
                     % self.model.config.block_size)
            return None
        if len(kept) < len(turns):
            self.say("(dropped the %d oldest message%s to fit the context of %d tokens)"
                     % (len(turns) - len(kept), "" if len(turns) - len(kept) == 1 else "s", self.model.config.block_size))
        params = Params(max_tokens=budget, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, strip_space=True)
        self.out.write("Assistant: ")
        self.out.flush()
        seq = self.engine.add(ids, params, on_text=lambda s, t: (self.out.write(t), self.out.flush()))
        try:
            while self.engine.busy():
                self.engine.step()
        except KeyboardInterrupt:
            self.engine.cancel(seq)
            while self.engine.busy():
                self.engine.step()
            self.out.write(" (stopped)")
        self.out.write("\n")
        self.out.flush()
        self.turns = kept + [{"role": "assistant", "content": seq.text}]
        return seq.text


def _read(prompt: str) -> str | None:
    try:
        line = input(prompt)
    except EOFError:
        print()
        return None
    if not sys.stdin.isatty():  # piped input: show it, so the output reads as a transcript
        print(line, flush=True)
    return line


def chat(cfg: ChatConfig) -> None:
    cfg.validate()
    rt = runtime.setup(cfg.runtime, log=None)
    model, train_config = load_for_inference(cfg.init_from, cfg.out_dir)
    model.eval().to(rt.device)
    autocast = rt.autocast
    if rt.device_type == "cuda" and rt.dtype != "float32":  # as sample.py: cast once, no autocast
        model.to(runtime.PTDTYPE[rt.dtype])
        autocast = None
    vocab = vocabulary_for(train_config, cfg.data_root, model.config.vocab_size)
    if cfg.compile:
        print("compile: not used by nanogpt chat (the batch and positions change at every token); running eagerly", file=sys.stderr)
    if getattr(vocab.tokenizer, "eot_token", None) is None:
        raise UserError("nanogpt chat needs a vocabulary with <|endoftext|> (GPT-2 BPE) for its chat template; this model "
                        "reads %s: use sample.py instead" % vocab.name)
    rt.threads.settle(lambda m: print(m, file=sys.stderr))
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    conversation = Chat(model, vocab, cfg, autocast)
    print("chatting with %s (context %d tokens, temperature %g); %s"
          % (cfg.out_dir if cfg.init_from == "resume" else cfg.init_from, model.config.block_size, cfg.temperature, HELP),
          flush=True)
    while True:
        try:
            line = _read("User: ")
        except KeyboardInterrupt:
            print()
            continue
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not conversation.command(line):
                break
            continue
        conversation.reply(line)


def main(argv: list[str] | None = None) -> None:
    run_command(lambda args: chat(ChatConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
