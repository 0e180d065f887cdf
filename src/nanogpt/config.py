"""Typed configuration: dataclasses with one docstring per field, nanoGPT-style config files
(plain Python files evaluated in their own namespace) and ``--key=value`` overrides.

Every field of a config class carries its help text in ``field(metadata={"help": ...})`` so the
README table and ``--help`` are generated from the same source. All checks live in
``validate()``; every failure raises :class:`ConfigError` with one line that names the key.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import runpy
import types
from dataclasses import dataclass, field, fields


class UserError(Exception):
    """A problem the user can fix; the CLI prints its one-line message and exits with status 2."""


def run_cli(fn, argv: list[str] | None) -> None:
    """Run a command; a UserError becomes one line on stderr and exit status 2."""
    import sys
    try:
        fn(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print("error: %s" % e, file=sys.stderr)
        sys.exit(2)


class ConfigError(UserError, ValueError):
    """A configuration problem; the message is one line that names the key."""


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = _f("out", "Folder for ckpt.pt and logs.")
    eval_interval: int = _f(2000, "Evaluate train/val loss (and save a checkpoint) every this many iterations.")
    log_interval: int = _f(1, "Print a log line every this many iterations.")
    eval_iters: int = _f(200, "Batches per split for each loss estimate.")
    eval_only: bool = _f(False, "Evaluate once and exit (no training).")
    always_save_checkpoint: bool = _f(True, "Save at every evaluation, not only when val loss improves; also save on Ctrl-C/SIGTERM.")
    keep_last_k: int = _f(0, "Also keep the last k checkpoints as ckpt_{iter}.pt (hard links where possible), pruning older ones; 0 keeps only ckpt.pt.")
    tensorboard_log: bool = _f(False, "Also write the logged metrics as TensorBoard events into out_dir/tensorboard (needs the tensorboard package).")
    # evaluation tasks and health of a run
    eval_tasks: str = _f("", "Evaluations run at every eval_interval besides train/val loss, e.g. 'hellaswag=path/val.jsonl,lambada=path/test.jsonl,ppl=path/text.txt' (see eval.py).")
    eval_tasks_limit: int = _f(0, "Examples per evaluation task at each eval_interval (0 = all).")
    log_layer_stats: bool = _f(False, "At log steps, also record per-layer gradient norm, weight norm and update/weight ratio in metrics.jsonl.")
    loss_spike_factor: float = _f(3.0, "Report a loss spike when a logged loss exceeds this factor times its running mean (0 disables).")
    # batch-size schedule
    batch_size_ramp_tokens: int = _f(0, "Grow tokens per step linearly over this many training tokens, from batch_size_ramp_start up to the full batch, by raising the micro-steps per step (0 = no ramp). The learning-rate schedule is unchanged.")
    batch_size_ramp_start: int = _f(0, "Tokens per step at the start of the ramp (rounded up to whole micro-steps; at least one micro-step per process).")
    init_from: str = _f("scratch", "'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local Hugging Face folder.")
    # wandb
    wandb_log: bool = _f(False, "Log to Weights & Biases (wandb is imported only when this is on).")
    wandb_project: str = _f("owt", "wandb project name.")
    wandb_run_name: str = _f("gpt2", "wandb run name.")
    # data
    dataset: str = _f("openwebtext", "Dataset folder name under data_root, holding train.bin, val.bin and meta.json.")
    data_root: str = _f("data", "Folder that holds the dataset folders.")
    gradient_accumulation_steps: int = _f(40, "Micro-steps per optimizer step, summed over all processes (divided by the world size under DDP).")
    batch_size: int = _f(12, "Sequences per micro-step per process.")
    block_size: int = _f(1024, "Context length in tokens.")
    prefetch: int = _f(2, "Training batches a background thread reads ahead while the device works (0 reads each in the loop); the batches and a resume are the same either way.")
    # model
    n_layer: int = _f(12, "Transformer blocks.")
    n_head: int = _f(12, "Attention heads per block.")
    n_embd: int = _f(768, "Embedding width.")
    dropout: float = _f(0.0, "Dropout probability (0.0 for pretraining, try 0.1+ for finetuning).")
    bias: bool = _f(False, "Bias in Linear and LayerNorm layers (GPT-2 has them; False is slightly better and faster).")
    vocab_size: int = _f(0, "Vocabulary size; 0 takes it from the dataset's meta.json, or 50304 (GPT-2's 50257 padded) without one.")
    vocab_multiple: int = _f(1, "Round the vocabulary up to a multiple of this (64 helps GPU matmuls); padded ids are never sampled.")
    # optional model features (the defaults are GPT-2's architecture)
    rope: bool = _f(False, "Rotary position embeddings (RoPE) on queries and keys instead of GPT-2's learned position table.")
    qk_norm: bool = _f(False, "RMS-normalise queries and keys per head before attention (steadier at high learning rates).")
    mlp_activation: str = _f("gelu", "MLP non-linearity: 'gelu' (GPT-2's tanh GELU) or 'relu2' (ReLU squared).")
    untied_head: bool = _f(False, "Give the output layer its own weights instead of sharing the token embeddings.")
    # optimizer
    optimizer: str = _f("adamw", "Optimizer: 'adamw' (8 bytes of state per parameter), 'striped_adamw' (Adam's first moment, factored second moment: about 4), 'adafactor' (torch's, no momentum: about 0), 'muon' (Muon for the matrices inside the blocks, AdamW for the rest).")
    muon_lr: float = _f(0.02, "optimizer='muon': peak learning rate of the Muon matrices (the others take learning_rate; one schedule scales both).")
    muon_momentum: float = _f(0.95, "optimizer='muon': momentum of the Muon matrices (Nesterov).")
    optimizer_state_dtype: str = _f("float32", "Dtype of striped_adamw's first moment: 'float32' or 'bfloat16' (stochastic rounding, half the bytes).")
    optimizer_in_backward: bool = _f(False, "Step each parameter inside backward as soon as its gradient is ready and free it: no full set of gradients is held. Needs gradient_accumulation_steps=1, grad_clip=0, one process, no float16.")
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in backward instead of storing them: less memory, about a third more compute.")
    loss_chunk: int = _f(0, "Compute the output layer and cross-entropy this many positions at a time, never holding the (batch x block x vocab) logits; 0 computes them at once.")
    fp8: bool = _f(False, "Multiply in float8 in the blocks' Linear layers (e4m3 inputs and weights, e5m2 gradients, one scale per tensor, torch._scaled_mm); weights and checkpoints are unchanged. Needs a GPU of compute capability 8.9+ (H100, L4, RTX 40xx); on the CPU the same numbers come from float32 products (for checking, not speed).")
    compile_mode: str = _f("default", "torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune' or 'max-autotune-no-cudagraphs'.")
    learning_rate: float = _f(6e-4, "Peak learning rate.")
    max_iters: int = _f(600000, "Total optimizer steps.")
    weight_decay: float = _f(1e-1, "Decoupled weight decay, applied to parameters with 2 or more dimensions only.")
    beta1: float = _f(0.9, "Adam beta1.")
    beta2: float = _f(0.95, "Adam beta2.")
    eps: float = _f(1e-8, "Adam epsilon, added outside the square root.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value; 0.0 disables clipping.")
    # learning-rate schedule
    decay_lr: bool = _f(True, "Cosine decay of the learning rate after a linear warmup; False keeps it constant.")
    warmup_iters: int = _f(2000, "Linear warmup steps.")
    lr_decay_iters: int = _f(600000, "Step at which the cosine decay reaches min_lr (about max_iters).")
    min_lr: float = _f(6e-5, "Floor of the learning rate (about learning_rate/10).")
    # distributed
    backend: str = _f("auto", "torch.distributed backend under torchrun: 'auto' (nccl on CUDA, gloo otherwise), 'nccl' or 'gloo'.")
    parallelism: str = _f("ddp", "Under torchrun: 'ddp' (every rank holds the whole model and optimizer state) or 'fsdp' (each block and the rest sharded over the ranks with FSDP2: about 1/world of the weights, gradients and optimizer state per rank; checkpoints are still written whole by rank 0).")
    dist_timeout: float = _f(600.0, "Seconds a collective may wait before the process group gives up (a dead rank cannot hang the others forever).")
    # system
    device: str = _f("auto", "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: str = _f("auto", "'auto' (bfloat16 on CUDA when supported, else float16; float32 on CPU/MPS), 'float32', 'bfloat16', 'float16'.")
    compile: bool = _f(True, "torch.compile the model; falls back with a message where it cannot work.")
    seed: int = _f(1337, "Seed for initialisation, dropout and batch sampling (each rank adds its rank).")
    peak_flops: float = _f(0.0, "Peak FLOP/s of one device for MFU; 0 looks the GPU up in a table (no MFU on CPU unless set).")


# --------------------------------------------------------------------------------------------
# sampling


@dataclass
class SampleConfig:
    init_from: str = _f("resume", "'resume' (from out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = _f("out", "Folder holding ckpt.pt when init_from='resume'.")
    start: str = _f("\n", "Prompt text, or 'FILE:path' to read the prompt from a file.")
    num_samples: int = _f(10, "Number of samples to draw.")
    max_new_tokens: int = _f(500, "Tokens generated per sample.")
    temperature: float = _f(0.8, "Softmax temperature; 0 means greedy decoding.")
    top_k: int = _f(200, "Keep only the k most likely tokens (0 disables).")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 disables).")
    seed: int = _f(1337, "Random seed.")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: str = _f("auto", "'auto', 'float32', 'bfloat16', 'float16'.")
    compile: bool = _f(False, "torch.compile the model.")
    kv_cache: bool = _f(True, "Use the key/value cache (False re-runs the whole prefix for every token).")
    data_root: str = _f("data", "Where dataset folders (with meta.json) are looked up for the character vocabulary.")

    def validate(self) -> None:
        _check_positive(self, "num_samples", "max_new_tokens")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0 (0 = greedy); got %r" % self.temperature)
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0 (0 disables it); got %r" % self.top_k)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p must be in (0, 1]; got %r" % self.top_p)
        _check_choice(self, "dtype", DTYPES)


# --------------------------------------------------------------------------------------------
# benchmarking


@dataclass
class BenchConfig:
    batch_size: int = _f(12, "Sequences per step.")
    block_size: int = _f(1024, "Context length.")
    n_layer: int = _f(12, "Transformer blocks.")
    n_head: int = _f(12, "Attention heads.")
    n_embd: int = _f(768, "Embedding width.")
    bias: bool = _f(False, "Bias in Linear and LayerNorm layers.")
    dropout: float = _f(0.0, "Dropout probability.")
    vocab_size: int = _f(50304, "Vocabulary size (50304 = GPT-2's padded to a multiple of 64).")
    rope: bool = _f(False, "Rotary position embeddings instead of the learned position table.")
    qk_norm: bool = _f(False, "RMS-normalise queries and keys per head.")
    mlp_activation: str = _f("gelu", "'gelu' (GPT-2's tanh GELU) or 'relu2'.")
    untied_head: bool = _f(False, "An output layer of its own instead of the tied token embeddings.")
    real_data: bool = _f(True, "Read batches from data_root/dataset when it exists; otherwise random tokens.")
    dataset: str = _f("openwebtext", "Dataset for real_data.")
    data_root: str = _f("data", "Folder that holds the dataset folders.")
    prefetch: int = _f(2, "real_data: batches a background thread reads ahead (0 reads each in the timed step).")
    learning_rate: float = _f(6e-4, "Learning rate used in the timed steps.")
    weight_decay: float = _f(1e-1, "Weight decay.")
    optimizer: str = _f("adamw", "'adamw', 'striped_adamw', 'adafactor' or 'muon'.")
    muon_lr: float = _f(0.02, "optimizer='muon': learning rate of the Muon matrices.")
    optimizer_state_dtype: str = _f("float32", "striped_adamw's first-moment dtype: 'float32' or 'bfloat16'.")
    optimizer_in_backward: bool = _f(False, "Step each parameter inside backward (no full gradient buffer).")
    activation_checkpointing: bool = _f(False, "Recompute block activations in backward.")
    loss_chunk: int = _f(0, "Output layer and cross-entropy this many positions at a time (0 = all at once).")
    fp8: bool = _f(False, "Float8 products in the blocks' Linear layers (see train's fp8).")
    compile_mode: str = _f("default", "torch.compile mode: 'default', 'reduce-overhead', 'max-autotune' or 'max-autotune-no-cudagraphs'.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per timed step (must be 1 with optimizer_in_backward).")
    warmup_steps: int = _f(10, "Untimed steps first (compilation, allocator warm-up).")
    steps: int = _f(20, "Timed steps.")
    seed: int = _f(1337, "Random seed.")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'mps'.")
    dtype: str = _f("auto", "'auto', 'float32', 'bfloat16', 'float16'.")
    compile: bool = _f(True, "torch.compile the model.")
    profile: bool = _f(False, "Write a torch.profiler trace (Chrome/TensorBoard format) to profile_dir.")
    profile_dir: str = _f("bench_log", "Where the profiler trace goes.")
    peak_flops: float = _f(0.0, "Peak FLOP/s of one device for MFU; 0 looks the GPU up in a table.")
    measure_peak: bool = _f(False, "Also time a large matrix product in the chosen dtype and report MFU against it.")
    json_out: str = _f("", "Also write the results as JSON to this file.")

    def validate(self) -> None:
        _check_positive(self, "batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_size", "steps",
                        "gradient_accumulation_steps")
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_choice(self, "optimizer_state_dtype", ("float32", "bfloat16"))
        if self.optimizer_in_backward and self.gradient_accumulation_steps != 1:
            raise ConfigError("optimizer_in_backward=True needs gradient_accumulation_steps=1")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps must be >= 0; got %r" % self.warmup_steps)
        if self.loss_chunk < 0:
            raise ConfigError("loss_chunk must be >= 0 (0 = all positions at once); got %r" % self.loss_chunk)
        if self.prefetch < 0:
            raise ConfigError("prefetch must be >= 0 (0 = no background reader); got %r" % self.prefetch)
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd (%d) must be divisible by n_head (%d)" % (self.n_embd, self.n_head))
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "compile_mode", COMPILE_MODES)
        _check_model_features(self)
        if self.optimizer == "muon" and self.optimizer_in_backward:
            raise ConfigError("optimizer='muon' cannot step inside backward; pass --optimizer_in_backward=False")
        if self.muon_lr <= 0:
            raise ConfigError("muon_lr must be > 0; got %r" % self.muon_lr)


DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIMIZERS = ("adamw", "striped_adamw", "adafactor", "muon")
MODEL_FEATURES = {"rope": False, "qk_norm": False, "mlp_activation": "gelu", "untied_head": False}  # GPT-2's values


def _check_model_features(cfg) -> None:
    _check_choice(cfg, "mlp_activation", ("gelu", "relu2"))
    if cfg.rope and (cfg.n_embd // cfg.n_head) % 2:
        raise ConfigError("rope=True needs an even head size; n_embd/n_head is %d" % (cfg.n_embd // cfg.n_head))
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def _check_positive(cfg, *keys: str) -> None:
    for k in keys:
        if getattr(cfg, k) <= 0:
            raise ConfigError("%s must be > 0; got %r" % (k, getattr(cfg, k)))


def _check_choice(cfg, key: str, choices) -> None:
    if getattr(cfg, key) not in choices:
        raise ConfigError("%s must be one of %s; got %r" % (key, ", ".join(map(repr, choices)), getattr(cfg, key)))


def validate_train(cfg: TrainConfig, world_size: int = 1) -> None:
    """All checks of a training config, in one place."""
    _check_positive(cfg, "eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                    "batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple")
    if cfg.max_iters < 0:
        raise ConfigError("max_iters must be >= 0; got %r" % cfg.max_iters)
    if cfg.n_embd % cfg.n_head:
        raise ConfigError("n_embd (%d) must be divisible by n_head (%d)" % (cfg.n_embd, cfg.n_head))
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError("dropout must be in [0, 1); got %r" % cfg.dropout)
    if cfg.vocab_size < 0:
        raise ConfigError("vocab_size must be >= 0 (0 = from the dataset); got %r" % cfg.vocab_size)
    if cfg.learning_rate <= 0:
        raise ConfigError("learning_rate must be > 0; got %r" % cfg.learning_rate)
    if cfg.weight_decay < 0:
        raise ConfigError("weight_decay must be >= 0; got %r" % cfg.weight_decay)
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, k) < 1.0:
            raise ConfigError("%s must be in [0, 1); got %r" % (k, getattr(cfg, k)))
    if cfg.grad_clip < 0:
        raise ConfigError("grad_clip must be >= 0 (0 disables it); got %r" % cfg.grad_clip)
    if cfg.decay_lr:
        if cfg.min_lr < 0 or cfg.min_lr > cfg.learning_rate:
            raise ConfigError("min_lr must be in [0, learning_rate=%g]; got %r" % (cfg.learning_rate, cfg.min_lr))
        if cfg.warmup_iters < 0:
            raise ConfigError("warmup_iters must be >= 0; got %r" % cfg.warmup_iters)
        if cfg.warmup_iters > cfg.lr_decay_iters:
            raise ConfigError("warmup_iters (%d) must not exceed lr_decay_iters (%d)" % (cfg.warmup_iters, cfg.lr_decay_iters))
    _check_choice(cfg, "optimizer", OPTIMIZERS)
    _check_choice(cfg, "dtype", DTYPES)
    _check_model_features(cfg)
    if cfg.optimizer == "muon":
        if cfg.muon_lr <= 0:
            raise ConfigError("muon_lr must be > 0; got %r" % cfg.muon_lr)
        if not 0.0 <= cfg.muon_momentum < 1.0:
            raise ConfigError("muon_momentum must be in [0, 1); got %r" % cfg.muon_momentum)
        if cfg.optimizer_in_backward:
            raise ConfigError("optimizer='muon' cannot step inside backward; pass --optimizer_in_backward=False")
        if cfg.parallelism == "fsdp":
            raise ConfigError("optimizer='muon' needs whole matrices, which parallelism='fsdp' shards; use --parallelism=ddp or another optimizer")
    if cfg.init_from not in ("scratch", "resume"):
        for k, v in MODEL_FEATURES.items():
            if getattr(cfg, k) != v:
                raise ConfigError("%s=%r changes the architecture, but init_from=%r loads GPT-2 as it is; drop --%s or train from scratch"
                                  % (k, getattr(cfg, k), cfg.init_from, k))
    _check_choice(cfg, "backend", ("auto", "nccl", "gloo"))
    _check_choice(cfg, "parallelism", ("ddp", "fsdp"))
    _check_choice(cfg, "compile_mode", COMPILE_MODES)
    if cfg.parallelism == "fsdp":
        if cfg.fp8:
            raise ConfigError("fp8=True is not yet checked with parallelism='fsdp'; use --parallelism=ddp or --fp8=False")
        if cfg.optimizer_in_backward:
            raise ConfigError("parallelism='fsdp' cannot step the optimizer inside backward; pass --optimizer_in_backward=False")
        if cfg.eval_tasks and world_size > 1:
            raise ConfigError("eval_tasks run on rank 0 alone, which cannot gather weights sharded by parallelism='fsdp'; "
                              "leave eval_tasks empty or use parallelism='ddp'")
    if cfg.dist_timeout <= 0:
        raise ConfigError("dist_timeout must be > 0 seconds; got %r" % cfg.dist_timeout)
    if cfg.peak_flops < 0:
        raise ConfigError("peak_flops must be >= 0; got %r" % cfg.peak_flops)
    known = ("scratch", "resume") + GPT2_NAMES
    if cfg.init_from not in known and not os.path.isdir(cfg.init_from):
        raise ConfigError("init_from must be one of %s or an existing Hugging Face model folder; got %r"
                          % (", ".join(known), cfg.init_from))
    if cfg.gradient_accumulation_steps % world_size:
        n = -(-cfg.gradient_accumulation_steps // world_size) * world_size
        raise ConfigError("gradient_accumulation_steps (%d) must be divisible by the number of processes (%d); "
                          "pass e.g. --gradient_accumulation_steps=%d" % (cfg.gradient_accumulation_steps, world_size, n))
    _check_choice(cfg, "optimizer_state_dtype", ("float32", "bfloat16"))
    if cfg.optimizer_state_dtype == "bfloat16" and cfg.optimizer != "striped_adamw":
        raise ConfigError("optimizer_state_dtype='bfloat16' works with optimizer='striped_adamw' only; got optimizer=%r" % cfg.optimizer)
    if cfg.eps <= 0:
        raise ConfigError("eps must be > 0; got %r" % cfg.eps)
    if cfg.optimizer_in_backward:
        for bad, why in ((cfg.gradient_accumulation_steps != 1, "gradient_accumulation_steps=1 (gradients are consumed as they arrive)"),
                         (cfg.grad_clip > 0, "grad_clip=0 (clipping needs every gradient at once)"),
                         (world_size > 1, "a single process (DDP reduces gradients after backward)"),
                         (cfg.dtype == "float16", "dtype other than float16 (the loss scaler needs every gradient at once)")):
            if bad:
                raise ConfigError("optimizer_in_backward=True needs %s" % why)
    if cfg.wandb_log and not cfg.wandb_project:
        raise ConfigError("wandb_project must be set when wandb_log=True")
    for k in ("keep_last_k", "eval_tasks_limit", "batch_size_ramp_tokens", "batch_size_ramp_start", "loss_chunk", "prefetch"):
        if getattr(cfg, k) < 0:
            raise ConfigError("%s must be >= 0; got %r" % (k, getattr(cfg, k)))
    if cfg.loss_spike_factor and cfg.loss_spike_factor <= 1:
        raise ConfigError("loss_spike_factor must be > 1 (or 0 to disable); got %r" % cfg.loss_spike_factor)
    if cfg.batch_size_ramp_tokens and cfg.optimizer_in_backward:
        raise ConfigError("batch_size_ramp_tokens needs gradient accumulation, which optimizer_in_backward=True cannot do; set one of them off")


# --------------------------------------------------------------------------------------------
# loading: config files and --key=value overrides


def field_docs(cls) -> list[tuple[str, str, object, str]]:
    """(name, type name, default, help) for each field, in declaration order."""
    out = []
    for f in fields(cls):
        out.append((f.name, _type_name(f), f.default, f.metadata.get("help", "")))
    return out


def _type_name(f: dataclasses.Field) -> str:
    t = f.type
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _coerce(cls, key: str, value, source: str):
    """Check ``value`` against the declared type of ``key``; int widens to float."""
    types_by_name = {f.name: _type_name(f) for f in fields(cls)}
    if key not in types_by_name:
        close = _close_matches(key, list(types_by_name))
        hint = " (did you mean %s?)" % " or ".join(repr(c) for c in close) if close else ""
        raise ConfigError("unknown config key %r in %s%s" % (key, source, hint))
    t = types_by_name[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(t, True)
    if not ok:
        raise ConfigError("config key %r expects %s, got %s %r in %s" % (key, t, type(value).__name__, value, source))
    return float(value) if t == "float" else value


def _close_matches(key: str, candidates: list[str]) -> list[str]:
    import difflib
    return difflib.get_close_matches(key, candidates, n=2, cutoff=0.75)


def _parse_literal(text: str):
    """``--key=value``: a Python literal when it parses as one, else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_config_file(path: str) -> dict:
    """Evaluate a nanoGPT-style config file in its own namespace; return its plain settings."""
    if not os.path.isfile(path):
        raise ConfigError("config file %r not found (config files live in config/, e.g. config/train_shakespeare_char.py)" % path)
    try:
        ns = runpy.run_path(path, run_name="__config__")
    except Exception as e:  # a broken config file is the user's to fix: say where
        raise ConfigError("config file %r failed to run: %s: %s" % (path, type(e).__name__, e)) from e
    out = {}
    for k, v in ns.items():
        if k.startswith("_") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
            continue  # imports and helpers used inside the file
        out[k] = v
    return out


