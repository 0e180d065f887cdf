"""Settings: sections that declare and check their own keys, composed into one config per command.

A *section* is a dataclass that lives beside the code it configures: the model's in model.py,
the optimizer's in optim.py, the data's in data.py, the runtime's in runtime.py. Each field is a
:func:`setting`: its default, one line of help and the rules its value must meet (a range, a list
of choices, a kind of path). A command's config (``TrainConfig`` in train.py, ``SampleConfig`` in
sample.py, ...) is a :class:`Config`: a few sections behind flat keys, so ``--n_layer=4`` and a
nanoGPT config file's ``n_layer = 4`` reach the model's section, ``cfg.n_layer`` reads it back
and ``cfg.model`` is the section itself.

Checks run in three layers, each in one place: the field rules (for every section, here), a
section's ``check()`` (how its own fields relate) and a config's ``check()`` (how sections
relate). Every failure is a :class:`ConfigError` of one line that names the key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import os
import runpy
import types
from dataclasses import field, fields
from typing import ClassVar

from .errors import ConfigError

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def setting(default, help: str, *, choices=None, ge=None, gt=None, lt=None, le=None, note: str = "",
            path: str | None = None, **extra):
    """A section field. ``choices`` lists the allowed values; ``ge``/``gt``/``lt``/``le`` bound a
    number; ``note`` is added to a range error (e.g. "0 disables it"); ``path`` is the kind of path
    a non-empty value must be: 'file', 'text' (a UTF-8 text file), 'dir', or 'out' (a folder that
    is or can be written). Other keywords are kept in the metadata for the owner's use."""
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, lt=lt, le=le, note=note, path=path, **extra)
    return field(default=default, metadata=meta)


def type_name(f: dataclasses.Field) -> str:
    t = f.type
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _type_ok(t: str, value) -> bool:
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "bool":
        return isinstance(value, bool)
    if t == "str":
        return isinstance(value, str)
    return True


# --------------------------------------------------------------------------------------------
# field rules


def _range_text(m: dict) -> str:
    lo = ("[%g" % m["ge"]) if m["ge"] is not None else ("(%g" % m["gt"]) if m["gt"] is not None else None
    hi = ("%g]" % m["le"]) if m["le"] is not None else ("%g)" % m["lt"]) if m["lt"] is not None else None
    if lo and hi:
        return "in %s, %s" % (lo, hi)
    if lo:
        return (">= %g" % m["ge"]) if m["ge"] is not None else ("> %g" % m["gt"])
    return ("<= %g" % m["le"]) if m["le"] is not None else ("< %g" % m["lt"])


def _in_range(m: dict, v) -> bool:
    return not ((m["ge"] is not None and v < m["ge"]) or (m["gt"] is not None and v <= m["gt"])
                or (m["lt"] is not None and v >= m["lt"]) or (m["le"] is not None and v > m["le"]))


def looks_binary(path: str) -> bool:
    """Whether a file's first 8 KiB hold a NUL byte or are not UTF-8."""
    import codecs
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def check_path(key: str, value: str, kind: str) -> None:
    """Refuse a path argument that cannot serve as ``kind`` (see :func:`setting`), before any work."""
    if kind in ("file", "text"):
        if os.path.isdir(value):
            raise ConfigError("%s=%r is a folder; give a file" % (key, value))
        if not os.path.isfile(value):
            raise ConfigError("%s=%r: no such file" % (key, value))
        if kind == "text" and looks_binary(value):
            raise ConfigError("%s=%r is not UTF-8 text (it looks binary); give a text file" % (key, value))
    elif kind == "dir":
        if os.path.isfile(value):
            raise ConfigError("%s=%r is a file; give a folder" % (key, value))
        if not os.path.isdir(value):
            raise ConfigError("%s=%r: no such folder" % (key, value))
    elif kind == "out":
        probe = os.path.abspath(value)
        if os.path.exists(probe) and not os.path.isdir(probe):
            raise ConfigError("%s=%r is a file, not a folder; choose another --%s" % (key, value, key))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ConfigError("%s=%r is not writable: %s is a file, not a folder; choose another --%s" % (key, value, probe, key))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError("%s=%r is not writable (%s); choose another --%s" % (key, value, probe, key))
    else:
        raise ValueError("unknown path kind %r" % kind)


