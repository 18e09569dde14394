"""The batched runner (the static runner's batch-invariant mode, ralmspec/lm/static.py): every
decode step is one forward of exactly ``BATCH_ROWS`` rows shared by the sessions of an LM call.

A session decoded inside a batch of mixed neighbours (lengths, greedy / seeded sampling, stop
points, session histories with rollbacks) gives, token for token, what it gives alone on the same
runner and what the eager runner gives it; logprobs replay the batched decode's logits; a batch
larger than the bucket is split into buckets; a session named twice in one batch keeps one slot.
"""

from __future__ import annotations

import random

import pytest
import torch

from ralmspec.errors import ConfigError
from ralmspec.lm.hf import BATCH_ROWS, HFLanguageModel
from ralmspec.lm.sampling import Sampling
from ralmspec.lm.static import StaticRunner, step_order
from tests.lm.conftest import make_view, prefill_waves, random_tokens, step_mixes, with_layout


def _mode(rng: random.Random) -> Sampling | None:
    return None if rng.random() < 0.5 else Sampling(temperature=rng.choice((0.7, 1.0)), top_p=rng.choice((0.9, 1.0)),
                                                    seed=rng.randrange(1 << 20), start=rng.randrange(4))


def blocks_together(lm: HFLanguageModel) -> HFLanguageModel:
    """``lm`` (a batched-runner backend) with CUDA's prompt-block layout forced on the CPU: every
    aligned block padded to ``block_size`` rows, the blocks of one call's sessions sharing ONE
    ``BATCH_ROWS`` x ``block_size`` forward (``StaticRunner.prefills_together``)."""
    lm = with_layout(lm, prefill_rows=lm.block_size)
    assert lm.runner.prefills_together
    return lm


@pytest.mark.parametrize("mode", ["draws on the host", "draws on the device", "prompt blocks together",
                                  "span groups"])
