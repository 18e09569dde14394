#!/usr/bin/env bash
# SmolLM2-135M base LM vs kNN-LM perplexity on the shipped WikiText-103 text (README.md here).
# Run from the repository root: bash experiments/results/2026-12-04-knnlm-eval/run.sh
# WORK holds the datastores (not committed); an existing datastore folder or result JSON is reused.
set -euo pipefail
OUT=experiments/results/2026-12-04-knnlm-eval
WORK=${WORK:-/tmp/knnlm-eval}
THREADS=${THREADS:-2}
mkdir -p "$WORK"
run() { echo "+ $* ($(date -u +%H:%M:%S), $(uptime | sed 's/.*load/load/'))"; "$@"; }

# in-domain datastore: the first half of each of the first 4 test articles
[ -d "$WORK/ds-test-first4" ] || run ralmspec knnlm build --corpus wt103:test:first-half --max-documents 4 \
    --out "$WORK/ds-test-first4" --threads "$THREADS" --quiet
# held-out datastore: the first 16,000 tokens of the valid articles
[ -d "$WORK/ds-valid-16k" ] || run ralmspec knnlm build --corpus wt103:valid --max-tokens 16000 \
    --out "$WORK/ds-valid-16k" --threads "$THREADS" --quiet
for ds in ds-test-first4 ds-valid-16k; do
  python -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[1], m['count'], 'entries,', m['documents'], 'documents, build', m['build'])" "$WORK/$ds/manifest.json"
done
run ralmspec knnlm reindex --datastore "$WORK/ds-valid-16k" --out "$WORK/ds-valid-16k-hnsw" --index hnsw --overwrite

# evaluated text: the second halves of the same 4 test articles, the first 6,000 tokens
EVAL=(--text wt103:test:second-half --max-documents 4 --max-tokens 6000 --lam 0,0.1,0.25,0.5 --k 8,64,256
      --temperature 1,10,100,1000 --threads "$THREADS" --quiet)
[ -f "$OUT/heldout.json" ] || run ralmspec knnlm eval --datastore "$WORK/ds-valid-16k" "${EVAL[@]}" \
    --json "$OUT/heldout.json"
[ -f "$OUT/indomain.json" ] || run ralmspec knnlm eval --datastore "$WORK/ds-test-first4" "${EVAL[@]}" \
    --json "$OUT/indomain.json"
# approximate index (HNSW over the same held-out entries; efSearch >= k + rescore margin, or HNSW
# returns fewer than k = 256 candidates): recall vs exact, first 2,000 tokens; and exact on the same
[ -f "$OUT/heldout-hnsw-2000.json" ] || run ralmspec knnlm eval --datastore "$WORK/ds-valid-16k-hnsw" "${EVAL[@]}" \
    --max-tokens 2000 --ef-search 320 --json "$OUT/heldout-hnsw-2000.json"
[ -f "$OUT/heldout-flat-2000.json" ] || run ralmspec knnlm eval --datastore "$WORK/ds-valid-16k" "${EVAL[@]}" \
    --max-tokens 2000 --json "$OUT/heldout-flat-2000.json"

# speed: identity check only (a timed run needs a quiet machine, README.md)
run ralmspec knnlm bench --datastore "$WORK/ds-valid-16k" --n 2 --max-new-tokens 8 --lam 0.1 --k 256 --temperature 100 \
    --threads "$THREADS" --json "$OUT/bench-identity-check.json"