def load_config(cls, argv: list[str]):
    """Build a ``cls`` from nanoGPT-style arguments: config files (positional) then ``--key=value``.

    Returns ``(config, explicit)`` where ``explicit`` is the set of keys the user set.
    """
    cfg = cls()
    explicit: set[str] = set()
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SystemExit(help_text(cls))
        if not arg.startswith("--"):
            for k, v in read_config_file(arg).items():
                setattr(cfg, k, _coerce(cls, k, v, "config file %r" % arg))
                explicit.add(k)
            continue
        if "=" not in arg:
            raise ConfigError("argument %r must look like --key=value" % arg)
        key, text = arg[2:].split("=", 1)
        value = _parse_literal(text)
        if _type_name_of(cls, key) == "str" and not isinstance(value, str):
            value = text  # --init_from=gpt2, --start=42: strings need no quotes
        setattr(cfg, key, _coerce(cls, key, value, "--%s" % key))
        explicit.add(key)
    return cfg, explicit


def _type_name_of(cls, key: str) -> str | None:
    for f in fields(cls):
        if f.name == key:
            return _type_name(f)
    return None


def help_text(cls) -> str:
    lines = ["usage: [config_file.py ...] [--key=value ...]", "", "keys:"]
    for name, t, default, doc in field_docs(cls):
        lines.append("  --%s=%r  (%s)  %s" % (name, default, t, doc))
    return "\n".join(lines)


