"""The training loop: ``python train.py [config.py ...] [--key=value ...]``.

One process:   python train.py config/train_shakespeare_char.py --device=cpu --compile=False
DDP, 1 node:   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
FSDP, 1 node:  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallelism=fsdp

:func:`loop` reads like nanoGPT's train.py: set the learning rate, evaluate and checkpoint, run
the micro-steps, clip, step, log. :class:`Run` holds what it needs, built in that order
(runtime, out_dir, data, model, optimizer, resumed state, wrapping, reporting).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass

import torch

from . import checkpoint, dist, fp8, lora, runtime
from .checkpoint import CheckpointConfig
from .config import Config, Section, check_init_from, setting
from .data import BatchLoader, DataConfig, dataset_dir, load_meta, prepare_hint
from .doc_batches import BatchConfig, DocumentLoader, attention_kind, eot_of
from .errors import CheckpointError, ConfigError, DataError, UserError, run_command
from .lora import LoraConfig
from .metrics import LayerStats, MetricsConfig, MetricsLog, StepReport, keep_before_resume, open_wandb
from .model import GPTConfig, features, saved_args
from .optim import OptimConfig, ScheduleConfig, build, describe, get_lr, param_groups
from .parallel import ParallelConfig, strategy_for
from .runtime import RuntimeConfig, SpeedConfig
from .trainer import Evaluator, StepStart, StopFlag, TrainState, build_model, ramp_micro_steps, train_step


@dataclass
class LoopConfig(Section):
    """What the loop does: where the weights start, how long it runs, when it evaluates, what it
    does about a bad loss."""

    init_from: str = setting("scratch", "'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', a local Hugging Face folder, or another run's ckpt.pt file to finetune.")
    max_iters: int = setting(600000, "Total optimizer steps.", ge=0)
    eval_interval: int = setting(2000, "Evaluate train/val loss (and save a checkpoint) every this many iterations.", gt=0)
    eval_iters: int = setting(200, "Batches per split for each loss estimate.", gt=0)
    eval_only: bool = setting(False, "Evaluate once and exit (no training, nothing written).")
    eval_tasks: str = setting("", "Evaluations run at every eval_interval besides train/val loss, e.g. 'hellaswag=path/val.jsonl,lambada=path/test.jsonl,ppl=path/text.txt' (see eval.py).")
    eval_tasks_limit: int = setting(0, "Examples per evaluation task at each eval_interval (0 = all).", ge=0)
    vocab_multiple: int = setting(1, "Round the vocabulary up to a multiple of this (64 helps GPU matmuls); padded ids are never sampled.", gt=0)
    batch_size_ramp_tokens: int = setting(0, "Grow tokens per step linearly over this many training tokens, from batch_size_ramp_start up to the full batch, by raising the micro-steps per step (0 = no ramp). The learning-rate schedule is unchanged.",
                                          ge=0)
    batch_size_ramp_start: int = setting(0, "Tokens per step at the start of the ramp (rounded up to whole micro-steps; at least one micro-step per process).", ge=0)
    on_loss_fault: str = setting("stop", "At a nan/inf loss: 'stop' (nothing saved after it), or 'rewind': reload the last checkpoint, skip the batches read since, and go on; 'rewind' also rewinds a loss spike (see loss_spike_factor).",
                                 choices=("stop", "rewind"))
    max_rewinds: int = setting(3, "on_loss_fault='rewind': stop after this many rewinds.", ge=0)
    rewind_lr_scale: float = setting(1.0, "on_loss_fault='rewind': multiply the learning rate by this at each rewind.", gt=0, le=1)

    def check(self) -> None:
        if self.init_from.endswith(".pt") and os.path.isfile(self.init_from):
            return  # another run's checkpoint: its weights are the start
        check_init_from(self.init_from, ("scratch", "resume"))


class TrainConfig(Config):
    """Every key of train.py. Defaults are nanoGPT's (GPT-2 124M on OpenWebText)."""

    sections = (("checkpoint", CheckpointConfig), ("loop", LoopConfig), ("metrics", MetricsConfig), ("data", DataConfig),
                ("batches", BatchConfig), ("model", GPTConfig), ("lora", LoraConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig), ("speed", SpeedConfig),
                ("parallel", ParallelConfig), ("runtime", RuntimeConfig))
    defaults = {"bias": False, "vocab_size": 0}

    def check(self, world_size: int = 1) -> None:
        """The rules between sections, all in one place."""
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ConfigError("min_lr must be in [0, learning_rate=%g]; got %r" % (self.learning_rate, self.min_lr))
        if self.init_from not in ("scratch", "resume"):
            for k, v in features().items():
                if getattr(self, k) != v:
                    raise ConfigError("%s=%r changes the architecture, but init_from=%r loads its weights as they are; drop --%s or "
                                      "train from scratch" % (k, getattr(self, k), self.init_from, k))
        if self.doc_attention and self.dropout > 0:
            raise ConfigError("doc_attention=True has no attention dropout (FlexAttention applies none); pass --dropout=0.0 "
                              "or --doc_attention=False")
        if self.lora_rank:
            if self.init_from == "scratch":
                raise ConfigError("lora_rank=%d trains adapters on pretrained weights, but init_from='scratch'; pass --init_from=gpt2 "
                                  "(or a Hugging Face folder, or a ckpt.pt file), or --lora_rank=0" % self.lora_rank)
            if self.fp8:
                raise ConfigError("lora_rank=%d is not checked with fp8=True; pass --fp8=False or --lora_rank=0" % self.lora_rank)
        if self.gradient_accumulation_steps % world_size:
            n = -(-self.gradient_accumulation_steps // world_size) * world_size
            raise ConfigError("gradient_accumulation_steps (%d) must be divisible by the number of processes (%d); "
                              "pass e.g. --gradient_accumulation_steps=%d" % (self.gradient_accumulation_steps, world_size, n))
        if self.optimizer_in_backward:
            for bad, why in ((self.gradient_accumulation_steps != 1, "gradient_accumulation_steps=1 (gradients are consumed as they arrive)"),
                             (world_size > 1, "a single process (DDP reduces gradients after backward)"),
                             (self.dtype == "float16", "dtype other than float16 (the loss scaler needs every gradient at once)"),
                             (self.batch_size_ramp_tokens > 0, "batch_size_ramp_tokens=0 (a ramp needs gradient accumulation)")):
                if bad:
                    raise ConfigError("optimizer_in_backward=True needs %s" % why)
        if self.parallelism == "fsdp":
            if self.optimizer == "muon":
                raise ConfigError("optimizer='muon' needs whole matrices, which parallelism='fsdp' shards; use --parallelism=ddp or another optimizer")
            if self.fp8:
                raise ConfigError("fp8=True is not yet checked with parallelism='fsdp'; use --parallelism=ddp or --fp8=False")
            if self.optimizer_in_backward:
                raise ConfigError("parallelism='fsdp' cannot step the optimizer inside backward; pass --optimizer_in_backward=False")
            if self.eval_tasks and world_size > 1:
                raise ConfigError("eval_tasks run on rank 0 alone, which cannot gather weights sharded by parallelism='fsdp'; "
                                  "leave eval_tasks empty or use parallelism='ddp'")


# --------------------------------------------------------------------------------------------
# everything a run holds


class Run:
    """The parts of one training run on this process, built in the order the data flows."""

    def __init__(self, cfg: TrainConfig, info: dist.DistInfo, device: str, stop: StopFlag):
        self.cfg, self.info, self.stop = cfg, info, stop
        self.log = print if info.master else (lambda *a, **k: None)
        self.rt = runtime.setup(cfg.runtime, device=device, rank=info.rank, log=self.log)
        self.lock = self.train_loader = None
        self.writes = info.master and not cfg.eval_only
        try:
            if self.writes:
                self._claim_out_dir()
            self._data()
            self._model()
            self._optimizer()
            self.state = TrainState()
            if self.ckpt is not None:
                self._resume()
            self.start_iter = self.state.iter_num
            self.skip_eval_at = self.start_iter or None  # a resume does not repeat the evaluation its save followed
            self.model = self.strategy.wrap(runtime.compile_model(self.raw, cfg.compile, self.rt.device_type, self.log,
                                                                  cfg.compile_mode))
            self._reporting()
            self.rt.threads.settle(self.log)
        except BaseException:
            if self.train_loader is not None:
                self.train_loader.close()
            if self.lock is not None:
                self.lock.release(failed=True)
            raise

    def _claim_out_dir(self) -> None:
        cfg = self.cfg
        self.lock = checkpoint.RunLock(cfg.out_dir).acquire()
        if cfg.init_from != "resume" and checkpoint.has_checkpoint(cfg.out_dir):
            if not cfg.overwrite:
                raise CheckpointError("out_dir %s already holds a checkpoint (ckpt.pt) of another run: pass --init_from=resume "
                                      "to continue it, --overwrite=True to replace it, or choose another --out_dir" % cfg.out_dir)
            checkpoint.remove_run(cfg.out_dir)
            self.log("overwrite: removed the earlier run's checkpoints and metrics from %s" % cfg.out_dir)
        removed = checkpoint.remove_unreferenced(cfg.out_dir)
        if removed:
            self.log("removed %d file(s) an interrupted save left in %s: %s" % (len(removed), cfg.out_dir, ", ".join(removed)))

    def _data(self) -> None:
        cfg = self.cfg
        self.data_dir = dataset_dir(cfg.data_root, cfg.dataset)
        if not os.path.isdir(self.data_dir):
            raise DataError("dataset %r not found at %s; %s" % (cfg.dataset, self.data_dir, prepare_hint(cfg.dataset)))
        self.meta = load_meta(self.data_dir)
        self.accum = cfg.gradient_accumulation_steps // self.info.world_size
        self.eot = None
        for key in ("doc_attention", "batch_mode"):
            if getattr(cfg, key) not in (False, "windows"):
                self.eot = eot_of(self.meta, cfg.dataset, "%s=%r" % (key, getattr(cfg, key)))

    def loader(self, split: str, seed: int, prefetch: int = 0) -> BatchLoader:
        args = (self.data_dir, split, self.cfg.batch_size, self.gconf.block_size, self.rt.device, seed,
                (self.meta or {}).get("dtype", "uint16"), self.gconf.vocab_size, self.cfg.dataset)
        if self.cfg.batch_mode == "documents":
            return DocumentLoader(*args, prefetch=prefetch, meta=self.meta, verify=self.cfg.verify_shards, eot=self.eot, rank=self.info.rank,
                                  world_size=self.info.world_size, buffer=self.cfg.doc_buffer)
        return BatchLoader(*args, prefetch=prefetch, meta=self.meta, verify=self.cfg.verify_shards)

    def _model(self) -> None:
        cfg, log = self.cfg, self.log
        self.raw, self.ckpt = build_model(cfg, self.meta, log)
        if cfg.lora_rank and self.ckpt is None:  # a resume brings its adapters back itself
            n = lora.apply(self.raw, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                           lora.base_reference(cfg.init_from))
            log("lora: rank %d, alpha %g on %d layers (%s)" % (cfg.lora_rank, cfg.lora_alpha, n, cfg.lora_targets))
        if lora.spec(self.raw) is not None:
            trained, total = lora.trainable_counts(self.raw)
            log("lora: %s of %s parameters train (%.2f%%); the base weights are frozen"
                % (f"{trained:,}", f"{total:,}", 100 * trained / total))
        self.gconf = gconf = self.raw.config
        world = self.info.world_size
        self.micro_tokens = world * cfg.batch_size * gconf.block_size  # one micro-step on every rank
        self.tokens_per_iter = self.accum * self.micro_tokens
        log("tokens per iteration: %s (%d processes x %d micro-steps x %d x %d)"
            % (f"{self.tokens_per_iter:,}", world, self.accum, cfg.batch_size, gconf.block_size))
        top = (self.meta or {}).get("max_token_id")
        if top is not None and top >= gconf.vocab_size:
            raise DataError("dataset %r holds token id %d but the model's vocab_size is %d; use a matching dataset or --vocab_size"
                            % (cfg.dataset, top, gconf.vocab_size))
        self.train_loader = self.loader("train", cfg.seed + self.info.rank, cfg.prefetch)
        if cfg.batch_mode == "documents":
            n_docs = len(self.train_loader.starts)
            log("batch_mode='documents': %s training documents per process, packed best-fit into rows of %d tokens"
                % (f"{n_docs:,}", gconf.block_size + 1))
            if n_docs < cfg.batch_size:
                log("note: fewer documents than rows per batch: rows repeat; is the corpus closed by <|endoftext|> only at its end? "
                    "batch_mode='windows' suits such data")
        self.loader("val", cfg.seed)  # fail now, not at the first evaluation, when val.bin is missing
        self.raw.to(self.rt.device)
        log("model: %.2fM parameters (%s)" % (self.raw.num_params() / 1e6, ", ".join("%s=%s" % kv for kv in asdict(gconf).items())))
        if self.rt.device_type == "cpu" and (self.raw.num_params() > 30e6 or self.tokens_per_iter > 200_000):
            log("note: a %.0fM-parameter model at %s tokens per step on the CPU: each step may take minutes; "
                "config/train_shakespeare_char_cpu.py is sized for a CPU" % (self.raw.num_params() / 1e6, f"{self.tokens_per_iter:,}"))
        self.raw.activation_checkpointing = cfg.activation_checkpointing
        self.raw.loss_chunk = cfg.loss_chunk
        if cfg.doc_attention:
            kind = attention_kind(self.rt.device_type)
            self.raw.doc_attention = (self.eot, kind)
            log("doc_attention: tokens attend within their document only (%s)" % (
                "FlexAttention" if kind == "flex" else "a dense mask: FlexAttention has no backward pass on the CPU"))
        if cfg.fp8:
            n = fp8.apply(self.raw, self.rt.device_type, self.rt.device)
            log("fp8: %d Linear layers in the blocks multiply in float8 (e4m3 forward, e5m2 gradients)" % n)

    def _optimizer(self) -> None:
        cfg, log = self.cfg, self.log
        self.strategy = strategy_for(cfg.parallelism, self.info, self.rt.device, log)
        self.strategy.shard(self.raw, self.rt.dtype)  # before the optimizer: it must hold the sharded parameters
        if self.strategy.sharded:
            log("fsdp: %d blocks and the root sharded over %d processes" % (self.gconf.n_layer, self.info.world_size))
        self.optimizer = build(self.raw, cfg.optim, self.rt.device_type, seed=cfg.seed)
        self.scaler = torch.amp.GradScaler(self.rt.device_type, enabled=(self.rt.dtype == "float16"))
        log(describe(param_groups(self.raw, cfg.weight_decay)))
        if cfg.optimizer == "muon":
            mats = [p for g in self.optimizer.param_groups if g.get("muon") for p in g["params"]]
            log("muon: %d block matrices (%s parameters) at muon_lr=%g; embeddings, head and vectors with AdamW at learning_rate=%g"
                % (len(mats), f"{sum(p.numel() for p in mats):,}", cfg.muon_lr, cfg.learning_rate))
        self.named = [(n, p) for n, p in self.raw.named_parameters() if p.requires_grad]  # LoRA: the adapters
        self.params = [p for _, p in self.named]

    def load_optimizer(self, tstate: dict) -> None:
        """The checkpoint gives the optimizer's state; this run's settings give its hyper-parameters."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.strategy.load_optimizer_state(self.optimizer, tstate["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError("optimizer state in %s does not fit (%s); was it written with another --optimizer?"
                                  % (self.cfg.out_dir, e)) from None
        for group, mine in zip(self.optimizer.param_groups, settings):  # load_state_dict put the saved ones back
            group.update(mine)
        if "scaler" in tstate and self.scaler.is_enabled():
            self.scaler.load_state_dict(tstate["scaler"])

    def _resume(self) -> None:
        cfg, ckpt = self.cfg, self.ckpt
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        prev = ckpt.get("config") or {}
        for k in ("optimizer", "optimizer_in_backward", "optimizer_state_dtype", "batch_mode"):
            if k in prev and prev[k] != getattr(cfg, k):
                raise CheckpointError("the checkpoint in %s was trained with %s=%r, not %r; pass --%s=%r to resume it"
                                      % (cfg.out_dir, k, prev[k], getattr(cfg, k), k, prev[k]))
        tstate = checkpoint.load_train_state(path, ckpt)
        self.load_optimizer(tstate)
        self.state.restore_facts(ckpt, self.tokens_per_iter)
        same_world = ckpt.get("world_size", 1) == self.info.world_size
        self.state.restore_random(tstate.get("rng"), self.train_loader, self.info, self.rt.device, cfg.seed + self.info.rank,
                                  same_world)
        self.log("resumed from %s at iter %d (best val loss %.4f)" % (path, self.state.iter_num, self.state.best_val_loss))
        self.ckpt = None

    def _reporting(self) -> None:
        cfg, info, rt = self.cfg, self.info, self.rt
        self.ctx = rt.autocast(cache=not cfg.activation_checkpointing)
        wandb = open_wandb(cfg.metrics, cfg.to_dict()) if cfg.wandb_log and self.writes else None
        resumed = self.state.iter_num if cfg.init_from == "resume" else None
        self.metrics = MetricsLog(cfg.out_dir, self.writes, resumed, cfg.tensorboard_log, wandb)
        single = not info.enabled
        self.evaluator = Evaluator(self.loader, cfg.seed, info.rank, cfg.eval_iters, self.ctx,
                                   lambda x: dist.all_reduce_mean(x, info), stop=self.stop if single else None)
        self.step_start = StepStart(self.train_loader, rt.device) if single else None
        peak = runtime.peak_flops(rt.device, rt.dtype, cfg.peak_flops)
        flops = self.raw.flops_per_token(self.gconf.block_size)
        if lora.spec(self.raw) is not None:  # a frozen weight takes no gradient: 4 FLOPs per token, not 6
            flops -= 2 * (self.raw.num_params() - lora.trainable_counts(self.raw)[0])
        self.report = StepReport(cfg.metrics, self.metrics, self.log, device=rt.device, grad_clip=cfg.grad_clip,
                                 max_iters=cfg.max_iters, flops_per_token=flops,
                                 peak=peak, world=info.world_size, ramp=bool(cfg.batch_size_ramp_tokens), memory=rt.max_memory)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=rt.device)  # first iteration with a non-finite loss
        self.tasks = self.task_tokenizer = None
        if cfg.eval_tasks:
            from . import scoring
            from .tokenizer import load_tokenizer
            self.tasks = scoring.parse_tasks(cfg.eval_tasks)
            self.task_tokenizer = load_tokenizer(self.meta)
        self.last_save, self.steps_run, self.last_val, self.evaluated, self.stopped = time.time(), 0, None, False, False
        self.t_start, self.tokens_start = time.time(), self.state.tokens_seen

    # ---------------------------------------------------------------------------------------
    # what the loop calls

    def set_lr(self) -> float:
        lr = get_lr(self.state.iter_num, self.cfg.schedule, self.cfg.learning_rate) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's matrices keep their own scale
        return lr

    def eval_due(self) -> bool:
        it, cfg = self.state.iter_num, self.cfg
        return cfg.eval_only or ((it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != self.skip_eval_at)

    def evaluate(self, lr: float) -> dict | None:
        """Train/val loss (and eval_tasks); None when a stop signal cut it short."""
        cfg, it = self.cfg, self.state.iter_num
        if not self.evaluated:
            self.log("evaluating train and val loss on %d batches each%s" % (cfg.eval_iters, " (the first steps also compile)" if cfg.compile else ""))
            self.evaluated = True
        losses = self.evaluator(self.model)
        if losses is None:
            return None
        self.last_val = losses["val"]
        self.log("step %d: train loss %.4f, val loss %.4f" % (it, losses["train"], losses["val"]))
        extra = {}
        if self.tasks and self.info.master:
            from . import scoring
            extra = scoring.run_tasks(self.raw, self.tasks, self.task_tokenizer, self.rt.device, self.ctx, cfg.eval_tasks_limit)
            self.log("step %d: %s" % (it, ", ".join("%s %.4f" % kv for kv in extra.items())))
        self.metrics.write("eval", it, self.state.tokens_seen, train_loss=losses["train"], val_loss=losses["val"], lr=lr, **extra)
        improved = losses["val"] < self.state.best_val_loss
        self.state.best_val_loss = min(self.state.best_val_loss, losses["val"])
        self.report.restart()  # evaluation time is not training time
        return dict(losses, improved=improved)

    def time_to_save(self) -> bool:
        """checkpoint_interval_s has passed (agreed by every rank, at log steps under torchrun)."""
        cfg = self.cfg
        if not cfg.checkpoint_interval_s or cfg.eval_only or self.state.iter_num == self.skip_eval_at:
            return False
        due = time.time() - self.last_save >= cfg.checkpoint_interval_s
        if self.info.enabled:
            return self.state.iter_num % cfg.log_interval == 0 and dist.any_rank(due, self.info, self.rt.device)
        return due

    def fault(self, loss: float | None = None) -> str | None:
        """What went wrong with the loss, on any rank: a nan/inf since the last check, or (at a
        log step, with on_loss_fault='rewind') a spike. With on_loss_fault='stop' a nan/inf stops
        the run here (a device sync: called at log steps and before saves only)."""
        cfg = self.cfg
        bad = int(dist.earliest_over_ranks(self.first_bad, self.info).item())
        spike = False
        if loss is not None and cfg.on_loss_fault == "rewind":
            spike = dist.any_rank(self.report.is_spike(loss), self.info, self.rt.device)
        if bad >= 0 and cfg.on_loss_fault == "stop":
            last_good = os.path.join(cfg.out_dir, "ckpt.pt")
            kept = ("%s is left as it was" % last_good) if os.path.exists(last_good) else "no checkpoint was written"
            raise UserError("the loss became nan/inf at iter %d; stopped without saving (%s); lower learning_rate, "
                            "raise warmup_iters, use dtype=bfloat16/float32, or pass --on_loss_fault=rewind" % (bad, kept))
        if bad >= 0:
            return "the loss became nan/inf at iter %d" % bad
        if spike:
            return "a loss spike at iter %d (%.4f, over %g times the running mean)" % (self.state.iter_num, loss, cfg.loss_spike_factor)
        return None

    def rewind(self, why: str) -> None:
        """Back to the last checkpoint's weights, optimizer and iteration, keeping the batch
        stream where it is (the batches that led to the fault are skipped)."""
        cfg, state = self.cfg, self.state
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if state.rewinds >= cfg.max_rewinds:
            raise UserError("%s after %d rewind(s) (max_rewinds=%d): stopped; %s is left as it was; lower learning_rate or "
                            "raise max_rewinds" % (why, state.rewinds, cfg.max_rewinds, path))
        if not os.path.isfile(path):
            raise UserError("%s and no checkpoint has been saved to rewind to: stopped; lower learning_rate or "
                            "evaluate (and save) more often with --eval_interval" % why)
        ckpt = checkpoint.load(path)
        tstate = checkpoint.load_train_state(path, ckpt)
        self.strategy.load_model_state(ckpt["model"], strict="lora" not in ckpt)
        self.load_optimizer(tstate)
        rewinds, scale = state.rewinds + 1, state.lr_scale * cfg.rewind_lr_scale
        fault_iter = state.iter_num
        state.restore_facts(ckpt, self.tokens_per_iter)
        state.rewinds, state.lr_scale = rewinds, scale
        self.first_bad.fill_(-1)
        if self.writes:
            keep_before_resume(self.metrics.path, state.iter_num)
        self.metrics.write("rewind", state.iter_num, state.tokens_seen, reason=why, fault_iter=fault_iter, rewinds=rewinds,
                           lr_scale=scale)
        self.log("rewind %d of %d: %s; back to iter %d from %s, skipping the batches read since%s"
                 % (rewinds, cfg.max_rewinds, why, state.iter_num, path, ", learning rate x%g" % scale if scale != 1 else ""))
        self.skip_eval_at = state.iter_num
        self.save("after rewind %d" % rewinds)

    def save(self, reason: str) -> None:
        """Write a checkpoint (every rank calls this: gathering sharded state needs them all; rank 0 writes)."""
        weights = {"model": self.strategy.model_state(), "model_args": saved_args(self.gconf), "config": self.cfg.to_dict(),
                   **self.state.facts(), "world_size": self.info.world_size}
        spec = lora.spec(self.raw)
        if spec is not None:  # the adapters and where the base is, not the frozen base itself
            weights["model"] = lora.adapter_state(weights["model"])
            weights["lora"] = spec
        train_state = {"optimizer": self.strategy.optimizer_state(self.optimizer),
                       "rng": TrainState.random_state(self.train_loader, self.strategy, self.rt.device)}
        if self.scaler.is_enabled():
            train_state["scaler"] = self.scaler.state_dict()
        if self.writes:
            path = os.path.join(self.cfg.out_dir, "ckpt.pt")
            checkpoint.save_pair(weights, train_state, path, self.cfg.keep_last_k, self.cfg.checkpoint_format)
            self.log("saved checkpoint to %s (%s)" % (path, reason))
        self.last_save = time.time()
        self.report.restart()

    def stopping(self, log_step: bool) -> bool:
        """A stop signal on any rank (agreed at log steps under torchrun)."""
        if self.info.enabled:
            self.stopped = dist.any_rank(self.stop.requested, self.info, self.rt.device) if log_step else False
        else:
            self.stopped = self.stop.requested
        return self.stopped

    def summary(self) -> dict:
        clipped = self.report.close()
        elapsed = time.time() - self.t_start
        s = {"iters": self.steps_run, "final_iter": self.state.iter_num, "seconds": elapsed,
             "best_val_loss": self.state.best_val_loss, "last_val_loss": self.last_val, "last_train_loss": self.report.last_loss,
             "history": self.report.history, "tokens_seen": self.state.tokens_seen, "clipped_steps": clipped,
             "loss_spikes": self.report.spikes, "rewinds": self.state.rewinds}
        if self.steps_run:
            mem = self.rt.max_memory()
            self.log("done: %d iterations in %.1f s (%.1f ms/iter, %s tok/s overall), best val loss %.4f%s"
                     % (self.steps_run, elapsed, 1000 * elapsed / self.steps_run,
                        f"{(self.state.tokens_seen - self.tokens_start) / elapsed:,.0f}", self.state.best_val_loss,
                        ", peak memory %.2f GiB" % (mem / 2**30) if mem else ""))
            if self.cfg.grad_clip > 0 and not self.cfg.optimizer_in_backward:
                self.log("gradients clipped in %d of %d steps; %d loss spike(s) reported" % (clipped, self.steps_run, self.report.spikes))
        return s

    def close(self, failed: bool) -> None:
        self.metrics.close()
        self.train_loader.close()
        if self.lock is not None:
            self.lock.release(failed)


# --------------------------------------------------------------------------------------------
# the loop


def loop(run: Run) -> dict:
    """Train until max_iters, a stop signal or a fault; returns the run's summary."""
    cfg, state, report = run.cfg, run.state, run.report
    if state.iter_num >= cfg.max_iters and not cfg.eval_only:
        run.log("nothing to train: the checkpoint in %s is at iter %d and max_iters is %d; raise --max_iters (and "
                "--lr_decay_iters) to train further" % (cfg.out_dir, state.iter_num, cfg.max_iters))
        return run.summary()
    report.open_bar(state.iter_num, run.info.master and not cfg.eval_only)
    run.stop.armed = True
    while True:
        # 1. the learning rate of this iteration
        lr = run.set_lr()

        # 2. evaluate, and checkpoint
        if run.eval_due():
            losses = run.evaluate(lr)
            if losses is None or cfg.eval_only:
                break  # a stop signal during the evaluation, or all that was asked
            if state.iter_num > run.start_iter and (losses["improved"] or cfg.always_save_checkpoint):
                fault = run.fault()
                if fault:
                    run.rewind(fault)
                    continue
                run.save("val loss %.4f" % losses["val"])
        elif run.time_to_save():
            fault = run.fault()
            if fault:
                run.rewind(fault)
                continue
            run.save("%g s since the last save" % cfg.checkpoint_interval_s)
        if state.iter_num >= cfg.max_iters:
            break

        # 3. the micro-steps, 4. clipping, 5. the optimizer step
        log_step = state.iter_num % cfg.log_interval == 0
        micro = ramp_micro_steps(state.tokens_seen, run.accum, run.micro_tokens, cfg.batch_size_ramp_tokens,
                                 cfg.batch_size_ramp_start)
        layers = LayerStats(run.named) if cfg.log_layer_stats and log_step else None
        if run.step_start is not None and micro > 1:
            run.step_start.mark()
        result = train_step(run.model, run.train_loader.next, run.optimizer, run.scaler, run.strategy, micro, run.ctx,
                            cfg.grad_clip, run.params, measure_norm=log_step, layers=layers,
                            stop=run.stop if run.step_start is not None else None)
        if result.aborted:  # a stop signal between micro-steps: the state is the one before this step
            run.step_start.restore()
            break
        run.first_bad.masked_fill_((run.first_bad < 0) & ~torch.isfinite(result.loss), state.iter_num)  # no sync
        run.steps_run += 1
        state.tokens_seen += micro * run.micro_tokens
        report.step(result.clipped, micro * run.micro_tokens)

        # 6. log
        if log_step:
            loss = result.loss.item()  # a device sync, only at log steps
            fault = run.fault(loss)
            if fault:
                run.rewind(fault)
                continue
            report.write(state.iter_num, state.tokens_seen, loss, lr, result.grad_norm, micro * run.micro_tokens, layers,
                         run.rt.synchronize)
        state.iter_num += 1
        if run.stopping(log_step):
            break
    if (run.stopped or run.stop.requested) and not cfg.eval_only:
        run.log("caught a stop signal at iter %d" % state.iter_num)
        if cfg.always_save_checkpoint and run.fault() is None:
            run.save("stopped by signal")
    run.fault()  # a nan/inf since the last check still ends the run with its line
    return run.summary()


def train(cfg: TrainConfig) -> dict:
    """Train (or, with eval_only, evaluate) as ``cfg`` says; returns the run's summary. Leaves
    with SystemExit(128 + signal) after a stop signal, once the checkpoint is saved."""
    cfg.validate(world_size=dist.world_size_from_env())
    stop = StopFlag().install()
    try:
        device = runtime.resolve_device(cfg.device)
        info, device = dist.init(device, cfg.backend, cfg.dist_timeout)
        try:
            with dist.peer_failures(info, cfg.out_dir):  # a dead or hung rank: one line, not a hang
                run = Run(cfg, info, device, stop)
                failed = True
                try:
                    summary = loop(run)
                    failed = False
                finally:
                    stop.armed = False
                    run.close(failed)
        finally:
            dist.shutdown(info)
    finally:
        stop.restore()
    if stop.signal is not None or run.stopped:
        raise SystemExit(128 + (stop.signal or signal.SIGTERM))
    return summary


def main(argv: list[str] | None = None) -> None:
    run_command(lambda args: train(TrainConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
