#!/usr/bin/env bash
# Every GPU speed figure in one run of about 8 minutes, cheapest and most informative first, so
# that a run cut short still leaves most of them:
#   1. training-speed levers against the reference's bench.py (scripts/bench_levers.py)
#   2. sampling: KV cache, CUDA graph, batch 1 and 8, against the reference's generate
#   3. the optimizer step: fused AdamW, StripedAdamW multi-tensor and Triton (GPT-2 XL shape)
#   4. the GPU tests (tests/test_gpu.py)
#   5. Shakespeare char: wall time to val loss 1.47, ours against the reference
#   6. optimizer memory, GPT-2 XL shape
#
#   bash scripts/gpu_report.sh REFERENCE_CHECKOUT DATA_ROOT OUT_FOLDER [tiny]
#
# REFERENCE_CHECKOUT is a nanoGPT checkout (its data/shakespeare_char is prepared by its own
# prepare.py from our copy of input.txt when missing); DATA_ROOT holds shakespeare_char prepared by
# this project. Every log and figure goes to OUT_FOLDER,
# and summary.md there collects the tables. 'tiny' shrinks every shape and step count, to check
# the script end to end on a CPU.
set -u
ref=$(cd "$1" && pwd); data=$(cd "$2" && pwd); out=$3; tiny=${4:-}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"; out=$(cd "$out" && pwd)
cd "$here"
start=$(date +%s)
cuda=$(python -c "import torch; print(int(torch.cuda.is_available()))")
python - > "$out/environment.txt" <<'EOF'
import datetime, platform, torch
print("date:", datetime.date.today(), "| torch", torch.__version__, "| python", platform.python_version())
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
EOF
cat "$out/environment.txt"
if [ ! -f "$ref/data/shakespeare_char/meta.pkl" ]; then  # the reference reads its own format
  cp "$here/data/shakespeare_char/input.txt" "$ref/data/shakespeare_char/input.txt"
  (cd "$ref" && python data/shakespeare_char/prepare.py > /dev/null)
fi

section() {  # name, seconds, command...: run it with a time limit, keep its output, say how it went
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.md" 2> "$out/$name.log"
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s (at $(( $(date +%s) - start )) s)" | tee -a "$out/sections.txt"
}

if [ "$tiny" = tiny ]; then
  shape="--n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --batch_size=2 --vocab_size=64"
  levers_common="--device=cpu --compile=False --dtype=float32 --warmup_steps=1 $shape"
  levers_rows="baseline,loss_chunk"; steps=1
  sample_args="--device=cpu --dtype=float32 --n_layer=1 --n_head=2 --n_embd=32 --new=8 --batch=1"
  ttl_ref="python train.py config/train_shakespeare_char.py --device=cpu --compile=False --n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --batch_size=4 --max_iters=20 --eval_interval=10 --eval_iters=2"
  ttl_ours="python train.py config/train_shakespeare_char.py --device=cpu --compile=False --n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --batch_size=4 --max_iters=20 --eval_interval=10 --eval_iters=2 --rope=True --mlp_activation=relu2"
  target=9
else
  levers_common=""; levers_rows="baseline,loss_chunk,fp8,fp8+loss_chunk,max-autotune,batch16,batch24+loss_chunk"; steps=20
  sample_args="--device=cuda --new=1024 --batch=1,8"
  ttl_ref="python train.py config/train_shakespeare_char.py --max_iters=2500"
  ttl_ours="python train.py config/train_shakespeare_char.py --rope=True --mlp_activation=relu2 --max_iters=1500 --lr_decay_iters=1500 --learning_rate=2e-3 --min_lr=2e-4 --warmup_iters=50 --eval_interval=100 --eval_iters=50"
  target=1.47
fi

section levers 170 python scripts/bench_levers.py --reference="$ref" --rows="$levers_rows" --steps=$steps \
  --json="$out/levers.json" ${levers_common:+--common="$levers_common"}
section sampling 100 python scripts/sampling_speed.py $sample_args --reference="$ref"
if [ "$cuda" = 1 ]; then
  section optimizer_step 80 python scripts/optimizer_step_time.py --steps=20
else
  echo "optimizer_step: skipped (no CUDA)" | tee -a "$out/sections.txt"
fi
section test_gpu 90 python -m pytest -q tests/test_gpu.py
section time_to_loss 200 python scripts/time_to_loss.py --target=$target --rounds=1 --plot="$out/time_to_loss.png" \
  --json="$out/time_to_loss.json" --run "reference|$ref|$ttl_ref" --run "ours|.|$ttl_ours --data_root=$data"
if [ "$cuda" = 1 ]; then
  section optimizer_memory 120 python scripts/optimizer_memory.py
fi

{
  cat "$out/environment.txt"; echo
  for f in levers sampling optimizer_step test_gpu time_to_loss optimizer_memory; do
    [ -f "$out/$f.md" ] || continue
    echo "## $f"; echo; cat "$out/$f.md"; echo
  done
  echo "## sections"; cat "$out/sections.txt"
} > "$out/summary.md"
echo "summary: $out/summary.md ($(( $(date +%s) - start )) s in all)"
