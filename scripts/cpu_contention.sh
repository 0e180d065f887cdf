#!/usr/bin/env bash
# CPU threads under a background load: the CPU recipe's ms/iter and sampling tokens/s with the
# default (threads chosen from the idle cores) and with every core's thread (--threads=N, the
# count PyTorch would take by itself), idle and with one core kept busy by another process.
#   bash scripts/cpu_contention.sh [DATA_ROOT]   (data/shakespeare_char prepared there)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
data=${1:-$here/data}
out=$(mktemp -d)
all=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
train() {  # extra args -> the last two logged ms/iter
  python "$here/train.py" "$here/config/train_shakespeare_char_cpu.py" --data_root="$data" --out_dir="$out/t" --overwrite=True \
    --max_iters=150 --eval_interval=1000 --log_interval=50 "$@" 2>&1 | grep "^iter" | tail -2 | sed 's/.*, \([0-9.]*\) ms\/iter.*/\1/' | tr '\n' ' '
}
sample() {  # extra args -> tokens/s
  python "$here/sample.py" --out_dir="$out/t" --data_root="$data" --num_samples=1 --max_new_tokens=300 --device=cpu "$@" 2>&1 \
    | grep "tokens/s" | sed 's/.*(\([0-9]*\) tokens\/s.*/\1/'
}
train >/dev/null  # a checkpoint to sample from
echo "| load | threads | train ms/iter (iters 50, 100) | sample tokens/s |"
echo "| --- | --- | --- | --- |"
for load in idle busy; do
  if [ $load = busy ]; then python -c "while True: pass" & burn=$!; sleep 2; fi
  for t in 0 "$all"; do
    label=$([ "$t" = 0 ] && echo "default (auto)" || echo "--threads=$t")
    echo "| $load | $label | $(train --threads=$t)| $(sample --threads=$t) |"
  done
  if [ $load = busy ]; then kill $burn; fi
done
rm -rf "$out"
