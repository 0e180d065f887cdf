"""Benchmark training steps: ``python bench.py [--key=value ...]``.

Times :func:`nanogpt.trainer.train_step`, the step train.py runs (micro-steps, clipping, the
optimizer step), and prints ms/iter, tokens/s, MFU and peak memory for the model shape given
(GPT-2 124M by default), on real data when the dataset is prepared, else random tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from . import fp8, lora, runtime
from .config import Config, Section, setting
from .data import BatchLoader, DataConfig, has_split, load_meta
from .errors import ConfigError, run_command
from .lora import LoraConfig
from .model import GPT, GPTConfig
from .optim import OptimConfig, build, optimizer_state_bytes
from .parallel import Single
from .dist import DistInfo
from .runtime import RuntimeConfig, SpeedConfig
from .trainer import train_step


@dataclass
class BenchSettings(Section):
    """How bench.py times the step."""

    real_data: bool = setting(True, "Read batches from data_root/dataset when it exists; otherwise random tokens.")
    warmup_steps: int = setting(10, "Untimed steps first (compilation, allocator warm-up).", ge=0)
    steps: int = setting(20, "Timed steps.", gt=0)
    profile: bool = setting(False, "Write a torch.profiler trace (Chrome/TensorBoard format) to profile_dir.")
    profile_dir: str = setting("bench_log", "Where the profiler trace goes.", path="out")
    measure_peak: bool = setting(False, "Also time a large matrix product in the chosen dtype and report MFU against it.")
    json_out: str = setting("", "Also write the results as JSON to this file.")


class BenchConfig(Config):
    """Every key of bench.py: the model, optimizer, data and runtime sections of train.py."""

    sections = (("bench", BenchSettings), ("data", DataConfig), ("model", GPTConfig), ("lora", LoraConfig), ("optim", OptimConfig),
                ("speed", SpeedConfig), ("runtime", RuntimeConfig))
    defaults = {"bias": False, "gradient_accumulation_steps": 1}

    def check(self) -> None:
        if self.optimizer_in_backward and self.gradient_accumulation_steps != 1:
            raise ConfigError("optimizer_in_backward=True needs gradient_accumulation_steps=1")
        if self.lora_rank and self.fp8:
            raise ConfigError("lora_rank=%d is not checked with fp8=True; pass --fp8=False or --lora_rank=0" % self.lora_rank)


def measure_matmul_peak(device: str, dtype: str, n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a large square matrix product in this dtype: the ceiling this device reaches."""
    dt = runtime.PTDTYPE[dtype]
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    runtime.synchronize(device.split(":")[0])
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    runtime.synchronize(device.split(":")[0])
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def batches(cfg: BenchConfig, device: str):
    """(next_batch, loader or None, a description): the dataset's batches, or random tokens."""
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    meta = (load_meta(data_dir) if cfg.real_data and os.path.isdir(data_dir) else None) or {}
    if cfg.real_data and has_split(data_dir, "train", meta):
        loader = BatchLoader(data_dir, "train", cfg.batch_size, cfg.block_size, device, cfg.seed,
                             meta.get("dtype", "uint16"), cfg.vocab_size, cfg.dataset, prefetch=cfg.prefetch, meta=meta)
        return loader.next, loader, "data from %s" % data_dir
    gen = torch.Generator().manual_seed(cfg.seed)

    def random_batch():
        t = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=gen)
        return t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)
    return random_batch, None, "random tokens"


