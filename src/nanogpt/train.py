"""The training loop: ``python train.py [config.py ...] [--key=value ...]``.

One process:   python train.py config/train_shakespeare_char.py --device=cpu --compile=False
DDP, 1 node:   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
FSDP, 1 node:  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallelism=fsdp
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

from . import checkpoint, dist, fp8, runtime
from .config import ConfigError, TrainConfig, UserError, load_config, run_cli, validate_train
from .metrics import MetricsLog
from .data import BatchLoader, DataError, dataset_dir, prepare_hint
from .model import GPT, GPTConfig
from .optim import build_optimizer, describe, param_groups

ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "rope", "qk_norm", "mlp_activation",
             "untied_head")


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def check_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test_%d" % os.getpid())
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError("out_dir %r is not writable (%s); choose another --out_dir" % (out_dir, e.strerror or e)) from None


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps and saves before leaving."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: leave at once
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def build_model(cfg: TrainConfig, explicit: set, meta: dict | None, log) -> tuple[GPT, dict | None]:
    """The model for init_from, and the checkpoint when resuming."""
    ckpt = None
    if cfg.init_from == "scratch":
        vocab = cfg.vocab_size or (meta["vocab_size"] if meta else 50304)
        if not cfg.vocab_size and not meta:
            log("no meta.json in the dataset folder: vocab_size defaults to 50304 (GPT-2's, padded)")
        vocab = -(-vocab // cfg.vocab_multiple) * cfg.vocab_multiple
        gconf = GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, rope=cfg.rope, qk_norm=cfg.qk_norm,
                          mlp_activation=cfg.mlp_activation, untied_head=cfg.untied_head)
        return GPT(gconf), None
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        ckpt = checkpoint.load(path)
        margs = ckpt["model_args"]
        for k in ARCH_KEYS:
            saved = margs.get(k, getattr(GPTConfig, k))  # a checkpoint from before the feature existed: its default
            if k in explicit and getattr(cfg, k) != saved and not (k == "vocab_size" and getattr(cfg, k) == 0):
                raise ConfigError("%s=%r disagrees with the checkpoint in %s (%s=%r); drop the override or train into a new --out_dir"
                                  % (k, getattr(cfg, k), cfg.out_dir, k, saved))
        model, ckpt = checkpoint.load_model(path, dropout=cfg.dropout)
        return model, ckpt
    log("initialising from GPT-2 weights: %s" % cfg.init_from)
    try:
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    except (OSError, ValueError, ImportError) as e:
        raise UserError("cannot load %s: %s" % (cfg.init_from, e)) from None
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    return model, None


def main(argv: list[str] | None = None) -> None:
    run_cli(train, argv)


def train(argv: list[str]) -> dict:
    cfg, explicit = load_config(TrainConfig, argv)
    world = int(os.environ.get("WORLD_SIZE", "1")) if dist.under_torchrun() else 1
    validate_train(cfg, world)
    device = runtime.resolve_device(cfg.device)
    dinfo, device = dist.init(device, cfg.backend, cfg.dist_timeout)
    try:
        with dist.peer_failures(dinfo, cfg.out_dir):  # a dead or hung rank: one line, not a hang
            return _train(cfg, explicit, dinfo, device)
    finally:
        dist.shutdown(dinfo)


def _train(cfg: TrainConfig, explicit: set, dinfo: dist.DistInfo, device: str) -> dict:
    master = dinfo.master
    log = print if master else (lambda *a, **k: None)
    device_type = device.split(":")[0]
    dtype = runtime.resolve_dtype(cfg.dtype, device_type)
    runtime.setup_backends(device_type)
    if master:
        check_writable(cfg.out_dir)
    accum = cfg.gradient_accumulation_steps // dinfo.world_size

    seed = cfg.seed + dinfo.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    from .prepare import load_meta  # preparation code is only needed for its meta reader
    data_dir = dataset_dir(cfg.data_root, cfg.dataset)
    if not os.path.isdir(data_dir):
        raise DataError("dataset %r not found at %s; %s" % (cfg.dataset, data_dir, prepare_hint(cfg.dataset)))
    meta = load_meta(data_dir)

    model, ckpt = build_model(cfg, explicit, meta, log)
    gconf = model.config
    tokens_per_iter = accum * dinfo.world_size * cfg.batch_size * gconf.block_size
    log("tokens per iteration: %s (%d processes x %d micro-steps x %d x %d)"
        % (f"{tokens_per_iter:,}", dinfo.world_size, accum, cfg.batch_size, gconf.block_size))
    if meta and meta.get("max_token_id") is not None and meta["max_token_id"] >= gconf.vocab_size:
        raise DataError("dataset %r holds token id %d but the model's vocab_size is %d; use a matching dataset or --vocab_size"
                        % (cfg.dataset, meta["max_token_id"], gconf.vocab_size))
    data_dtype = meta.get("dtype", "uint16") if meta else "uint16"

    def loader(split: str, seed_: int, prefetch: int = 0) -> BatchLoader:
        return BatchLoader(data_dir, split, cfg.batch_size, gconf.block_size, device, seed_, data_dtype,
                           gconf.vocab_size, cfg.dataset, prefetch=prefetch)

    train_loader = loader("train", seed, cfg.prefetch)
    loader("val", seed)  # fail now, not at the first evaluation, when val.bin is missing

    model.to(device)
    log("model: %.2fM parameters (%s)" % (model.num_params() / 1e6, ", ".join("%s=%s" % kv for kv in asdict(gconf).items())))
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk
    if cfg.fp8:
        n = fp8.apply(model, device_type, device)
        log("fp8: %d Linear layers in the blocks multiply in float8 (e4m3 forward, e5m2 gradients)" % n)
    sharded = cfg.parallelism == "fsdp" and dinfo.enabled
    if sharded:  # before the optimizer is built: it must hold the sharded parameters
        from . import fsdp
        why = fsdp.unavailable()
        if why:
            raise ConfigError("parallelism='fsdp': %s; or use --parallelism=ddp" % why)
        fsdp.shard(model, dtype)
        log("fsdp: %d blocks and the root sharded over %d processes" % (gconf.n_layer, dinfo.world_size))
    elif cfg.parallelism == "fsdp":
        log("fsdp: one process, nothing to shard; launch with torchrun to shard the model")
    optimizer = build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                device_type, eps=cfg.eps, state_dtype=cfg.optimizer_state_dtype,
                                in_backward=cfg.optimizer_in_backward, seed=cfg.seed, muon_lr=cfg.muon_lr,
                                muon_momentum=cfg.muon_momentum)
    log(describe(param_groups(model, cfg.weight_decay)))
    if cfg.optimizer == "muon":
        mats = [p for g in optimizer.param_groups if g.get("muon") for p in g["params"]]
        log("muon: %d block matrices (%s parameters) at muon_lr=%g; embeddings, head and vectors with AdamW at learning_rate=%g"
            % (len(mats), f"{sum(p.numel() for p in mats):,}", cfg.muon_lr, cfg.learning_rate))

    iter_num, best_val_loss, tokens_seen = 0, float("inf"), 0
    if ckpt is not None:
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        prev = ckpt.get("config") or {}
        for k in ("optimizer", "optimizer_in_backward", "optimizer_state_dtype"):
            if k in prev and prev[k] != getattr(cfg, k):
                raise checkpoint.CheckpointError("the checkpoint in %s was trained with %s=%r, not %r; pass --%s=%r to resume it"
                                                 % (cfg.out_dir, k, prev[k], getattr(cfg, k), k, prev[k]))
        tstate = checkpoint.load_train_state(ckpt_path, ckpt)
        # the checkpoint gives the optimizer's state; this run's settings give its hyper-parameters
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            if sharded:  # every rank read the full state; each keeps its shards
                fsdp.load_optimizer_state(model, optimizer, tstate["optimizer"])
            else:
                optimizer.load_state_dict(tstate["optimizer"])
        except (ValueError, KeyError) as e:
            raise checkpoint.CheckpointError("optimizer state in %s does not fit (%s); was it written with another --optimizer?"
                                             % (cfg.out_dir, e)) from None
        for group, mine in zip(optimizer.param_groups, settings):  # load_state_dict put the saved ones back
            group.update(mine)
        if "scaler" in tstate and scaler.is_enabled():
            scaler.load_state_dict(tstate["scaler"])
        iter_num = ckpt["iter_num"]
        best_val_loss = ckpt.get("best_val_loss", best_val_loss)
        tokens_seen = ckpt.get("tokens_seen", iter_num * tokens_per_iter)
        rng = tstate.get("rng")
        same_world = ckpt.get("world_size", 1) == dinfo.world_size
        if rng and master and same_world:
            checkpoint.set_rng_state(rng)
            train_loader.load_state_dict(rng["loader"])
        elif rng and same_world and len(rng.get("ranks", [])) == dinfo.world_size:  # this rank's own streams
            mine = rng["ranks"][dinfo.rank]
            torch.set_rng_state(mine["torch"])
            if "cuda" in mine and device_type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], device)
            train_loader.load_state_dict({"generator": mine["loader"]})
        else:  # another world size: a fresh, deterministic stream per rank
            torch.manual_seed(seed + 1000003 * iter_num)
            train_loader.reseed(seed + 1000003 * iter_num)
        log("resumed from %s at iter %d (best val loss %.4f)" % (ckpt_path, iter_num, best_val_loss))
        del ckpt, tstate

    raw_model = model
    model = runtime.compile_model(model, cfg.compile, device_type, log, cfg.compile_mode)
    if dinfo.enabled and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dinfo.local_rank] if device_type == "cuda" else None)
    ctx = runtime.autocast(device_type, dtype, cache=not cfg.activation_checkpointing)

    wandb = None
    if cfg.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb_log=True but wandb is not installed: pip install wandb, or pass --wandb_log=False") from None
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    metrics = MetricsLog(cfg.out_dir, master, iter_num if cfg.init_from == "resume" else None, cfg.tensorboard_log, wandb)

    tasks, task_tokenizer = {}, None
    if cfg.eval_tasks:
        from . import evaluate
        from .tokenizer import load_tokenizer
        tasks = evaluate.parse_tasks(cfg.eval_tasks)
        task_tokenizer = load_tokenizer(meta)

    @torch.no_grad()
    def estimate_loss() -> dict:
        out = {}
        model.eval()
        for i, split in enumerate(("train", "val")):
            # the same batches at every evaluation, and none taken from the training stream
            ev = loader(split, cfg.seed + 7919 * (i + 1) + dinfo.rank)
            losses = torch.zeros(cfg.eval_iters, device=device)
            for k in range(cfg.eval_iters):
                X, Y = ev.next()
                with ctx:
                    _, loss = model(X, Y)
                losses[k] = loss.float()
            out[split] = dist.all_reduce_mean(losses.mean(), dinfo).item()
        model.train()
        return out

    def model_state() -> dict:
        return fsdp.full_model_state(raw_model) if sharded else raw_model.state_dict()

    def optimizer_state() -> dict:
        return fsdp.full_optimizer_state(raw_model, optimizer) if sharded else optimizer.state_dict()

    def save_checkpoint(reason: str) -> None:
        """Called on every rank (gathering sharded state may need them all); rank 0 writes."""
        weights = {
            "format": checkpoint.FORMAT,
            "model": model_state(),
            "model_args": asdict(gconf),
            "config": asdict(cfg),
            "iter_num": iter_num,
            "tokens_seen": tokens_seen,
            "best_val_loss": float(best_val_loss),
            "world_size": dinfo.world_size,
        }
        train_state = {"optimizer": optimizer_state(),
                       "rng": {**checkpoint.rng_state(), "loader": train_loader.state_dict()}}
        if dinfo.enabled:  # the other ranks' dropout and batch streams, so a resume repeats them too
            mine = {"torch": torch.get_rng_state(), "loader": train_loader.state_dict()["generator"]}
            if device_type == "cuda":
                mine["cuda"] = torch.cuda.get_rng_state(device)
            train_state["rng"]["ranks"] = dist.gather_states(mine, dinfo, device)
        if scaler.is_enabled():
            train_state["scaler"] = scaler.state_dict()
        if master:
            path = os.path.join(cfg.out_dir, "ckpt.pt")
            checkpoint.save_pair(weights, train_state, path, cfg.keep_last_k)
            log("saved checkpoint to %s (%s)" % (path, reason))

    peak = runtime.peak_flops(device, dtype, cfg.peak_flops)
    flops_per_token = raw_model.flops_per_token(gconf.block_size)
    micro_tokens = dinfo.world_size * cfg.batch_size * gconf.block_size  # one micro-step on every rank

    def micro_steps(tokens: int) -> int:
        """Micro-steps per rank for the next step: all of them, or fewer early in a batch-size ramp."""
        if not cfg.batch_size_ramp_tokens:
            return accum
        start = max(cfg.batch_size_ramp_start, micro_tokens)
        want = start + min(1.0, tokens / cfg.batch_size_ramp_tokens) * (tokens_per_iter - start)
        return max(1, min(accum, math.ceil(want / micro_tokens)))

    named = [(n, p) for n, p in raw_model.named_parameters()]
    params = [p for _, p in named]
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first iteration with a non-finite loss
    clipped = torch.zeros((), dtype=torch.long, device=device)  # steps clipped since the last log line
    health = {"clipped": 0, "spikes": 0, "loss_ema": None}

    def check_finite() -> None:
        """Stop, without saving, at a nan/inf loss on any rank (a device sync: log steps and saves only)."""
        bad = int(dist.earliest_over_ranks(first_bad, dinfo).item())  # every rank stops, naming the first bad iteration
        if bad >= 0:
            last_good = os.path.join(cfg.out_dir, "ckpt.pt")
            kept = ("%s is left as it was" % last_good) if os.path.exists(last_good) else "no checkpoint was written"
            raise UserError("the loss became nan/inf at iter %d; stopped without saving (%s); lower learning_rate, "
                            "raise warmup_iters or use dtype=bfloat16/float32" % (bad, kept))

    def no_sync():
        """Skip the gradient reduction in a micro-step that is not its step's last."""
        return fsdp.no_sync(raw_model) if sharded else model.no_sync()

    stop = StopFlag()
    stop.install()
    start_iter, t_start, tokens_start = iter_num, time.time(), tokens_seen
    t_last, iters_since, tokens_since = time.time(), 0, 0
    last = {"loss": None, "val": None}
    history = []  # (iter, train loss) at each log step
    try:
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's matrices keep their own scale

            resumed_here = iter_num == start_iter and start_iter > 0 and not cfg.eval_only
            if cfg.eval_only or ((iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not resumed_here):
                losses = estimate_loss()
                last["val"] = losses["val"]
                log("step %d: train loss %.4f, val loss %.4f" % (iter_num, losses["train"], losses["val"]))
                extra = {}
                if tasks and master:
                    extra = evaluate.run_tasks(raw_model, tasks, task_tokenizer, device, ctx, cfg.eval_tasks_limit)
                    log("step %d: %s" % (iter_num, ", ".join("%s %.4f" % kv for kv in extra.items())))
                metrics.write("eval", iter_num, tokens_seen, train_loss=losses["train"], val_loss=losses["val"], lr=lr, **extra)
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                    check_finite()
                    save_checkpoint("val loss %.4f" % losses["val"])
                t_last, iters_since, tokens_since = time.time(), 0, 0  # evaluation time is not training time
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break

            log_step = iter_num % cfg.log_interval == 0
            layer_stats = cfg.log_layer_stats and log_step
            if layer_stats:
                before = {n: p.detach().float().clone() for n, p in named}
            n_micro = micro_steps(tokens_seen)
            step_loss = torch.zeros((), device=device)
            for micro in range(n_micro):
                X, Y = train_loader.next()
                sync = nullcontext() if (not dinfo.enabled or micro == n_micro - 1) else no_sync()
                with sync:
                    with ctx:
                        _, loss = model(X, Y)
                        loss = loss / n_micro  # the mean over micro-steps, not their sum
                    scaler.scale(loss).backward()
                step_loss += loss.detach().float()
            first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(step_loss), iter_num)  # no sync
            grad_norm = None
            if (cfg.grad_clip > 0 or log_step) and not cfg.optimizer_in_backward:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if sharded:  # a replicated DTensor
                    grad_norm = grad_norm.full_tensor()
                if cfg.grad_clip > 0:
                    clipped += grad_norm > cfg.grad_clip
            if layer_stats:
                grads = {n: (p.grad.detach().float().norm() if p.grad is not None else None) for n, p in named}
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iters_since += 1
            tokens_since += n_micro * micro_tokens
            tokens_seen += n_micro * micro_tokens

            if log_step:
                lossf = step_loss.item()  # a device sync, only at log steps
                check_finite()
                last["loss"] = lossf
                history.append((iter_num, lossf))
                runtime.synchronize(device_type)
                now = time.time()
                dt = (now - t_last) / iters_since
                tok_s = tokens_since / (now - t_last)
                gn = grad_norm.item() if grad_norm is not None else float("nan")  # nan: freed in backward
                n_clipped = int(clipped.item())
                clip_frac = n_clipped / iters_since if cfg.grad_clip > 0 else None
                health["clipped"] += n_clipped
                clipped.zero_()
                line = "iter %d: loss %.4f, lr %.3e, grad norm %.3f, %.2f ms/iter, %s tok/s" % (
                    iter_num, lossf, lr, gn, dt * 1000, f"{tok_s:,.0f}")
                mfu = None
                if peak:
                    mfu = 100 * flops_per_token * tok_s / (peak * dinfo.world_size)
                    line += ", mfu %.1f%%" % mfu
                if cfg.batch_size_ramp_tokens:
                    line += ", %s tokens/step" % f"{n_micro * micro_tokens:,}"
                log(line)
                ema = health["loss_ema"]
                spike = bool(cfg.loss_spike_factor and ema is not None and lossf > cfg.loss_spike_factor * ema)
                if spike:
                    health["spikes"] += 1
                    log("loss spike at iter %d: %.4f is %.1fx the running mean %.4f" % (iter_num, lossf, lossf / ema, ema))
                else:  # a spike does not move the mean it is judged against
                    health["loss_ema"] = lossf if ema is None else 0.9 * ema + 0.1 * lossf
                mem = runtime.max_memory_allocated(device_type)
                rec = dict(loss=lossf, lr=lr, grad_norm=None if grad_norm is None else gn, clip_frac=clip_frac,
                           ms_per_iter=dt * 1000, tokens_per_s=tok_s, mfu=mfu, memory_gib=mem / 2**30 if mem else None,
                           tokens_per_step=n_micro * micro_tokens)
                if spike:
                    rec["spike"] = True
                if layer_stats:
                    rec["layers"] = layer_report(named, before, grads)
                    del before, grads
                    worst = max(rec["layers"].items(), key=lambda kv: kv[1]["update_ratio"])
                    log("iter %d: largest update/weight ratio %.2e in %s" % (iter_num, worst[1]["update_ratio"], worst[0]))
                metrics.write("train", iter_num, tokens_seen, **rec)
                t_last, iters_since, tokens_since = time.time(), 0, 0
            iter_num += 1

            stopping = stop.signal is not None
            if dinfo.enabled:  # every rank asks at the same steps, or the collectives would mismatch
                stopping = dist.any_rank(stopping, dinfo, device) if log_step else False
            if stopping:
                log("caught a stop signal at iter %d" % iter_num)
                if cfg.always_save_checkpoint:
                    check_finite()
                    save_checkpoint("stopped by signal")
                break
        check_finite()
    finally:
        stop.restore()
        metrics.close()
        train_loader.close()

    elapsed = time.time() - t_start
    done = iter_num - start_iter
    health["clipped"] += int(clipped.item())
    summary = {"iters": done, "final_iter": iter_num, "seconds": elapsed, "best_val_loss": best_val_loss,
               "last_val_loss": last["val"], "last_train_loss": last["loss"], "history": history,
               "tokens_seen": tokens_seen, "clipped_steps": health["clipped"], "loss_spikes": health["spikes"]}
    if done:
        mem = runtime.max_memory_allocated(device_type)
        log("done: %d iterations in %.1f s (%.1f ms/iter, %s tok/s overall), best val loss %.4f%s"
            % (done, elapsed, 1000 * elapsed / done, f"{(tokens_seen - tokens_start) / elapsed:,.0f}", best_val_loss,
               ", peak memory %.2f GiB" % (mem / 2**30) if mem else ""))
        if cfg.grad_clip > 0 and not cfg.optimizer_in_backward:
            log("gradients clipped in %d of %d steps; %d loss spike(s) reported"
                % (health["clipped"], done, health["spikes"]))
    if stop.signal is not None:
        raise SystemExit(128 + stop.signal)
    return summary


