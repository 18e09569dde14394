"""What scoring an answer's logprobs costs on the CPU: from decoding's own logits (the default
since session 11) vs the replay (the HF backend's memo off), alternated over the same questions
in one process, the default knowledge base, SmolLM2, 2 threads. Every answer and every logprob
is compared between the two.

    python experiments/results/2026-12-05-logprobs-from-decoding/cost.py [--model smollm2] [--n 4] [--rounds 2]
"""
import argparse
import statistics
import time

import torch

from ralmspec.config import EngineConfig, GenerationConfig
from ralmspec.data.loaders import default_questions
from ralmspec.engine.core import build_engine

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2")
ap.add_argument("--n", type=int, default=4)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--max-new-tokens", type=int, default=16)
a = ap.parse_args()
torch.set_num_threads(2)
gen = GenerationConfig(max_new_tokens=a.max_new_tokens, logprobs=3)
engine = build_engine(EngineConfig(model=a.model, generation=gen), show_progress=False)
questions = [q.question for q in default_questions()[:a.n]]
lm = engine.lm
times = {"decoding": [], "replay": []}
answers = {}
engine.generate_sync(questions[0], speculate=False)  # warm-up
for r in range(a.rounds):
    for mode in (("decoding", "replay") if r % 2 == 0 else ("replay", "decoding")):
        lm.max_scored_chunks = 1024 if mode == "decoding" else 0
        engine.reset_caches()
        t = time.perf_counter()
        out = [engine.generate_sync(q, speculate=False) for q in questions]
        times[mode].append(time.perf_counter() - t)
        answers.setdefault(mode, out)
        assert [o.token_ids for o in out] == [o.token_ids for o in answers[mode]]
same = all(x.token_ids == y.token_ids and x.logprobs == y.logprobs
           for x, y in zip(answers["decoding"], answers["replay"]))
tokens = sum(len(o.token_ids) for o in answers["decoding"])
for mode, ts in times.items():
    print(f"{mode:>8}: {', '.join(f'{t:.2f}' for t in ts)} s for {a.n} answers ({tokens} tokens), "
          f"median {statistics.median(ts):.2f} s")
print(f"decoding / replay: {statistics.median(times['decoding']) / statistics.median(times['replay']):.2f}; "
      f"answers and logprobs identical: {same}; scored from decoding {lm.scored_from_decode} tokens, "
      f"replayed {lm.scored_by_replay}")