def bench(cfg: BenchConfig) -> dict:
    """Time ``steps`` training steps after ``warmup_steps``; prints and returns the figures."""
    cfg.validate()
    rt = runtime.setup(cfg.runtime, log=None)
    next_batch, loader, source = batches(cfg, rt.device)
    with torch.device(rt.device):  # initialise in place: a 1.5B model builds in seconds on a GPU
        model = GPT(cfg.model)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk
    if cfg.lora_rank:  # adapters on the random weights: the same step as a LoRA finetune
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, {"kind": "random"})
    optimizer = build(model, cfg.optim, rt.device_type, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.gradient_accumulation_steps
    flops_per_token = model.flops_per_token(cfg.block_size)
    if cfg.lora_rank:  # a frozen weight takes no gradient: 4 FLOPs per token, not 6
        flops_per_token -= 2 * (model.num_params() - lora.trainable_counts(model)[0])
    flops_per_iter = flops_per_token * cfg.batch_size * cfg.block_size * accum
    if cfg.fp8:
        fp8.apply(model, rt.device_type, rt.device)
    rt.threads.settle()
    compiled = runtime.compile_model(model, cfg.compile, rt.device_type, mode=cfg.compile_mode)
    ctx = rt.autocast(cache=not cfg.activation_checkpointing)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=(rt.dtype == "float16"))
    strategy = Single(DistInfo(), rt.device)
    strategy.shard(model, rt.dtype)
    strategy.wrap(compiled)
    print("bench: %.1fM parameters, batch %dx%d, %s, %s, %s, compile=%s%s%s%s"
          % (sum(p.numel() for p in model.parameters()) / 1e6, cfg.batch_size, cfg.block_size, rt.device, rt.dtype,
             source, cfg.compile, " (%s)" % cfg.compile_mode if cfg.compile and cfg.compile_mode != "default" else "",
             ", fp8" if cfg.fp8 else "", ", loss_chunk=%d" % cfg.loss_chunk if cfg.loss_chunk else ""), flush=True)
    if cfg.lora_rank:
        trained, total = lora.trainable_counts(model)
        print("bench: lora rank %d on %s: %s of %s parameters train" % (cfg.lora_rank, cfg.lora_targets, f"{trained:,}", f"{total:,}"),
              flush=True)

    def step():
        return train_step(compiled, next_batch, optimizer, scaler, strategy, accum, ctx, cfg.grad_clip, params,
                          measure_norm=False)

    t0 = shown = time.time()
    for i in range(cfg.warmup_steps):
        step()
        if i == 0 or time.time() - shown > 10:  # the first steps compile: say where it is
            shown = time.time()
            print("warm-up step %d of %d (%.1f s)" % (i + 1, cfg.warmup_steps, shown - t0), file=sys.stderr, flush=True)
    rt.synchronize()
    warmup_s = time.time() - t0
    rt.reset_peak_memory()

    prof = None
    if cfg.profile:
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device_type == "cuda" else [])
        prof = profile(activities=acts, on_trace_ready=tensorboard_trace_handler(cfg.profile_dir), record_shapes=False)
        prof.start()
    t0 = time.time()
    for _ in range(cfg.steps):
        result = step()
        if prof:
            prof.step()
    lossf = result.loss.item()
    rt.synchronize()
    dt = (time.time() - t0) / cfg.steps
    if loader is not None:
        loader.close()
    if prof:
        prof.stop()
        print("profiler trace written to %s" % cfg.profile_dir)
    return report(cfg, rt, dt, lossf, warmup_s, flops_per_iter, optimizer_state_bytes(optimizer))


def report(cfg: BenchConfig, rt, dt: float, lossf: float, warmup_s: float, flops_per_iter: float, state_bytes: int) -> dict:
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    result = {"ms_per_iter": dt * 1000, "tokens_per_s": tokens / dt, "warmup_s": warmup_s, "loss": lossf,
              "peak_memory_gib": rt.max_memory() / 2**30, "optimizer_state_gib": state_bytes / 2**30}
    line = "%.2f ms/iter, %s tokens/s, loss %.4f, warm-up %.1f s" % (
        result["ms_per_iter"], f"{result['tokens_per_s']:,.0f}", lossf, warmup_s)
    peak = runtime.peak_flops(rt.device, rt.dtype, cfg.peak_flops)
    if peak:
        result["mfu"] = flops_per_iter / dt / peak
        line += ", MFU %.1f%% of %.0f TFLOP/s" % (100 * result["mfu"], peak / 1e12)
    if cfg.measure_peak and rt.device_type != "cpu":
        measured = measure_matmul_peak(rt.device, rt.dtype)
        result["measured_peak"] = measured
        result["mfu_measured"] = flops_per_iter / dt / measured
        line += ", MFU %.1f%% of the measured matmul peak %.0f TFLOP/s" % (100 * result["mfu_measured"], measured / 1e12)
    line += ", optimizer state %.2f GiB" % result["optimizer_state_gib"]
    if result["peak_memory_gib"]:
        line += ", peak memory %.2f GiB" % result["peak_memory_gib"]
    print(line)
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump({**result, "config": cfg.to_dict()}, f)
    return result


def main(argv: list[str] | None = None) -> None:
    run_command(lambda args: bench(BenchConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
