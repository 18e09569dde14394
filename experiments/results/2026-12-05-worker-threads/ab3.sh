#!/bin/bash
cd /work/main
for r in 1 2; do
 for v in before main; do
  if [ $v = before ]; then PP=/tmp/before; else PP=/work/main; fi
  echo "== $v round $r"
  .venv/bin/python /tmp/exp/run_at.py $PP bench --model tiny --n 8 --max-new-tokens 64 --emulate-pad 1000000 --guessers exact,oracle --threads 1 2>&1 | grep "EMULATED"
 done
done
