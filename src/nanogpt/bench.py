"""Benchmark training steps: ``python bench.py [--key=value ...]``.

Prints ms/iter, tokens/s, MFU and peak memory for the model shape given (GPT-2 124M by
default), on real data when the dataset is prepared, else random tokens.
"""

from __future__ import annotations

import os
import time

import torch

from . import fp8, runtime
from .config import BenchConfig, load_config, run_cli
from .model import GPT, GPTConfig
from .optim import build_optimizer, optimizer_state_bytes


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


def main(argv: list[str] | None = None) -> None:
    run_cli(bench, argv)


def bench(argv: list[str]) -> dict:
    cfg, _ = load_config(BenchConfig, argv)
    cfg.validate()
    device, device_type, dtype = runtime.setup(cfg.device, cfg.dtype, cfg.seed)

    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    loader = None
    if cfg.real_data and os.path.isfile(os.path.join(data_dir, "train.bin")):
        from .data import BatchLoader
        from .prepare import load_meta
        meta = load_meta(data_dir) or {}
        loader = BatchLoader(data_dir, "train", cfg.batch_size, cfg.block_size, device, cfg.seed,
                             meta.get("dtype", "uint16"), cfg.vocab_size, cfg.dataset, prefetch=cfg.prefetch)
        get_batch = loader.next
        source = "data from %s" % data_dir
    else:
        gen = torch.Generator().manual_seed(cfg.seed)

        def get_batch():
            t = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=gen)
            return t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)
        source = "random tokens"

    gconf = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, rope=cfg.rope,
                      qk_norm=cfg.qk_norm, mlp_activation=cfg.mlp_activation, untied_head=cfg.untied_head)
    with torch.device(device):  # initialise in place: a 1.5B model builds in seconds on a GPU
        model = GPT(gconf)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk
    optimizer = build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, (0.9, 0.95), device_type,
                                state_dtype=cfg.optimizer_state_dtype, in_backward=cfg.optimizer_in_backward, seed=cfg.seed,
                                muon_lr=cfg.muon_lr)
    flops_per_iter = model.flops_per_token(cfg.block_size) * cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    if cfg.fp8:
        fp8.apply(model, device_type, device)
    model = runtime.compile_model(model, cfg.compile, device_type, mode=cfg.compile_mode)
    ctx = runtime.autocast(device_type, dtype, cache=not cfg.activation_checkpointing)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    print("bench: %.1fM parameters, batch %dx%d, %s, %s, %s, compile=%s%s%s%s"
          % (sum(p.numel() for p in model.parameters()) / 1e6, cfg.batch_size, cfg.block_size, device, dtype,
             source, cfg.compile, " (%s)" % cfg.compile_mode if cfg.compile and cfg.compile_mode != "default" else "",
             ", fp8" if cfg.fp8 else "", ", loss_chunk=%d" % cfg.loss_chunk if cfg.loss_chunk else ""))

    def step():
        for _ in range(cfg.gradient_accumulation_steps):
            X, Y = get_batch()
            with ctx:
                _, loss = model(X, Y)
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(cfg.warmup_steps):
        loss = step()
    runtime.synchronize(device_type)
    warmup_s = time.time() - t0
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    prof = None
    if cfg.profile:
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        prof = profile(activities=acts, on_trace_ready=tensorboard_trace_handler(cfg.profile_dir), record_shapes=False)
        prof.start()
    t0 = time.time()
    for _ in range(cfg.steps):
        loss = step()
        if prof:
            prof.step()
    lossf = loss.item()
    runtime.synchronize(device_type)
    dt = (time.time() - t0) / cfg.steps
    if loader is not None:
        loader.close()
    if prof:
        prof.stop()
        print("profiler trace written to %s" % cfg.profile_dir)

    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    result = {"ms_per_iter": dt * 1000, "tokens_per_s": tokens / dt, "warmup_s": warmup_s, "loss": lossf,
              "peak_memory_gib": runtime.max_memory_allocated(device_type) / 2**30,
              "optimizer_state_gib": optimizer_state_bytes(optimizer) / 2**30}
    line = "%.2f ms/iter, %s tokens/s, loss %.4f, warm-up %.1f s" % (
        result["ms_per_iter"], f"{result['tokens_per_s']:,.0f}", lossf, warmup_s)
    peak = runtime.peak_flops(device, dtype, cfg.peak_flops)
    if peak:
        result["mfu"] = flops_per_iter / dt / peak
        line += ", MFU %.1f%% of %.0f TFLOP/s" % (100 * result["mfu"], peak / 1e12)
    if cfg.measure_peak and device_type != "cpu":
        measured = measure_matmul_peak(device, dtype)
        result["measured_peak"] = measured
        result["mfu_measured"] = flops_per_iter / dt / measured
        line += ", MFU %.1f%% of the measured matmul peak %.0f TFLOP/s" % (100 * result["mfu_measured"], measured / 1e12)
    line += ", optimizer state %.2f GiB" % result["optimizer_state_gib"]
    if result["peak_memory_gib"]:
        line += ", peak memory %.2f GiB" % result["peak_memory_gib"]
    print(line)
    if cfg.json_out:
        import json
        with open(cfg.json_out, "w") as f:
            json.dump({**result, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}, f)
    return result


if __name__ == "__main__":
    main()