def check_field(section, f: dataclasses.Field) -> None:
    key, v, m, t = f.name, getattr(section, f.name), f.metadata, type_name(f)
    if not _type_ok(t, v):
        raise ConfigError("%s expects %s, got %s %r" % (key, t, type(v).__name__, v))
    if t == "float" and not math.isfinite(v):
        raise ConfigError("%s must be a finite number; got %r" % (key, v))
    if m.get("choices") is not None and v not in m["choices"]:
        raise ConfigError("%s must be one of %s; got %r" % (key, ", ".join(map(repr, m["choices"])), v))
    if t in ("int", "float") and not _in_range(m, v):
        raise ConfigError("%s must be %s%s; got %r" % (key, _range_text(m), " (%s)" % m["note"] if m.get("note") else "", v))
    if m.get("path") and v:
        check_path(key, v, m["path"])


class Section:
    """Base of the settings sections (each a dataclass of :func:`setting` fields)."""

    def validate(self) -> None:
        for f in fields(self):
            check_field(self, f)
        self.check()

    def check(self) -> None:
        """Rules between this section's own fields; the field rules have passed."""


# --------------------------------------------------------------------------------------------
# a command's config: sections behind flat keys


class Config:
    """A command's settings: ``sections`` (attribute name, section class) behind flat keys, with
    ``defaults`` overriding a section's defaults for this command. ``sources`` tells where each
    value that is not a default came from ('code', 'command line' or 'config file PATH')."""

    sections: ClassVar[tuple] = ()
    defaults: ClassVar[dict] = {}

    def __init__(self, **values):
        for name, cls in self.sections:
            own = {f.name: self.defaults[f.name] for f in fields(cls) if f.name in self.defaults}
            object.__setattr__(self, name, cls(**own))
        object.__setattr__(self, "sources", {})
        for key, value in values.items():
            self.set(key, value, "code")

    @classmethod
    def key_fields(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """Every key: (section attribute, field), in declaration order."""
        cached = cls.__dict__.get("_key_fields")
        if cached is None:
            cached = {}
            for name, sec in cls.sections:
                for f in fields(sec):
                    if f.name in cached:
                        raise TypeError("key %r is declared in two sections of %s" % (f.name, cls.__name__))
                    cached[f.name] = (name, f)
            cls._key_fields = cached
        return cached

    def __getattr__(self, key):
        where = type(self).key_fields().get(key)
        if where is None:
            raise AttributeError("%s has no key %r" % (type(self).__name__, key))
        return getattr(self.__dict__[where[0]], key)

    def __setattr__(self, key, value):
        where = type(self).key_fields().get(key)
        if where is None:
            raise AttributeError("%s has no key %r" % (type(self).__name__, key))
        setattr(self.__dict__[where[0]], key, value)

    def set(self, key: str, value, source: str) -> None:
        """Set ``key`` from ``source`` (for messages), checking its type; an int widens to float."""
        keys = type(self).key_fields()
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=2, cutoff=0.75)
            hint = " (did you mean %s?)" % " or ".join(repr(c) for c in close) if close else ""
            raise ConfigError("unknown config key %r in %s%s" % (key, source, hint))
        t = type_name(keys[key][1])
        if not _type_ok(t, value):
            raise ConfigError("config key %r expects %s, got %s %r in %s" % (key, t, type(value).__name__, value, source))
        setattr(self, key, float(value) if t == "float" else value)
        self.sources[key] = source

    def to_dict(self) -> dict:
        """Every key and its value (what checkpoints store as the run's config)."""
        return {k: getattr(self, k) for k in type(self).key_fields()}

    def validate(self, **context) -> None:
        """Every section's rules, then the rules between sections."""
        for name, _ in self.sections:
            self.__dict__[name].validate()
        self.check(**context)

    def check(self, **context) -> None:
        """Rules between sections; the sections' own rules have passed."""

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__name__, ", ".join("%s=%r" % kv for kv in self.to_dict().items()))

    @classmethod
    def docs(cls) -> list[tuple[str, str, object, str]]:
        """(key, type, this command's default, help) for every key."""
        out = []
        for key, (_, f) in cls.key_fields().items():
            out.append((key, type_name(f), cls.defaults.get(key, f.default), f.metadata.get("help", "")))
        return out

    @classmethod
    def parse(cls, argv: list[str]):
        """Build the config from nanoGPT-style arguments: config files (positional), then
        ``--key=value`` overrides; later ones win. ``--help`` prints every key and exits."""
        cfg = cls()
        for arg in argv:
            if arg in ("-h", "--help"):
                print(help_text(cls))
                raise SystemExit(0)
            if not arg.startswith("--"):
                for k, v in read_config_file(arg).items():
                    cfg.set(k, v, "config file %r" % arg)
                continue
            if "=" not in arg:
                raise ConfigError("argument %r must look like --key=value" % arg)
            key, text = arg[2:].split("=", 1)
            value = parse_literal(text)
            where = cls.key_fields().get(key)
            if where is not None and type_name(where[1]) == "str" and not isinstance(value, str):
                value = text  # --init_from=gpt2, --start=42: strings need no quotes
            if where is not None and type_name(where[1]) == "float" and text.strip().lower() in ("nan", "inf", "-inf", "infinity"):
                value = float(text)  # refused with a clear message by the field rules
            cfg.set(key, value, "--%s" % key)
        return cfg


