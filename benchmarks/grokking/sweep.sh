#!/usr/bin/env bash
# Two-phase sweep on 2 CPU cores (one thread per process):
#  1. tune: every (task, optimizer) on the lr x wd grid with seed 0;
#  2. confirm: seeds 1 and 2 at each (task, optimizer)'s best grid point from phase 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/grokking/results.jsonl
COMMON="--max-steps ${MAX_STEPS:-8000} --lrs 3e-3 1e-2 --wds 1.0 3.0 --out $OUT"
python benchmarks/grokking/grokking.py $COMMON --seeds 0 --shard 0/2 &
python benchmarks/grokking/grokking.py $COMMON --seeds 0 --shard 1/2 &
wait
python benchmarks/grokking/summarize.py --select-only > /tmp/grok_best.txt
i=0
while read -r task opt lr wd; do
  python benchmarks/grokking/grokking.py --max-steps "${MAX_STEPS:-8000}" --tasks "$task" \
    --opts "$opt" --lrs "$lr" --wds "$wd" --seeds 1 2 --out "$OUT" &
  i=$((i + 1))
  if (( i % 2 == 0 )); then wait; fi
done < /tmp/grok_best.txt
wait
python benchmarks/grokking/summarize.py
