#!/bin/bash
# interleaved before/after: SmolLM2 (the default LM), grounded, EMULATED 1M, 1 thread
cd /tmp
R=/work/main/.venv/bin/ralmspec
B="bench --model smollm2 --n 6 --max-new-tokens 32 --emulate-pad 1000000 --guessers exact,oracle --threads 1"
for i in 1 2; do
  PYTHONPATH=/tmp/s4/base $R $B --json /tmp/s4/before/smollm2-$i.json > /tmp/s4/before/smollm2-$i.log 2>&1
  $R $B --json /tmp/s4/after/smollm2-$i.json > /tmp/s4/after/smollm2-$i.log 2>&1
done
echo done > /tmp/s4/ab3.done