def test_session_in_a_mixed_batch_equals_alone_and_eager(tiny_lm, mode):
    """Random mixes: 3 to BATCH_ROWS+1 rows (one call spans two buckets), prompts of 3..60
    tokens, greedy and seeded sampled rows, rows whose session holds a longer / shorter / rolled
    back history, and stop tokens chosen so that rows stop at different steps of the chunk.
    Sampled rows draw on the host (the CPU's default) or on the device (CUDA's, forced here);
    with CUDA's prompt blocks (forced here), the sessions' blocks share their forwards; with
    CUDA's attention layout (forced here), a step attends once per span group."""
    rng = random.Random(21)
    probe = make_view(tiny_lm, block_size=16, runner="eager")
    eager = make_view(tiny_lm, block_size=16, runner="eager")
    batched = make_view(tiny_lm, block_size=16, runner="batched")  # its sessions persist across trials
    batched.runner.device_sampling = mode == "draws on the device"
    if mode == "prompt blocks together":
        batched = blocks_together(batched)
    if mode == "span groups":  # a decode step attends once per run of equal spans
        batched = with_layout(batched, cuda_attention=True)
    history: dict[str, list[int]] = {}
    early_stops = full_rows = reused = 0
    for trial, rows in enumerate((4, BATCH_ROWS + 1, 3, 6)):
        n = rng.randrange(4, 7)
        names = [f"s{rng.randrange(6)}" for _ in range(rows)]
        names = list(dict.fromkeys(names)) + [f"x{trial}-{i}" for i in range(rows - len(set(names)))]
        prompts = []
        for name in names:
            old = history.get(name)
            if old and rng.random() < 0.8:  # the session's own history, rolled back or extended
                cut = rng.randrange(len(old) // 2, len(old) + 1)
                prompts.append(old[:cut] + random_tokens(rng, rng.randrange(0, 20)))
            else:
                prompts.append(random_tokens(rng, rng.randrange(3, 60)))
        modes = [_mode(rng) for _ in names]
        # stop ids: a token some rows produce mid-chunk (found with no stop ids), so rows end apart
        free = probe.generate(prompts, n, None, modes)
        stops = {free[r][rng.randrange(1, n - 1)] for r in rng.sample(range(rows), 2)}
        batched.stop_token_ids = eager.stop_token_ids = frozenset(stops) | probe.stop_token_ids
        together = batched.generate(prompts, n, names, modes)
        reused += batched.last_call_stats.reused_tokens
        for r, (prompt, mode) in enumerate(zip(prompts, modes)):
            alone = batched.generate([prompt], n, None, [mode])[0]
            assert together[r] == alone, (trial, r, len(prompt), mode)
            assert together[r] == eager.generate([prompt], n, None, [mode])[0], (trial, r)
            early_stops += len(together[r]) < n
            full_rows += len(together[r]) == n
            history[names[r]] = prompt + together[r]
    assert early_stops > 0 and full_rows > 0, (early_stops, full_rows)
    assert reused > 0, "no session reused its slot: the rollback / reuse path is untested"
    live = batched.runner.live_rows
    assert max(live) > 1 and 1 in live, live  # shared steps, and lone steps in the same shape
    if mode == "prompt blocks together":
        blocks = batched.runner.block_rows
        assert max(blocks) > 1 and 1 in blocks, blocks  # shared block forwards, and lone ones



@pytest.mark.parametrize("gather", [False, True], ids=["slot views", "device-index reads"])
def test_prompt_blocks_are_the_same_bits_alone_and_together(tiny_lm, gather):
    """``prefills_together``: bit for bit, a prompt prefilled alone (each block a pooled forward
    with padding rows) == prefilled with other prompts' blocks in the same forwards (waves of
    ``prefill_blocks``, the sessions at different positions: some had blocks already, so a
    forward mixes spans 64, 128 and 256), for the last logits and every KV entry; the padded
    tail's real rows == those of the full block; reads by device index (a captured forward) ==
    through slot views."""
    B = 16
    rng = random.Random(12)
    prompts = [random_tokens(rng, n) for n in (5, 16, 17, 40, 63, 64, 100, 130, 150, 200, 33)]  # two groups
    held = [0, 0, 1, 2, 0, 3, 6, 0, 8, 4, 1]  # blocks a session holds before the call (prefilled alone)
    runner = StaticRunner(tiny_lm.model, max_len=256, capacity=2 * len(prompts), batch_rows=BATCH_ROWS, prefill_rows=B)
    runner._pooled().gather = gather
    seen: list[tuple] = []  # the spans of every pooled forward
    forward = runner.decoder.forward
    runner.decoder.forward = lambda slots, ids, pos, spans, pool=None: seen.append(tuple(spans)) or forward(
        slots, ids, pos, spans, pool)

    with torch.inference_mode():
        together = prefill_waves(runner, prompts, held)
        alone = [prefill_waves(runner, [p], [0])[0] for p in prompts]
        tails = [p + random_tokens(rng, B - len(p) % B) for p in prompts if len(p) % B]  # tails completed
        longer = prefill_waves(runner, tails, [0] * len(tails))
    for (a, ka), (b, kb) in zip(together, alone):
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ka, kb))
    for (_, kt), (_, kf) in zip([kv for p, kv in zip(prompts, alone) if len(p) % B], longer):
        assert all(torch.equal(x, y[:, :x.shape[1]]) for x, y in zip(kt, kf))
    assert max(runner.block_rows) == BATCH_ROWS and runner.block_rows[1] > 0
    assert any(len({s for s in spans if s is not None}) == 3 for spans in seen), seen  # 64, 128, 256 in one forward


def test_scores_kept_from_a_shared_decode_are_each_rows_own(tiny_lm):
    """Prompts decoded together with ``Sampling.logprobs`` (greedy and sampled rows, stopping
    apart) keep each row's own decode logits: ``token_logprobs`` answered from them == its
    replay (memo off), bit for bit, for every row."""
    lm = make_view(tiny_lm, block_size=16, runner="batched")
    rng = random.Random(23)
    prompts = [random_tokens(rng, rng.randrange(5, 60)) for _ in range(5)]
    modes = [Sampling(logprobs=2, start=1) if i % 2 else Sampling(0.8, 0.9, 40 + i, 0, logprobs=2) for i in range(5)]
    free = lm.generate(prompts, 7, None, modes)
    lm.stop_token_ids = frozenset({free[0][3], free[3][1]}) | lm.stop_token_ids  # rows stop apart
    lm.clear_prefix_cache()
    lm.scored_from_decode = 0
    outs = lm.generate(prompts, 7, [f"p{i}" for i in range(5)], modes)
    assert max(lm.runner.live_rows) > 1 and len({len(o) for o in outs}) > 1, outs
    kept = [lm.token_logprobs(p, o, 2) for p, o in zip(prompts, outs)]
    assert lm.scored_from_decode == sum(map(len, outs)) and lm.scored_by_replay == 0
    lm.max_scored_chunks = 0
    lm.clear_prefix_cache()
    assert kept == [lm.token_logprobs(p, o, 2) for p, o in zip(prompts, outs)]
    assert lm.scored_by_replay == sum(map(len, outs))


