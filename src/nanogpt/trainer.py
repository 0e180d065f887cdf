"""The parts of training that the loop in train.py calls and bench.py times: the training step,
the run's state that a checkpoint saves and restores, the fixed-batch loss estimate, building the
model for ``init_from``, and the stop flag set by Ctrl-C / SIGTERM."""

from __future__ import annotations

import math
import os
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from . import checkpoint
from .errors import ConfigError, Interrupted, UserError, first_line
from .model import GPT, GPTConfig, architecture_keys


# --------------------------------------------------------------------------------------------
# one optimizer step


@dataclass
class StepResult:
    loss: torch.Tensor | None  # the step's mean training loss, on the device (no sync)
    grad_norm: torch.Tensor | None  # before clipping; None when not measured or freed in backward
    clipped: torch.Tensor | None  # whether clipping scaled the gradients (a device bool)
    aborted: bool = False  # a stop signal came between micro-steps: nothing was stepped


def train_step(model, next_batch, optimizer, scaler, strategy, micro_steps: int, ctx, grad_clip: float, params: list,
               measure_norm: bool = True, layers=None, stop=None) -> StepResult:
    """Run ``micro_steps`` forward/backward passes on batches from ``next_batch()`` (the gradient
    reduction skipped on all but the last), clip the gradient norm to ``grad_clip`` (0: measure
    only, when ``measure_norm``), and step the optimizer. ``stop`` (a :class:`StopFlag`) is
    looked at between micro-steps: when set, the gradients are dropped and nothing is stepped."""
    total = None
    for micro in range(micro_steps):
        if micro and stop is not None and stop.requested:
            optimizer.zero_grad(set_to_none=True)
            return StepResult(None, None, None, aborted=True)
        X, Y = next_batch()
        with strategy.no_sync() if micro < micro_steps - 1 else nullcontext():
            with ctx:
                _, loss = model(X, Y)
                loss = loss / micro_steps  # the mean over micro-steps, not their sum
            scaler.scale(loss).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    grad_norm = clipped = None
    if (grad_clip > 0 or measure_norm) and not getattr(optimizer, "in_backward", False):
        scaler.unscale_(optimizer)
        grad_norm = strategy.clip_grad_norm(params, grad_clip if grad_clip > 0 else float("inf"))
        if grad_clip > 0:
            clipped = grad_norm > grad_clip
    if layers is not None:
        layers.grads()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm, clipped)


def ramp_micro_steps(tokens_seen: int, accum: int, micro_tokens: int, ramp_tokens: int, ramp_start: int) -> int:
    """Micro-steps per rank for the next step: all ``accum`` of them, or fewer early in a
    batch-size ramp (tokens per step grow linearly from ``ramp_start`` over ``ramp_tokens``)."""
    if not ramp_tokens:
        return accum
    start = max(ramp_start, micro_tokens)
    want = start + min(1.0, tokens_seen / ramp_tokens) * (accum * micro_tokens - start)
    return max(1, min(accum, math.ceil(want / micro_tokens)))


# --------------------------------------------------------------------------------------------
# the state a checkpoint carries besides weights and optimizer