def markdown_table(cls) -> str:
    """The README table of every key, generated from the field docs."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, t, default, doc in field_docs(cls):
        rows.append("| `%s` | %s | `%r` | %s |" % (name, t, default, doc.replace("|", "\\|")))
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# export to Hugging Face format


@dataclass
class ExportConfig:
    init_from: str = _f("resume", "'resume' (out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = _f("out", "Folder holding ckpt.pt when init_from='resume'.")
    hf_dir: str = _f("", "Folder to write (config.json, model.safetensors, tokenizer files); must not exist or be empty.")
    overwrite: bool = _f(False, "Replace an existing, non-empty hf_dir.")
    tokenizer: bool = _f(True, "Also write tokenizer files: GPT-2's vocab.json/merges.txt, or vocab_chars.json for a character vocabulary.")
    data_root: str = _f("data", "Where the dataset folder (with meta.json) is looked up first; the training run's data_root is tried next.")
    mirror: str = _f("", "Local folder mirroring the GPT-2 BPE files (gpt2-bpe/encoder.json, gpt2-bpe/vocab.bpe); default $NANOGPT_DATA_MIRROR.")

    def validate(self) -> None:
        if not self.hf_dir:
            raise ConfigError("hf_dir must be set: the folder to write the Hugging Face model into, e.g. --hf_dir=out-hf")
        known = ("resume",) + GPT2_NAMES
        if self.init_from not in known and not os.path.isdir(self.init_from):
            raise ConfigError("init_from must be one of %s or an existing Hugging Face model folder; got %r"
                              % (", ".join(known), self.init_from))


# --------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvalConfig:
    init_from: str = _f("resume", "'resume' (from out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = _f("out", "Folder holding ckpt.pt when init_from='resume'.")
    dataset: str = _f("", "Perplexity on data_root/dataset/{split}.bin; when nothing else is chosen, the training run's dataset.")
    data_root: str = _f("data", "Folder that holds the dataset folders (and the character vocabulary of a char-level run).")
    split: str = _f("val", "Token file of the dataset to read: 'val' or 'train'.")
    text_file: str = _f("", "Perplexity on a UTF-8 text file, tokenised with the model's tokenizer.")
    block_size: int = _f(0, "Window length for perplexity and the longest input for the tasks (0 = the model's context).")
    stride: int = _f(0, "Step between perplexity windows (0 = the window length: no overlap); smaller gives each scored token more context.")
    batch_size: int = _f(8, "Windows (perplexity) or scored continuations (tasks) per forward pass.")
    max_tokens: int = _f(0, "Read only the first max_tokens tokens of the data or text (0 = all).")
    hellaswag: str = _f("", "HellaSwag-format jsonl (ctx, endings, label) to score zero-shot, or 'download' (needs --sha256).")
    lambada: str = _f("", "LAMBADA-format jsonl (one {'text': ...} per line) for last-word accuracy, or 'download'.")
    limit: int = _f(0, "Score only the first limit examples of hellaswag and lambada (0 = all).")
    sha256: str = _f("", "Expected sha256 of a file fetched with 'download' (required for hellaswag, which has no pinned checksum).")
    cache_dir: str = _f("", "Where downloaded task files are kept ('' = data_root/eval).")
    mirror: str = _f("", "Local folder mirroring the task files (hellaswag/hellaswag_val.jsonl, lambada/lambada_test.jsonl); default $NANOGPT_DATA_MIRROR.")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: str = _f("auto", "'auto' (bfloat16 autocast on CUDA when supported, float32 elsewhere), 'float32', 'bfloat16', 'float16'.")
    seed: int = _f(1337, "Random seed (the evaluation itself draws no random numbers).")
    json_out: str = _f("", "Also write the results as JSON to this file (written atomically).")

    def validate(self) -> None:
        _check_positive(self, "batch_size")
        for k in ("block_size", "stride", "max_tokens", "limit"):
            if getattr(self, k) < 0:
                raise ConfigError("%s must be >= 0; got %r" % (k, getattr(self, k)))
        if self.max_tokens == 1:
            raise ConfigError("max_tokens must be 0 (all) or at least 2: the first token is context only")
        if self.block_size and self.stride > self.block_size:
            raise ConfigError("stride (%d) must not exceed block_size (%d): tokens between windows would go unscored"
                              % (self.stride, self.block_size))
        if self.dataset and self.text_file:
            raise ConfigError("set dataset or text_file, not both: one perplexity source per run")
        if not self.split or os.sep in self.split or "/" in self.split:
            raise ConfigError("split must be the name of a token file such as 'val' or 'train'; got %r" % self.split)
        if self.text_file and not os.path.isfile(self.text_file):
            raise ConfigError("text_file %r does not exist" % self.text_file)
        for k in ("hellaswag", "lambada"):
            v = getattr(self, k)
            if v and v != "download" and not os.path.isfile(v):
                raise ConfigError("%s=%r: no such file; give a local jsonl file or 'download'" % (k, v))
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())):
            raise ConfigError("sha256 must be 64 hexadecimal digits; got %r" % self.sha256)
        if self.sha256 and self.hellaswag == "download" and self.lambada == "download":
            raise ConfigError("sha256 is ambiguous with both hellaswag=download and lambada=download; download one at a time")
        known = ("resume",) + GPT2_NAMES
        if self.init_from not in known and not os.path.isdir(self.init_from):
            raise ConfigError("init_from must be one of %s or an existing Hugging Face model folder; got %r"
                              % (", ".join(known), self.init_from))
        _check_choice(self, "dtype", DTYPES)
