#!/bin/bash
# serving before/after: tiny, EMULATED 1M, 1 and 8 closed-loop clients, fresh server per cell
cd /work/main
L="experiments/load.py --model tiny --concurrency 1 8 --rounds 1 --duration 25 --warmup 10 --max-tokens 32"
PYTHONPATH=/tmp/s4/base /work/main/.venv/bin/python $L --json /tmp/s4/before/serve-tiny.json -- --emulate-pad 1000000 --threads 1 > /tmp/s4/before/serve-tiny.log 2>&1
/work/main/.venv/bin/python $L --json /tmp/s4/after/serve-tiny.json -- --emulate-pad 1000000 --threads 1 > /tmp/s4/after/serve-tiny.log 2>&1
echo done > /tmp/s4/ab4.done