@dataclass
class TrainState:
    """Where a run stands. ``facts()`` go into the weights file (sampling and export read them);
    ``random_state()`` into the optimizer file: every rank's dropout and batch streams."""

    iter_num: int = 0
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    rewinds: int = 0  # loss faults rewound so far (on_loss_fault='rewind')
    lr_scale: float = 1.0  # product of rewind_lr_scale over those rewinds

    def facts(self) -> dict:
        return {"iter_num": self.iter_num, "tokens_seen": self.tokens_seen, "best_val_loss": float(self.best_val_loss),
                "rewinds": self.rewinds, "lr_scale": self.lr_scale}

    def restore_facts(self, ckpt: dict, tokens_per_iter: int) -> None:
        self.iter_num = ckpt["iter_num"]
        self.best_val_loss = ckpt.get("best_val_loss", float("inf"))
        self.tokens_seen = ckpt.get("tokens_seen", self.iter_num * tokens_per_iter)
        self.rewinds = ckpt.get("rewinds", 0)
        self.lr_scale = ckpt.get("lr_scale", 1.0)

    @staticmethod
    def random_state(loader, strategy, device: str) -> dict:
        """Python, NumPy and torch states of this process and the loader's position; under
        torchrun also every rank's torch and loader states (a collective: every rank calls it)."""
        rng = {**checkpoint.rng_state(), "loader": loader.state_dict()}
        mine = {"torch": torch.get_rng_state(), "loader": loader.state_dict()["generator"]}
        if device.startswith("cuda"):
            mine["cuda"] = torch.cuda.get_rng_state(device)
        ranks = strategy.rank_states(mine)
        if ranks is not None:
            rng["ranks"] = ranks
        return rng

    def restore_random(self, rng: dict | None, loader, info, device: str, seed: int, same_world: bool) -> None:
        """Each rank's own streams back from the checkpoint; at another world size a fresh,
        deterministic stream per rank."""
        if rng and info.master and same_world:
            checkpoint.set_rng_state(rng)
            loader.load_state_dict(rng["loader"])
        elif rng and same_world and len(rng.get("ranks", [])) == info.world_size:
            mine = rng["ranks"][info.rank]
            torch.set_rng_state(mine["torch"])
            if "cuda" in mine and device.startswith("cuda"):
                torch.cuda.set_rng_state(mine["cuda"], device)
            loader.load_state_dict({"generator": mine["loader"]})
        else:
            torch.manual_seed(seed + 1000003 * self.iter_num)
            loader.reseed(seed + 1000003 * self.iter_num)