def layer_of(name: str) -> str:
    """transformer.h.3.attn.c_attn.weight -> transformer.h.3; transformer.wte.weight -> transformer.wte"""
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) > 2 and parts[1] == "h" else ".".join(parts[:2])


def _scalar(t: torch.Tensor) -> float:
    """A scalar tensor as a float; a DTensor (under FSDP) is first reduced over the ranks, which all call this."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def layer_report(named, before: dict, grads: dict) -> dict:
    """Per layer: gradient norm (None where gradients were freed in backward), weight norm, and
    the norm of this step's update over the weight norm."""
    sq = {}
    for n, p in named:
        acc = sq.setdefault(layer_of(n), {"grad": 0.0, "weight": 0.0, "update": 0.0, "has_grad": True})
        w = p.detach().float()
        acc["weight"] += _scalar(w.square().sum())
        acc["update"] += _scalar((w - before[n]).square().sum())
        if grads[n] is None:
            acc["has_grad"] = False
        else:
            acc["grad"] += _scalar(grads[n]) ** 2
    return {k: {"grad_norm": math.sqrt(v["grad"]) if v["has_grad"] else None, "weight_norm": math.sqrt(v["weight"]),
                "update_ratio": math.sqrt(v["update"]) / max(math.sqrt(v["weight"]), 1e-12)} for k, v in sq.items()}


if __name__ == "__main__":
    main()