def test_logprobs_replay_the_batched_decode(tiny_lm):
    """``token_logprobs`` steps one row in the bucket shape, so its logits are the batched
    decode's own: the greedy tokens are their argmax, whatever shared the decode's steps."""
    lm = make_view(tiny_lm, block_size=16, runner="batched")
    rng = random.Random(4)
    prompts = [random_tokens(rng, rng.randrange(5, 60)) for _ in range(5)]
    outs = lm.greedy(prompts, 6, [f"p{i}" for i in range(5)])
    for prompt, out in zip(prompts, outs):
        scored = lm.token_logprobs(prompt, out, top_k=1, session=None)
        assert [s.top[0][0] for s in scored] == out


def test_a_session_twice_in_one_batch_keeps_one_slot(tiny_lm):
    lm = make_view(tiny_lm, block_size=8, runner="batched")
    rng = random.Random(6)
    a, b = random_tokens(rng, 30), random_tokens(rng, 20)
    assert lm.greedy([a, b], 3, ["s", "s"]) == [lm.greedy([a], 3)[0], lm.greedy([b], 3)[0]]
    assert lm.cached_sessions == 1 and lm.cached_length("s") == 16  # the last one's blocks
    assert len(lm.runner._free) == lm.runner.capacity - 1


def test_the_pool_is_counted_once_as_the_runners_kv(tiny_lm):
    """``kv_bytes`` (``/v1/stats`` memory): the batched runner allocates every slot and the spare
    at its first session, and opening more slots allocates nothing more."""
    lm = make_view(tiny_lm, block_size=8, runner="batched")
    assert lm.memory()["runner_kv_bytes"] == 0
    rng = random.Random(3)
    lm.greedy([random_tokens(rng, 20)], 2, ["a"])
    pool = lm.runner._kv_pool
    allocated = sum(t.numel() * t.element_size() for t in pool.keys + pool.values)
    assert allocated == lm.memory()["runner_kv_bytes"] > 0
    assert pool.keys[0].shape[0] == lm.runner.capacity + 1  # the slots and the spare
    lm.greedy([random_tokens(rng, 20), random_tokens(rng, 30)], 2, ["b", "c"])
    assert lm.memory()["runner_kv_bytes"] == allocated and lm.memory()["sessions"] == 3


def test_bucket_size_is_checked(tiny_lm):
    with pytest.raises(ConfigError, match="batch_rows"):
        StaticRunner(tiny_lm.model, max_len=64, capacity=2, batch_rows=4)
    assert StaticRunner(tiny_lm.model, max_len=64, capacity=4, batch_rows=4).name == "batched"


@pytest.mark.parametrize("cuda_attention", [False, True])
def test_smollm2_batched_equals_alone_and_eager(smollm2_lm, cuda_attention):
    """The real default model (a Llama, GQA): three requests decoded together, greedy and seeded,
    each equal to itself alone on the batched runner and to the eager runner; also with the
    attention laid out as on CUDA (``StaticRunner.cuda_attention``, forced)."""
    lm = HFLanguageModel(smollm2_lm.model, smollm2_lm.tokenizer, eos_token_id=smollm2_lm.eos_token_id,
                         stop_token_ids=smollm2_lm.stop_token_ids, max_context=smollm2_lm.max_context,
                         runner="batched")
    if cuda_attention:
        lm = with_layout(lm, cuda_attention=True)
    tok = smollm2_lm.tokenizer
    prompts = [tok.encode(t) for t in ("The capital of France is", "Photosynthesis converts light energy into",
                                       "Hed PE is an American rock band from")]
    modes = [None, Sampling(temperature=0.8, seed=3), None]
    together = lm.generate(prompts, 4, ["a", "b", "c"], modes)
    for prompt, mode, out in zip(prompts, modes, together):
        assert out == lm.generate([prompt], 4, None, [mode])[0]
        assert out == smollm2_lm.generate([prompt], 4, None, [mode])[0]
    assert lm.runner.live_rows[3] > 0  # the three did share their steps


