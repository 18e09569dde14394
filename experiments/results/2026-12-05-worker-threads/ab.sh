#!/bin/bash
# A/B: before (HEAD 9b8e94c via PYTHONPATH) vs after (working tree), alternating
cd /work/main
for r in 1 2; do
 for v in before after; do
  if [ $v = before ]; then PP=/tmp/before; else PP=/work/main; fi
  echo "== $v round $r knnlm"
  .venv/bin/python /tmp/exp/run_at.py $PP knnlm bench --datastore /tmp/knnlm/tiny100000 --n 30 --max-new-tokens 32 --threads 1 --async 2>&1 | tail -1
  echo "== $v round $r ralm tiny"
  .venv/bin/python /tmp/exp/run_at.py $PP bench --model tiny --n 8 --max-new-tokens 64 --emulate-pad 1000000 --guessers exact,oracle --threads 1 2>&1 | tail -4
 done
done
