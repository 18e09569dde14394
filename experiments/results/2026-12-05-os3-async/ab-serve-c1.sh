#!/bin/bash
# serving before/after, 1 client, tiny EMULATED 1M: two alternating repetitions per side
cd /work/main
L="experiments/load.py --model tiny --concurrency 1 --rounds 1 --duration 25 --warmup 10 --max-tokens 32"
for i in 2 3; do
  PYTHONPATH=/tmp/s4/base /work/main/.venv/bin/python $L --json /tmp/s4/before/serve-tiny-c1-$i.json -- --emulate-pad 1000000 --threads 1 > /tmp/s4/before/serve-tiny-c1-$i.log 2>&1
  /work/main/.venv/bin/python $L --json /tmp/s4/after/serve-tiny-c1-$i.json -- --emulate-pad 1000000 --threads 1 > /tmp/s4/after/serve-tiny-c1-$i.log 2>&1
done
echo done > /tmp/s4/ab5.done