def test_step_order_sorts_live_rows_by_span_and_pads_last():
    """The order a batch-invariant step runs its rows in: its spans are the CUDA graph's key."""
    assert step_order([64, None, 128, 64]) == [2, 0, 3, 1]
    assert step_order([None, None, 64]) == [2, 0, 1]
    keys = {tuple(s[r] for r in step_order(s)) for s in ([64, 128, None, 64], [128, 64, 64, None],
                                                         [None, 64, 64, 128])}
    assert keys == {(128, 64, 64, None)}  # one graph for every arrangement of one set of spans


@pytest.fixture(scope="module")
def tiny_bf16():
    from ralmspec.lm.models import load_lm

    return load_lm("tiny", dtype="bfloat16")


@pytest.mark.parametrize("layout", ["per row", "span groups"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_rows_logits_are_the_same_bits_in_any_mix_and_read_either_way(tiny_lm, tiny_bf16, dtype, layout):
    """Bit for bit: a session's step logits alone == among other sessions at any place, with
    padding rows between them; and reading the keys by device index (what a captured CUDA step
    does, ``KVPool.gather``) == reading them through the slots' views (the uncaptured step). In
    float32 and in bfloat16 (``--lm-dtype auto`` on a CPU with bfloat16 instructions); with
    attention per row (the CPU's) and per span group (CUDA's ``cuda_attention``, forced: a
    group of 1, 2 or 3 rows and its padding in one fixed 8-row call, asserted to have run)."""
    if dtype == "bfloat16":
        tiny_lm = tiny_bf16
    rng = random.Random(11)
    prompts = [random_tokens(rng, n) for n in (5, 63, 64, 100, 130, 20)]  # spans 64, 64, 128, 128, 256, 64
    mixes = [[0, 1, 2, 3, 4, 5], [5, None, 3, 0], [4, 2], [None, 1, 0, None, 3]]
    toks = [rng.randrange(1000, 30000) for _ in range(BATCH_ROWS)]
    runs = []
    for gather in (False, True):
        runner = StaticRunner(tiny_lm.model, max_len=256, capacity=BATCH_ROWS, batch_rows=BATCH_ROWS,
                              cuda_attention=layout == "span groups")
        runner._pooled().gather = gather
        calls = []  # rows per attention call of the decode steps (one query position each)
        sdpa = runner.decoder._sdpa

        def spy(q, *args, sdpa=sdpa, calls=calls):
            if q.shape[2] == 1:
                calls.append(q.shape[0])
            return sdpa(q, *args)
        runner.decoder._sdpa = spy
        with torch.inference_mode():
            together = step_mixes(runner, prompts, mixes, toks)
            alone = [step_mixes(runner, prompts, [[i]], [toks[r]])[0]
                     for mix in mixes for r, i in enumerate(mix) if i is not None]
        assert len(together) == len(alone) == 14
        for a, b in zip(together, alone):
            assert torch.equal(a, b)
        assert set(calls) == ({BATCH_ROWS} if layout == "span groups" else {1}), set(calls)
        # per layer: a call per live row (14 in the mixes + 14 alone), or per run of equal spans:
        # 256 | 128 128 | 64 64 64, then 128 | 64 64, 256 | 64, 128 | 64 64 (9) + 14 alone
        assert len(calls) == (9 + 14 if layout == "span groups" else 28) * len(runner.decoder.layers)
        runs.append(together)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_bfloat16_batched_session_equals_alone(tiny_bf16, model):
    """In bfloat16 too, a session decoded among others (greedy and seeded rows, rows at other
    positions, two buckets) gives what it gives alone on the batched runner. (Not what the
    eager runner gives: an 8-row GEMM and a GEMV round differently in bfloat16 as in float32.)"""
    from ralmspec.lm.models import load_lm

    base = tiny_bf16 if model == "tiny" else load_lm("smollm2", dtype="bfloat16")
    assert base.dtype == torch.bfloat16
    lm = make_view(base, block_size=16, runner="batched")
    rng = random.Random(5)
    vocab = (1000, 30000) if model == "tiny" else (200, 40000)
    prompts = [[rng.randrange(*vocab) for _ in range(rng.randrange(3, 40))] for _ in range(BATCH_ROWS + 1)]
    modes = [_mode(rng) for _ in prompts]
    together = lm.generate(prompts, 5, [f"s{i}" for i in range(len(prompts))], modes)
    for prompt, mode, out in zip(prompts, modes, together):
        assert out == lm.generate([prompt], 5, None, [mode])[0]
    assert max(lm.runner.live_rows) > 1
