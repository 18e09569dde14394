"""The static runner's CUDA graphs: replays compute what the uncaptured steps compute.

Skipped without CUDA (conftest). The tiny built-in model (no download) on CUDA, float32 and
bfloat16: the 1-row step captured per (slot, span) and the batch-invariant step captured per set
of spans (``step_order``) give the same logits, bit for bit, as the same runner without graphs;
in the batched runner a session's logits are the same bits alone and among any neighbours (the
invariance of docs/lm-runner.md, on the GPU's kernels), and a handful of graphs serve every mix;
the compiled step (``--lm-runner compiled``) and the padded prompt blocks captured == uncaptured;
seeded draws evaluated on CUDA == on the host, and a chunk drawn on the device == the same chunk
drawn on the host; the logprob replay kept on the device == decoding's logits; the batched
runner's shared prompt-block forwards captured == uncaptured and alone == together; logprobs
taken from decoding == the replay; a ``generate`` call synchronises with the GPU once; the
kNN-LM server's shared runner (threads whose steps meet, with hidden states, captured) == each
session alone; graphs captured while other threads work on the GPU (runners of their own, the
query encoder) are kept and replay the uncaptured tokens, and the encoder's vectors stay exact; and
SmolLM2's grouped-query attention laid out for CUDA's fused kernel (``cuda_attention``):
captured == uncaptured, float32 tokens == ``enable_gqa``'s, and the batched step's span groups
(fixed 8-row calls) the same bits alone and in any mix.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ralmspec.lm.hf import BATCH_ROWS, CallStats
from ralmspec.lm.models import load_lm
from ralmspec.lm.sampling import Sampling, draw, draw_on_device
from ralmspec.lm.slot_decoder import attention_span
from ralmspec.lm.static import StaticRunner
from tests.lm.conftest import (HostDrawForbidden, logits_each_and_one_by_one, make_view, prefill_waves,
                               random_tokens, step_mixes)

PROMPT_LENGTHS = (5, 63, 64, 100, 130, 20, 300, 41)
MIXES = [[0, 1, 2, 3, 4, 5, 6, 7], [5, None, 3, 0], [4, 2], [None, 1, 0, None, 3], [7, 6, 5, 4, 3, 2, 1, 0]]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cuda_tiny(request):
    return load_lm("tiny", device="cuda", dtype=request.param)


def expected_step_keys(max_len: int, batch_rows: int) -> set[tuple[int | None, ...]]:
    """The graph keys ``step_mixes`` over ``MIXES`` and then each row alone must capture: a step's
    spans longest first, padded with ``None`` to ``batch_rows`` (``StaticRunner._step_rows``)."""
    def key(rows: list[int]) -> tuple[int | None, ...]:
        spans = sorted((attention_span(PROMPT_LENGTHS[i] + 1, max_len) for i in rows), reverse=True)
        return tuple(spans) + (None,) * (batch_rows - len(spans))

    return {key([i for i in mix if i is not None]) for mix in MIXES} | {key([i]) for i in range(len(PROMPT_LENGTHS))}


def test_batched_step_graphs_replay_the_uncaptured_bits(cuda_tiny):
    rng = random.Random(3)
    prompts = [random_tokens(rng, n) for n in PROMPT_LENGTHS]
    toks = [rng.randrange(1000, 30000) for _ in range(BATCH_ROWS)]
    runs = {}
    for graphs in (True, False):
        runner = StaticRunner(cuda_tiny.model, max_len=512, capacity=BATCH_ROWS, batch_rows=BATCH_ROWS,
                              cuda_graphs=graphs)
        runner._pooled().gather = True  # read keys by device index in both: the captured step's reads
        with torch.inference_mode():
            together = step_mixes(runner, prompts, MIXES, toks)
            again = step_mixes(runner, prompts, MIXES, toks)  # replays of graphs captured above
            alone = [step_mixes(runner, prompts, [[i]], [toks[r]])[0]
                     for mix in MIXES for r, i in enumerate(mix) if i is not None]
        for a, b, c in zip(together, again, alone):
            assert torch.equal(a, b) and torch.equal(a, c)
        if graphs:
            assert runner.cuda_graphs, "capture failed (a RuntimeWarning says why)"
            # one graph per step's set of spans (``step_order``): the mixes' sets, then each
            # prompt's own span for the steps alone
            assert set(runner._step_graphs) == expected_step_keys(512, runner.batch_rows)
            print(f"\n{cuda_tiny.model.dtype}: {len(runner._step_graphs)} step graphs for "
                  f"{sum(1 for m in MIXES for i in m if i is not None)} rows in {len(MIXES)} mixes")
        runs[graphs] = together
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a, b)


def test_shared_runner_threads_on_cuda_equal_each_session_alone(cuda_tiny):
    """``lm/shared_runner.py`` on CUDA: threads' steps (with rollbacks) meet in the batched runner's
    captured steps, which now return hidden states too; every step's logits and hidden state ==
    the same session stepped alone, bit for bit, and steps did meet."""
    from ralmspec.lm.shared_runner import SharedRunner
    from ralmspec.rendezvous import Rendezvous
    from tests.concurrent import raised, run_together
    from tests.lm.test_shared_runner import play, session_script

    def runner() -> StaticRunner:
        return StaticRunner(cuda_tiny.model, max_len=512, capacity=BATCH_ROWS, batch_rows=BATCH_ROWS)

    scripts = [session_script(seed) for seed in range(6)]
    alone = runner()
    expected = [play(alone, p, a) for p, a in scripts]
    rv = Rendezvous()
    shared = SharedRunner(runner(), rv)

    def worker(i: int) -> list:
        with rv.member():
            return play(shared, *scripts[i])

    got = run_together(len(scripts), worker, timeout_s=300)
    assert not raised(got), raised(got)
    assert shared.runner.cuda_graphs and alone.cuda_graphs, "capture failed (a RuntimeWarning says why)"
    for exp, out in zip(expected, got):
        assert len(out) == len(exp)
        for (el, eh), (ol, oh) in zip(exp, out):
            assert torch.equal(el, ol) and torch.equal(eh, oh)
    assert max(int(k) for k in shared.stats()["batches_by_size"]) >= 2


def test_graphs_are_captured_while_other_threads_work_on_the_gpu(cuda_tiny):
    """Graphs are captured on first use, and in a server other threads use the GPU meanwhile: the
    verification worker's query encoder, the kNN-LM server's other decoding threads with runners
    of their own (capturing too). In torch's default ``global`` capture mode any of their calls
    invalidated the capture and left the runner without graphs for good; captured
    ``thread_local`` (``StaticRunner._capture``), every thread's runner keeps its graphs and
    decodes the tokens of a runner without graphs, while the real query encoder encodes in
    another thread throughout, every encoding the bits of one made on an idle GPU (a bystander's
    work must not be corrupted by the captures either)."""
    import threading

    from ralmspec.retrieval.encoder import QueryEncoder
    from tests.concurrent import raised, run_together

    rng = random.Random(11)
    prompts = [random_tokens(rng, n) for n in (5, 63, 130, 300)]

    def decode(runner: StaticRunner, prompt: list[int]) -> list[int]:
        with torch.inference_mode():
            slot = runner.open()
            _, logits, _ = runner.prefill_block(slot, prompt, last=True, want_hidden=False)
            tokens = runner.decode(slot, logits, 40, None, frozenset()).tokens
            runner.free(slot)
        return tokens

    plain = StaticRunner(cuda_tiny.model, max_len=512, capacity=1, cuda_graphs=False)
    expected = [decode(plain, p) for p in prompts]
    encoder = QueryEncoder(device="cuda", cache_size=0)
    queries = ["who wrote hamlet", "the river flows into the sea"]
    vectors = encoder.encode_queries(queries)
    runners = [StaticRunner(cuda_tiny.model, max_len=512, capacity=1) for _ in prompts]
    done = threading.Semaphore(0)

    def body(i: int):
        if i < len(prompts):
            try:
                return decode(runners[i], prompts[i])
            finally:
                done.release()
        calls = finished = 0
        while finished < len(prompts):  # the verification worker's job, beside the captures
            assert np.array_equal(encoder.encode_queries(queries), vectors), f"encoding {calls} changed"
            calls += 1
            finished += done.acquire(blocking=False)
        return calls

    got = run_together(len(prompts) + 1, body, timeout_s=300)
    assert not raised(got), raised(got)
    assert got[:-1] == expected and got[-1] > 0
    for runner in runners:
        assert runner.cuda_graphs and runner.captured_graphs > 0, "capture failed (a RuntimeWarning says why)"


def test_one_row_graphs_replay_the_uncaptured_bits(cuda_tiny):
    """Decode with graphs (all kept, or at most 2 per kind: evicted and captured again) == without."""
    rng = random.Random(5)
    prompts = [random_tokens(rng, n) for n in PROMPT_LENGTHS]
    outs = {}
    for graphs, keep in ((True, 256), (True, 2), (False, 256)):
        runner = StaticRunner(cuda_tiny.model, max_len=512, capacity=4, cuda_graphs=graphs, max_graphs=keep)
        rows = []
        with torch.inference_mode():
            for prompt in prompts:
                slot = runner.open()
                _, logits, _ = runner.prefill_block(slot, prompt, last=True, want_hidden=False)
                chunk = runner.decode(slot, logits, 12, None, frozenset())
                runner.crop(slot, len(prompt) + 3)  # a rollback, then the same steps again
                again = runner.decode(slot, runner.step_logits(slot, chunk.tokens[3])[1], 8, None, frozenset())
                assert again.tokens == chunk.tokens[4:], (len(prompt), graphs)
                rows.append(chunk.tokens)
                runner.free(slot)
        if graphs:
            assert runner.cuda_graphs and 0 < len(runner._graphs) <= keep
        outs[graphs, keep] = rows
    assert outs[True, 256] == outs[True, 2] == outs[False, 256]


def test_graphs_dropped_are_captured_again_in_a_new_pool(cuda_tiny):
    """``_drop_graphs`` (a capture failure, ``close``, a layout change in experiments/lm_runner.py)
    frees every graph; the next capture used the same pool handle, whose use count torch asserts
    is still above 0 (a RuntimeError: the runner would have gone on without graphs). Session 27's
    desk check; not run on a GPU yet."""
    rng = random.Random(6)
    prompt = random_tokens(rng, 40)
    runner = StaticRunner(cuda_tiny.model, max_len=256, capacity=2, cuda_graphs=True)
    outs = []
    with torch.inference_mode():
        for _ in range(3):
            slot = runner.open()
            _, logits, _ = runner.prefill_block(slot, prompt, last=True, want_hidden=False)
            outs.append(runner.decode(slot, logits, 10, None, frozenset()).tokens)
            runner.free(slot)
            assert runner.cuda_graphs and len(runner._graphs) > 0
            runner._drop_graphs()
    assert outs[0] == outs[1] == outs[2]

def test_batched_generate_on_cuda_equals_each_alone(cuda_tiny):
    """Through the LM contract: mixed greedy rows on the batched runner (graphs on) == each alone."""
    lm = make_view(cuda_tiny, block_size=16, runner="batched")
    rng = random.Random(8)
    prompts = [random_tokens(rng, rng.randrange(3, 200)) for _ in range(BATCH_ROWS + 2)]
    together = lm.generate(prompts, 12, [f"s{i}" for i in range(len(prompts))])
    for prompt, out in zip(prompts, together):
        assert out == lm.generate([prompt], 12)[0]
    assert lm.runner.cuda_graphs and lm.runner.captured_graphs > 0


def test_device_draws_are_the_host_rules_tokens_on_cuda():
    """The draw rule evaluated on CUDA (torch) vs on the host (numpy) for the same logits: the
    same token with ``top_p`` 1 (bit-identical steps), and at most a rare nucleus-edge
    difference below 1 (the exps and sums round on the device); the count is printed."""
    rng = np.random.default_rng(3)
    differ = cases = 0
    for _ in range(200):
        z = (rng.normal(size=49152) * rng.choice([0.5, 3.0, 8.0])).astype(np.float32)
        s = Sampling(float(rng.choice([0.3, 0.8, 1.5])), float(rng.choice([0.5, 0.9, 0.95, 1.0])),
                     int(rng.integers(0, 2 ** 62)))
        for p in range(3):
            on_gpu = int(draw_on_device(torch.from_numpy(z).cuda(), s, p))
            host = draw(z, s, p)
            assert on_gpu == host or s.top_p < 1.0, (s, p)
            differ += on_gpu != host
            cases += 1
    print(f"\ndevice vs host draws: {differ} of {cases} differ (top_p < 1 nucleus edges only)")
    assert differ <= cases // 100


def test_sampled_chunks_drawn_on_cuda_equal_host_draws_of_the_same_logits(cuda_tiny):
    """Seeded sampling on CUDA: a chunk the static runner draws on the device (graphs on, tokens
    fed back without a host read, the pick's host call never made) == the same chunk from the
    same slot state drawn per token on the host by numpy (``draw``): same logits, the rule
    evaluated in both places. ``generate`` agrees with both."""
    lm = make_view(cuda_tiny, block_size=16, runner="static")
    assert lm.runner.device_sampling and lm.runner.cuda_graphs
    rng = random.Random(12)
    for i in range(6):
        prompt = random_tokens(rng, rng.randrange(10, 200))
        s = Sampling(temperature=0.9, top_p=(1.0, 0.9)[i % 2], seed=300 + i, start=i)
        with torch.inference_mode():
            first, _, kv = lm._prefill(prompt, None, CallStats())
            keep = kv.length
            on_device = lm.runner.decode(kv, first, 24, HostDrawForbidden(s), frozenset()).tokens
            lm.runner.crop(kv, keep)
            on_host = lm.runner.decode(kv, first, 24, lambda row, j: draw(row, s, s.start + j), frozenset()).tokens
            lm.runner.free(kv)
        assert on_device == on_host, (i, s)
        assert lm.generate([prompt], 24, [f"s{i}"], [s])[0] == on_device


@pytest.mark.parametrize("runner", ["static", "batched"])
def test_logprob_replay_on_cuda_is_decodings_logits(cuda_tiny, runner):
    """``step_logits_each`` (graphs on, rows kept on the device: each copied before the next
    replay overwrites the graph's output) == ``step_logits`` token by token, bit for bit; and a
    greedy answer's logprobs have each token as their top alternative."""
    lm = make_view(cuda_tiny, block_size=16, runner=runner)
    rng = random.Random(18)
    prompt, toks = random_tokens(rng, 90), random_tokens(rng, 12)
    each, one = logits_each_and_one_by_one(lm, prompt, toks)
    assert all(torch.equal(each[i], one[i]) for i in range(len(toks)))
    out = lm.greedy([prompt], 12)[0]
    assert all(lp.top[0] == (lp.token, lp.logprob) for lp in lm.token_logprobs(prompt, out, 2))


@pytest.mark.parametrize("runner", ["static", "batched"])
def test_logprobs_from_decoding_equal_the_replay_on_cuda(cuda_tiny, runner):
    """Chunks decoded with ``Sampling.logprobs`` (graphs on; greedy and device-sampled rows, two
    of them decoded together on the batched runner) are scored from their decoding's logits:
    ``token_logprobs`` answered from those == its replay (memo off), bit for bit."""
    lm = make_view(cuda_tiny, block_size=16, runner=runner)
    rng = random.Random(21)
    prompts = [random_tokens(rng, n) for n in (30, 90, 150)]
    modes = [Sampling(logprobs=2), Sampling(0.8, 0.9, 6, 0, logprobs=2), Sampling(logprobs=2, start=3)]
    outs = lm.generate(prompts, 10, ["a", "b", "c"], modes)
    kept = [lm.token_logprobs(p, o, 2) for p, o in zip(prompts, outs)]
    assert lm.scored_from_decode == sum(map(len, outs)) and lm.scored_by_replay == 0
    lm.max_scored_chunks = 0
    lm.clear_prefix_cache()
    assert kept == [lm.token_logprobs(p, o, 2) for p, o in zip(prompts, outs)]


@pytest.mark.parametrize("runner", ["static", "batched"])
def test_a_chunk_reads_the_gpu_once(cuda_tiny, runner):
    """A ``generate`` call of 12 tokens (prefill of the prompt's blocks, graphs captured, decode
    greedy and sampled on the device) synchronises with the GPU only for its one read of the
    tokens: torch's sync debug mode counts every synchronising operation (a plain copy from
    pageable memory, ``.item()``, ``.tolist()``...); the places are printed."""
    import warnings

    lm = make_view(cuda_tiny, block_size=16, runner=runner)
    rng = random.Random(19)
    prompts = [random_tokens(rng, n) for n in (40, 70)]
    modes = [None, Sampling(temperature=0.8, top_p=0.9, seed=4)]
    lm.generate(prompts, 12, ["a", "b"], modes)
    for counted in (False, True):  # the first pass captures the graphs the second replays (a capture syncs)
        for i, (prompt, mode) in enumerate(zip(prompts, modes)):
            grown = prompt + random_tokens(rng, 8 if counted else 4)  # same blocks and spans in both passes
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    lm.generate([grown], 12, ["a" if i == 0 else "b"], [mode])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in seen if "synchroniz" in str(w.message)]
            print(f"\n{runner} {'greedy' if mode is None else 'sampled'} (pass {int(counted)}): {len(syncs)} syncs: "
                  + "; ".join(f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in syncs))
            if counted:
                assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_compiled_step_graphs_replay_the_compiled_bits(cuda_tiny):
    """``--lm-runner compiled`` on CUDA: the compiled step captured as the static runner's graphs
    gives the compiled step's own tokens (uncaptured); its agreement with the uncompiled static
    runner (fused kernels may round differently) is printed, not asserted. bfloat16 only (CUDA's
    default dtype): every dtype compiles anew, and a GPU session's minutes are few."""
    if cuda_tiny.model.dtype != torch.bfloat16:
        pytest.skip("the compiled step is checked in bfloat16 only (one compile per dtype)")
    rng = random.Random(9)
    prompts = [random_tokens(rng, n) for n in PROMPT_LENGTHS]
    outs = {}
    for name, kw in {"compiled+graphs": dict(compile_step=True), "compiled": dict(compile_step=True, cuda_graphs=False),
                     "static": {}}.items():
        runner = StaticRunner(cuda_tiny.model, max_len=512, capacity=2, **kw)
        rows = []
        with torch.inference_mode():
            for prompt in prompts:
                slot = runner.open()
                _, logits, _ = runner.prefill_block(slot, prompt, last=True, want_hidden=False)
                rows.append(runner.decode(slot, logits, 16, None, frozenset()).tokens)
                runner.free(slot)
        outs[name] = rows
    assert outs["compiled+graphs"] == outs["compiled"]
    same = sum(a == b for a, b in zip(outs["compiled"], outs["static"]))
    print(f"\n{cuda_tiny.model.dtype}: compiled == static for {same}/{len(prompts)} prompts of 16 tokens")


def test_pooled_prompt_block_graphs_replay_the_uncaptured_bits(cuda_tiny):
    """The batched runner's prompt blocks on CUDA (``prefills_together``: sessions' blocks share
    one ``BATCH_ROWS`` x B forward, a graph per set of spans): captured == uncaptured, bit for
    bit (last logits and KV), and a prompt alone == among others at other positions."""
    B, rng = 64, random.Random(14)
    prompts = [random_tokens(rng, n) for n in (5, 64, 100, 130, 200, 255, 300, 20, 70, 140)]
    held = [0, 0, 1, 0, 2, 3, 1, 0, 1, 2]
    runs = {}
    for graphs in (True, False):
        runner = StaticRunner(cuda_tiny.model, max_len=512, capacity=2 * len(prompts), batch_rows=BATCH_ROWS,
                              cuda_graphs=graphs, prefill_rows=B)
        assert runner.prefills_together
        runner._pooled().gather = True
        with torch.inference_mode():
            together = prefill_waves(runner, prompts, held)
            alone = [prefill_waves(runner, [p], [0])[0] for p in prompts]
            again = prefill_waves(runner, prompts, held)  # replays the first pass's graphs
        for (a, ka), (b, kb), (c, kc) in zip(together, alone, again):
            assert torch.equal(a, b) and torch.equal(a, c)
            assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(ka, kb, kc))
        if graphs:
            assert runner.prefill_graphs, "capture failed (a RuntimeWarning says why)"
            assert any(key[0] == "rows" for key in runner._block_graphs)
        runs[graphs] = together
    for (a, ka), (b, kb) in zip(runs[True], runs[False]):
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ka, kb))


