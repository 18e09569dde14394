#!/bin/bash
# interleaved before/after: tiny, EMULATED 1M, guessers exact,oracle, 1 thread
cd /tmp
B="/work/main/.venv/bin/ralmspec bench --model tiny --n 8 --max-new-tokens 64 --emulate-pad 1000000 --guessers exact,oracle --threads 1"
for i in 2 3 4; do
  PYTHONPATH=/tmp/s4/base $B --json /tmp/s4/before/tiny-$i.json > /tmp/s4/before/tiny-$i.log 2>&1
  $B --json /tmp/s4/after/tiny-$i.json > /tmp/s4/after/tiny-$i.log 2>&1
done
echo done > /tmp/s4/ab.done