class StepStart:
    """The batch and dropout streams as a step begins, to put back when a stop signal cuts the
    step short: the checkpoint then holds the state before it, and a resume repeats it exactly."""

    def __init__(self, loader, device: str):
        self.loader, self.device = loader, device
        self.state = None

    def mark(self) -> None:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.startswith("cuda") else None
        self.state = (self.loader.state_dict(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        loader_state, cpu, cuda = self.state
        self.loader.load_state_dict(loader_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)


# --------------------------------------------------------------------------------------------
# the loss estimate


class Evaluator:
    """Train and val loss on the same fixed batches at every evaluation (seeded apart from the
    training stream), averaged over ranks. ``stop`` ends it early in a single process."""

    def __init__(self, make_loader, seed: int, rank: int, eval_iters: int, ctx, reduce_mean, stop=None):
        self.make_loader, self.seed, self.rank = make_loader, seed, rank
        self.eval_iters, self.ctx, self.reduce_mean, self.stop = eval_iters, ctx, reduce_mean, stop

    @torch.no_grad()
    def __call__(self, model) -> dict | None:
        out = {}
        model.eval()
        try:
            for i, split in enumerate(("train", "val")):
                ev = self.make_loader(split, self.seed + 7919 * (i + 1) + self.rank)
                losses = None
                for k in range(self.eval_iters):
                    if self.stop is not None and self.stop.requested:
                        return None
                    X, Y = ev.next()
                    with self.ctx:
                        _, loss = model(X, Y)
                    if losses is None:
                        losses = torch.zeros(self.eval_iters, device=loss.device)
                    losses[k] = loss.float()
                out[split] = self.reduce_mean(losses.mean()).item()
        finally:
            model.train()
        return out


# --------------------------------------------------------------------------------------------
# the model for init_from


def scratch_config(model_cfg: GPTConfig, meta: dict | None, vocab_multiple: int, log) -> GPTConfig:
    """The model section with its vocabulary resolved: vocab_size, else the dataset's, else
    GPT-2's padded 50304; rounded up to a multiple of ``vocab_multiple``."""
    vocab = model_cfg.vocab_size or (meta["vocab_size"] if meta else 50304)
    if not model_cfg.vocab_size and not meta:
        log("no meta.json in the dataset folder: vocab_size defaults to 50304 (GPT-2's, padded)")
    vocab = -(-vocab // vocab_multiple) * vocab_multiple
    return GPTConfig(**dict(asdict(model_cfg), vocab_size=vocab))


def check_resume_model(cfg, margs: dict, log) -> None:
    """A resume takes the model from its checkpoint. A shape or feature given on the command line
    that contradicts it is an error; one that a config file sets is reported and left unused."""
    for k in architecture_keys():
        saved = margs.get(k, getattr(GPTConfig, k))  # a checkpoint from before the feature existed: its default
        source = cfg.sources.get(k)
        mine = getattr(cfg, k)
        if source is None or mine == saved or (k == "vocab_size" and mine == 0):
            continue
        if source.startswith("config file"):
            log("note: %s=%r from %s is not used: the checkpoint in %s has %s=%r" % (k, mine, source, cfg.out_dir, k, saved))
            continue
        raise ConfigError("%s=%r disagrees with the checkpoint in %s (%s=%r); drop --%s or train into a new --out_dir"
                          % (k, mine, cfg.out_dir, k, saved, k))


def check_resume_lora(cfg, saved: dict | None) -> None:
    """A resume keeps the LoRA settings of its checkpoint (or its lack of adapters); one given on
    the command line that disagrees is an error."""
    have = {"lora_rank": saved["rank"], "lora_alpha": saved["alpha"], "lora_dropout": saved["dropout"],
            "lora_targets": saved["targets"]} if isinstance(saved, dict) and "rank" in saved else {"lora_rank": 0}
    for k, v in have.items():
        source = cfg.sources.get(k)
        if source is not None and source.startswith("--") and getattr(cfg, k) != v:
            what = "has %s=%r" % (k, v) if saved else "trained every weight (no LoRA)"
            raise ConfigError("%s=%r disagrees with the checkpoint in %s, which %s; drop --%s, or start a new run into "
                              "another --out_dir with --init_from=%s" % (k, getattr(cfg, k), cfg.out_dir, what, k,
                                                                          os.path.join(cfg.out_dir, "ckpt.pt")))


def build_model(cfg, meta: dict | None, log) -> tuple[GPT, dict | None]:
    """The model for init_from ('scratch', 'resume' or GPT-2 weights), and the checkpoint when resuming."""
    if cfg.init_from == "scratch":
        return GPT(scratch_config(cfg.model, meta, cfg.vocab_multiple, log)), None
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        ckpt = checkpoint.load(path)
        checkpoint.model_config(ckpt, path)  # every model setting checked before comparing them
        check_resume_model(cfg, ckpt["model_args"], log)
        check_resume_lora(cfg, ckpt.get("lora"))
        return checkpoint.load_model(path, dropout=cfg.dropout)
    if os.path.isfile(cfg.init_from):  # another run's ckpt.pt: its weights, a new run
        log("initialising from the checkpoint %s" % cfg.init_from)
        model, ckpt = checkpoint.load_model(cfg.init_from, dropout=cfg.dropout)
        if "lora" in ckpt:
            raise ConfigError("init_from=%r holds LoRA adapters, not whole weights; finetune its base, or merge it first "
                              "(nanogpt export --merge_lora=True)" % cfg.init_from)
    else:
        log("initialising from GPT-2 weights: %s" % cfg.init_from)
        try:
            model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
        except (OSError, ValueError, ImportError) as e:
            raise UserError("cannot load %s: %s" % (cfg.init_from, first_line(e))) from None
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    return model, None


# --------------------------------------------------------------------------------------------
# stop signals


class StopFlag:
    """Ctrl-C / SIGTERM. While ``armed`` (the training loop runs), the first signal sets
    ``requested``: the loop finishes or drops the step it is in, saves and leaves. Before that
    (setup, loading, compiling) and at a second signal the command ends at once."""

    def __init__(self):
        self.signal = None
        self.armed = False
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> "StopFlag":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted("stopped by %s before training started; nothing was written" % name, signum)
        if self.signal is not None:
            raise Interrupted("stopped at once by a second %s; the last checkpoint saved is intact" % name, signum)
        self.signal = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
