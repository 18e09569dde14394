#!/bin/bash
# interleaved before/after: held-out workload bench (tiny, EMULATED 1M) and kNN-LM bench (tiny 100k flat, async)
cd /tmp
R=/work/main/.venv/bin/ralmspec
W="--questions /tmp/heldout/q8.jsonl --corpus /tmp/heldout/wt2.jsonl --retriever exact --n 8 --max-new-tokens 64 --threads 1 --model tiny --emulate-pad 1000000"
K="--datastore /tmp/knnlm/tiny100000 --n 30 --max-new-tokens 32 --threads 1 --async"
for i in 1 2; do
  PYTHONPATH=/tmp/s4/base $R bench $W --guessers exact,oracle --json /tmp/s4/before/heldout-$i.json > /tmp/s4/before/heldout-$i.log 2>&1
  $R bench $W --guessers exact,oracle --json /tmp/s4/after/heldout-$i.json > /tmp/s4/after/heldout-$i.log 2>&1
done
for i in 1 2 3; do
  PYTHONPATH=/tmp/s4/base $R knnlm bench $K --json /tmp/s4/before/knnlm-$i.json > /tmp/s4/before/knnlm-$i.log 2>&1
  $R knnlm bench $K --json /tmp/s4/after/knnlm-$i.json > /tmp/s4/after/knnlm-$i.log 2>&1
done
echo done > /tmp/s4/ab2.done