def parse_literal(text: str):
    """``--key=value``: a Python literal when it parses as one, else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def read_config_file(path: str) -> dict:
    """Run a nanoGPT-style config file in its own namespace; return its plain settings."""
    if os.path.isdir(path):
        raise ConfigError("config file %r is a folder; give a .py file such as config/train_shakespeare_char.py" % path)
    if not os.path.isfile(path):
        raise ConfigError("config file %r not found (config files live in config/, e.g. config/train_shakespeare_char.py)" % path)
    if looks_binary(path):
        raise ConfigError("config file %r is not Python text (it looks binary)" % path)
    try:
        ns = runpy.run_path(path, run_name="__config__")
    except SystemExit as e:
        raise ConfigError("config file %r called sys.exit(%s); a config file only sets keys, remove that call"
                          % (path, "" if e.code is None else repr(e.code))) from None
    except Exception as e:  # a broken config file is the user's to fix: say where
        raise ConfigError("config file %r failed to run: %s: %s" % (path, type(e).__name__, e)) from None
    return {k: v for k, v in ns.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def help_text(cls) -> str:
    lines = ["usage: [config_file.py ...] [--key=value ...]", "", "keys:"]
    for name, t, default, doc in cls.docs():
        lines.append("  --%s=%r  (%s)  %s" % (name, default, t, doc))
    return "\n".join(lines)


def markdown_table(cls) -> str:
    """The README table of every key of a command, generated from the field docs."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, t, default, doc in cls.docs():
        rows.append("| `%s` | %s | `%r` | %s |" % (name, t, default, doc.replace("|", "\\|")))
    return "\n".join(rows)


def check_init_from(value: str, allowed: tuple[str, ...]) -> None:
    """init_from: one of ``allowed``, a GPT-2 name, or a Hugging Face folder (with config.json)."""
    known = allowed + GPT2_NAMES
    if value in known:
        return
    if os.path.isfile(value):
        raise ConfigError("init_from=%r is a file; give a Hugging Face model folder (with config.json) or one of %s"
                          % (value, ", ".join(known)))
    if not os.path.isdir(value):
        raise ConfigError("init_from must be one of %s or an existing Hugging Face model folder; got %r"
                          % (", ".join(known), value))
    if not os.path.isfile(os.path.join(value, "config.json")):
        raise ConfigError("init_from=%r has no config.json; give a folder written by save_pretrained" % value)
