#!/usr/bin/env bash
# Time the README's CPU example here and in a reference nanoGPT checkout, and this project's CPU
# recipe (config/train_shakespeare_char_cpu.py, the same model size), one after the other on the
# same machine. Prints wall time (process start to exit), the last logged val loss and the loss
# over the whole val split (scripts/whole_split_loss.py, each checkpoint with its own model code).
#   bash scripts/cpu_example_vs_reference.sh /path/to/nanoGPT [rounds]
# The reference folder must already hold data/shakespeare_char/{train,val}.bin and meta.pkl
# (its own prepare.py); this project's data/shakespeare_char is prepared if missing.
set -euo pipefail
ref=$(cd "$1" && pwd)
rounds=${2:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
args="--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0"
[ -f "$here/data/shakespeare_char/train.bin" ] || (cd "$here" && python data/shakespeare_char/prepare.py >/dev/null)
log=$(mktemp -d)
echo "torch $(python -c 'import torch; print(torch.__version__)'), $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
  for who in reference ours recipe; do
    out=$log/out-$who-$r
    case $who in
      reference) dir=$ref; cmd="python train.py config/train_shakespeare_char.py $args" ;;
      ours) dir=$here; cmd="python train.py config/train_shakespeare_char.py $args" ;;
      recipe) dir=$here; cmd="python train.py config/train_shakespeare_char_cpu.py" ;;
    esac
    start=$(date +%s.%N)
    (cd "$dir" && $cmd --out_dir="$out") > "$log/$who-$r.log" 2>&1
    end=$(date +%s.%N)
    val=$(grep -E "^step [0-9]+: train loss" "$log/$who-$r.log" | tail -1 | sed -E 's/.*val loss ([0-9.]+).*/\1/')
    refarg=""; [ $who = reference ] && refarg="--reference=$ref"
    whole=$(cd "$here" && python scripts/whole_split_loss.py "$out" data/shakespeare_char/val.bin $refarg | tail -1)
    printf "round %d  %-9s  %7s s  last val loss %s  whole val split %s\n" "$r" "$who" \
      "$(python -c "print(f\"{$end - $start:.1f}\")")" "$val" "$whole"
  done
done
