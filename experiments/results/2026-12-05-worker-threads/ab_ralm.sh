#!/bin/bash
# ab_ralm.sh NAME_A TREE_A NAME_B TREE_B ROUNDS: the RaLM bench (tiny, EMULATED 1M, exact + oracle)
# from two source trees, alternated. ab2.log: threadonly (the thread fix alone) vs main;
# ab4.log (3 rounds) and ab5.log (2 rounds, + calibration): before (/tmp/before = 9b8e94c) vs main.
cd /work/main
for r in $(seq 1 "$5"); do
 for v in "$1=$2" "$3=$4"; do
  echo "== ${v%%=*} round $r"
  .venv/bin/python /tmp/exp/run_at.py "${v#*=}" bench --model tiny --n 8 --max-new-tokens 64 \
    --emulate-pad 1000000 --guessers exact,oracle --threads 1 2>&1 | grep "EMULATED"
 done
done