def test_prefill_block_graphs_replay_the_uncaptured_bits(cuda_tiny):
    """Padded prompt blocks (``prefill_rows``, CUDA's layout) captured per (slot, span) give the
    uncaptured padded forward's logits, hidden state and KV, bit for bit, for blocks of 1..B
    tokens; whether a tail's rows equal the full block's on the GPU's kernels is printed."""
    B, rng = 64, random.Random(13)
    prompts = [random_tokens(rng, n) for n in (5, 64, 100, 130, 200, 255)]
    states, kvs = {}, {}
    for graphs in (True, False):
        runner = StaticRunner(cuda_tiny.model, max_len=512, capacity=2, cuda_graphs=graphs, prefill_rows=B)
        got, held = [], []
        with torch.inference_mode():
            for prompt in prompts + prompts:  # the second pass replays the graphs of the first
                slot = runner.open()
                for start in range(0, len(prompt), B):
                    end = min(start + B, len(prompt))
                    _, logits, hidden = runner.prefill_block(slot, prompt[start:end], last=end == len(prompt),
                                                             want_hidden=True)
                got.append((logits, hidden))
                held.append([k[:, :, :len(prompt)].clone() for k in slot.keys])
                runner.free(slot)
        if graphs:
            assert runner.prefill_graphs, "capture failed (a RuntimeWarning says why)"
            assert 0 < len(runner._block_graphs) <= 2 * 4
        states[graphs], kvs[graphs] = got, held
    for (la, ha), (lb, hb) in zip(states[True], states[False]):
        assert torch.equal(la, lb) and torch.equal(ha, hb)
    for a, b in zip(kvs[True], kvs[False]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    full = StaticRunner(cuda_tiny.model, max_len=512, capacity=2, cuda_graphs=False)
    part = StaticRunner(cuda_tiny.model, max_len=512, capacity=2, cuda_graphs=False, prefill_rows=B)
    block = random_tokens(rng, B)
    with torch.inference_mode():
        a, b = full.open(), part.open()
        full.prefill_block(a, block, last=True, want_hidden=False)
        part.prefill_block(b, block[:37], last=True, want_hidden=False)
        same = all(torch.equal(x[:, :, :37], y[:, :, :37]) for x, y in zip(a.keys, b.keys))
    print(f"\n{cuda_tiny.model.dtype}: a padded 37-token block's KV == the full block's: {same}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_query_attention_layout_on_cuda(dtype):
    """SmolLM2 (9 query heads over 3 KV heads) on CUDA, where the static runner lays grouped-query
    attention out for the fused masked kernel (``StaticRunner.cuda_attention``, on by default
    there): graphs replay its uncaptured steps bit for bit, prompt blocks and decode steps, with
    rollbacks; in float32 its greedy tokens are those of SDPA's ``enable_gqa`` layout (bfloat16:
    printed, as two layouts round apart)."""
    from ralmspec.errors import ModelLoadError

    try:
        lm = load_lm("smollm2", device="cuda", dtype=dtype)
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 cannot be had here: {exc}")
    rng = random.Random(11)
    prompts = [[rng.randrange(1000, lm.vocab_size) for _ in range(n)] for n in (5, 64, 100, 300)]
    outs = {}
    for graphs, layout in ((True, True), (False, True), (False, False)):
        runner = StaticRunner(lm.model, max_len=512, capacity=2, cuda_graphs=graphs, cuda_attention=layout)
        assert runner.decoder.cuda_attention == layout
        rows = []
        with torch.inference_mode():
            for prompt in prompts:
                slot = runner.open()
                for s in range(0, len(prompt), 64):
                    _, logits, _ = runner.prefill_block(slot, prompt[s:s + 64], last=s + 64 >= len(prompt),
                                                        want_hidden=False)
                chunk = runner.decode(slot, logits, 12, None, frozenset(), keep_logits=True)
                runner.crop(slot, len(prompt) + 3)
                again = runner.decode(slot, runner.step_logits(slot, chunk.tokens[3])[1], 8, None, frozenset())
                assert again.tokens == chunk.tokens[4:]
                rows.append((chunk.tokens, chunk.logits.float().cpu()))
                runner.free(slot)
        outs[graphs, layout] = rows
    for (ta, la), (tb, lb) in zip(outs[True, True], outs[False, True]):
        assert ta == tb and torch.equal(la, lb)
    same = sum(a[0] == b[0] for a, b in zip(outs[False, True], outs[False, False]))
    print(f"\n{dtype}: packed/repeated layout vs enable_gqa: {same}/{len(prompts)} chunks the same tokens")
    if dtype == "float32":
        assert same == len(prompts)


def test_span_groups_of_a_grouped_query_model_are_invariant_on_cuda():
    """The batched runner's step on CUDA attends once per span group, each a fixed 8-row call
    with SmolLM2's heads packed: a session's logits are the same bits alone and in any mix, with
    graphs replayed and without (the fixed shape is what keeps a row's bits its own on the GPU's
    kernels; on the CPU this is tested with the layout forced)."""
    from ralmspec.errors import ModelLoadError

    try:
        lm = load_lm("smollm2", device="cuda", dtype="bfloat16")
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 cannot be had here: {exc}")
    rng = random.Random(13)
    prompts = [[rng.randrange(1000, lm.vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    toks = [rng.randrange(1000, lm.vocab_size) for _ in range(BATCH_ROWS)]
    runs = []
    for graphs in (True, False):
        runner = StaticRunner(lm.model, max_len=512, capacity=BATCH_ROWS, batch_rows=BATCH_ROWS, cuda_graphs=graphs)
        assert runner.decoder.cuda_attention
        runner._pooled().gather = True
        with torch.inference_mode():
            together = step_mixes(runner, prompts, MIXES, toks)
            alone = [step_mixes(runner, prompts, [[i]], [toks[r]])[0]
                     for mix in MIXES for r, i in enumerate(mix) if i is not None]
        for a, b in zip(together, alone):
            assert torch.equal(a, b)
        runs.append(together)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
