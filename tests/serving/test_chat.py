"""``POST /v1/chat/completions``, ``stop`` and ``logprobs`` over real sockets with the official
``openai`` client, against the real instruct model (SmolLM2, its chat template) and the real
embedded knowledge base: the same text with speculation on and off (speculation forced, and
checked to have run), the same layout as ``/v1/completions``, multi-turn conversations, stop
strings that span stream chunks, logprobs equal with speculation on and off, 400s naming the field.
"""

from __future__ import annotations

import pytest

from ralmspec.engine.prompt import Conversation
from ralmspec.engine.stop import find_stop, stable_text
from tests.serving.support import CHAT_ENGINE_CONFIG, CHAT_MODEL, MODEL, request

QUESTION = "Which city is the American rock band Hed PE from?"
FORCED = {"os3": False, "fixed_stride": 3, "prefetch": 1}  # speculate at every step
HISTORY = [{"role": "system", "content": "You are a music historian. Answer in one short sentence."},
           {"role": "user", "content": "I am reading about American rock bands of the 1990s."},
           {"role": "assistant", "content": "Great topic. Which band would you like to know about?"}]


def ask(client, messages, speculate: bool | None = None, **kw):
    ralm = dict(FORCED) | ({} if speculate is None else {"speculate": speculate})
    return client.chat.completions.create(model=CHAT_MODEL, messages=messages, extra_body={"ralm": ralm}, **kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assert_speculated(resp) -> None:
    ralm = resp.model_extra["ralm"]
    assert ralm["mode"] == "speculative" and ralm["stats"]["speculated"] > 0, ralm["stats"]


def stream_parts(stream) -> tuple[list, list[str], str | None, dict | None, object]:
    chunks, texts, finish, ralm, usage = [], [], None, None, None
    for c in stream:
        chunks.append(c)
        if c.usage is not None:
            usage = c.usage
        if not c.choices:
            continue
        ch = c.choices[0]
        text = ch.delta.content if hasattr(ch, "delta") else ch.text
        if text:
            texts.append(text)
        finish = ch.finish_reason or finish
        ralm = c.model_extra.get("ralm") or ralm
    return chunks, texts, finish, ralm, usage


def test_chat_equals_with_and_without_speculation_and_equals_completions(chat_client):
    spec = ask(chat_client, user(QUESTION), speculate=True)
    naive = ask(chat_client, user(QUESTION), speculate=False)
    assert_speculated(spec)
    assert naive.model_extra["ralm"]["mode"] == "naive"
    msg = spec.choices[0].message
    assert msg.role == "assistant" and msg.content == naive.choices[0].message.content and msg.content.strip()
    assert spec.object == "chat.completion" and spec.id.startswith("chatcmpl-") and spec.model == CHAT_MODEL
    assert spec.choices[0].finish_reason in ("stop", "length") and spec.choices[0].logprobs is None
    assert spec.usage.completion_tokens == naive.usage.completion_tokens > 0
    assert spec.model_extra["ralm"]["passages"] == naive.model_extra["ralm"]["passages"]
    # one user message is laid out exactly as /v1/completions lays out its prompt
    comp = chat_client.completions.create(model=CHAT_MODEL, prompt=QUESTION,
                                          max_tokens=CHAT_ENGINE_CONFIG.generation.max_new_tokens,
                                          extra_body={"ralm": {"speculate": False}})
    assert comp.choices[0].text == msg.content
    assert comp.usage.completion_tokens == spec.usage.completion_tokens
    # streamed: the role first, then content deltas whose concatenation is the answer
    chunks, texts, finish, ralm, usage = stream_parts(ask(chat_client, user(QUESTION), speculate=True, stream=True,
                                                          stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert "".join(texts) == msg.content and len(texts) >= 2
    assert finish == spec.choices[0].finish_reason and ralm["mode"] == "speculative" and ralm["stats"]["speculated"] > 0
    assert usage.completion_tokens == spec.usage.completion_tokens


def test_multi_turn_keeps_earlier_turns_and_queries_the_last_question(chat_client, chat_engine):
    messages = HISTORY + user(QUESTION)
    spec = ask(chat_client, messages, speculate=True)
    naive = ask(chat_client, messages, speculate=False, logprobs=True)
    assert_speculated(spec)
    answer = spec.choices[0].message.content
    assert answer == naive.choices[0].message.content
    # the engine given the same conversation directly: the same answer
    history = tuple((m["role"], m["content"]) for m in HISTORY)
    gen = CHAT_ENGINE_CONFIG.generation
    direct = chat_engine.generate_sync(Conversation(history, QUESTION), gen=gen, speculate=False)
    assert direct.text == answer
    # the earlier turns are in the LM input (they replace the template's default system turn) ...
    fmt = chat_engine.context(gen, conversation=Conversation(history, QUESTION)).fmt
    before = chat_engine.lm.tokenizer.decode(list(fmt.before))
    assert all(m["content"] in before for m in HISTORY) and "SmolLM" not in before
    # ... but never in a query: step 0 retrieves for the last question alone, as a single turn does
    single = ask(chat_client, user(QUESTION), speculate=False, logprobs=True)
    assert spec.model_extra["ralm"]["passages"][0]["doc_id"] == single.model_extra["ralm"]["passages"][0]["doc_id"]
    # the model may well give the same words; under another context it gives them other probabilities
    assert [e.logprob for e in naive.choices[0].logprobs.content] != \
        [e.logprob for e in single.choices[0].logprobs.content]
    # content as a list of text parts is the same message
    parts = [{"type": "text", "text": "Which city is the American rock band"}, {"type": "text", "text": "Hed PE from?"}]
    short = {"speculate": False, "max_tokens": 4}  # the same prompt gives the same first tokens
    as_parts = ask(chat_client, HISTORY + [{"role": "user", "content": parts}], **short)
    as_text = ask(chat_client, HISTORY + user("Which city is the American rock band\nHed PE from?"), **short)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


def test_stop_spanning_stream_chunks_on_both_endpoints(chat_client, chat_engine):
    tok = chat_engine.lm.tokenizer
    gen = CHAT_ENGINE_CONFIG.generation
    ids = chat_engine.generate_sync(Conversation((), QUESTION), gen=gen, speculate=False).token_ids
    # tokens 5 and 6 straddle the boundary of the verified chunks [4, 6) and [6, 8) (stride 2)
    head, cut = stable_text(tok, ids[:5]), stable_text(tok, ids[:7])
    stop = cut[len(head):]
    full = stable_text(tok, ids)
    start, _ = find_stop(full, [stop])
    assert start == len(head) and len(head) < len(stable_text(tok, ids[:6])) < len(cut), (stop, full)
    want = full[:start]
    for speculate in (True, False):
        r = ask(chat_client, user(QUESTION), speculate=speculate, stop=[stop, "\u2603never"])
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == 7  # the shortest prefix that completes the stop string
        if speculate:
            assert_speculated(r)
    for speculate in (False, True):  # naive sends one chunk per stride: the stop spans two of them
        _, texts, finish, _, _ = stream_parts(ask(chat_client, user(QUESTION), speculate=speculate, stream=True,
                                                  stop=stop))
        assert "".join(texts) == want and finish == "stop"
    comp = chat_client.completions.create(model=CHAT_MODEL, prompt=QUESTION, max_tokens=gen.max_new_tokens,
                                          stop=stop, extra_body={"ralm": FORCED | {"speculate": True}})
    assert comp.choices[0].text == want and comp.choices[0].finish_reason == "stop"
    assert_speculated(comp)
    _, texts, finish, _, _ = stream_parts(chat_client.completions.create(
        model=CHAT_MODEL, prompt=QUESTION, max_tokens=gen.max_new_tokens, stop=[stop], stream=True,
        extra_body={"ralm": {"speculate": False}}))
    assert "".join(texts) == want and finish == "stop"


def streamed_logprobs(stream) -> list[tuple[str, list, list[int] | None]]:
    """Each content chunk's ``(text, logprob entries, text offsets)`` (chat: entries of
    ``logprobs.content``, offsets None; completions: ``(token, logprob)`` pairs and ``text_offset``)."""
    out = []
    for c in stream:
        if not c.choices or c.choices[0].logprobs is None:
            continue
        ch = c.choices[0]
        if hasattr(ch, "delta"):
            out.append((ch.delta.content or "", [e.model_dump() for e in ch.logprobs.content], None))
        else:
            lp = ch.logprobs
            out.append((ch.text, list(zip(lp.tokens, lp.token_logprobs)), lp.text_offset))
    return out


def assert_sent_with_their_text(parts, tokens_of) -> None:
    """After every chunk, the text of the tokens whose logprobs were sent is a prefix of the text
    sent: no entry runs ahead of its text. Entries come with the text, not all at the end."""
    text = toks = ""
    for delta, entries, _ in parts:
        text += delta
        toks += "".join(tokens_of(e) for e in entries)
        assert text.startswith(toks), (text, toks)
    assert sum(1 for _, entries, _ in parts[:-1] if entries) >= 3, parts


def test_streamed_logprobs_go_with_their_text(chat_client, chat_engine):
    """A streamed answer's logprobs arrive chunk by chunk, each with the text delta that completes
    its tokens, and concatenated they are the non-streamed answer's (text offsets included), on
    both endpoints, speculative and naive, also when a stop string cuts the answer."""
    for speculate in (True, False):
        want = ask(chat_client, user(QUESTION), speculate=speculate, logprobs=True, top_logprobs=2)
        parts = streamed_logprobs(ask(chat_client, user(QUESTION), speculate=speculate, stream=True, logprobs=True,
                                      top_logprobs=2))
        assert [e for _, entries, _ in parts for e in entries] == [e.model_dump() for e in want.choices[0].logprobs.content]
        assert "".join(t for t, _, _ in parts) == want.choices[0].message.content
        assert_sent_with_their_text(parts, lambda e: e["token"])
    n = CHAT_ENGINE_CONFIG.generation.max_new_tokens
    body = {"model": CHAT_MODEL, "prompt": QUESTION, "max_tokens": n, "logprobs": 1,
            "extra_body": {"ralm": FORCED | {"speculate": True}}}
    whole = chat_client.completions.create(**body).choices[0]
    parts = streamed_logprobs(chat_client.completions.create(**body, stream=True))
    assert [e for _, entries, _ in parts for e in entries] == list(zip(whole.logprobs.tokens, whole.logprobs.token_logprobs))
    assert [o for _, _, offs in parts for o in offs] == whole.logprobs.text_offset
    assert_sent_with_their_text(parts, lambda e: e[0])
    sent = 0
    for delta, _, offs in parts:  # a token's text starts within the text sent with it
        sent += len(delta)
        assert all(o <= sent for o in offs)
    # a stop string that ends inside a verified chunk: the entries sent are the stopped answer's
    # (not its chunk's last token), the rest comes with the finish chunk
    tok = chat_engine.lm.tokenizer
    ids = chat_engine.generate_sync(Conversation((), QUESTION), gen=CHAT_ENGINE_CONFIG.generation,
                                    speculate=False).token_ids
    head = stable_text(tok, ids[:4])
    stop = stable_text(tok, ids[:5])[len(head):]  # token 4: the first of the chunk [4, 6) (stride 2)
    assert find_stop(stable_text(tok, ids), [stop])[0] == len(head), stop
    for speculate in (True, False):
        cut = ask(chat_client, user(QUESTION), speculate=speculate, logprobs=True, stop=[stop])
        parts = streamed_logprobs(ask(chat_client, user(QUESTION), speculate=speculate, logprobs=True,
                                      stop=[stop], stream=True))
        assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == 5
        assert [e for _, entries, _ in parts for e in entries] == [e.model_dump() for e in cut.choices[0].logprobs.content]
        assert "".join(t for t, _, _ in parts) == cut.choices[0].message.content == head


def test_chat_logprob_bytes_rebuild_multibyte_text(chat_engine):
    """OpenAI's ``bytes`` let a client rebuild characters split across tokens. SmolLM2's
    byte-level vocabulary splits CJK and emoji so: those tokens' names are U+FFFD, their bytes
    are the real ones (they were U+FFFD's too), and the bytes of all tokens joined are the text."""
    from ralmspec.lm.base import TokenLogprob
    from ralmspec.serving.shapes import CHAT

    tok = chat_engine.lm.tokenizer
    text = "Tokyo (東京) 🙂 café\n\t<|im_end|>"
    ids = tok.encode(text)
    content = CHAT.logprobs([TokenLogprob(i, -1.0, ((i, -1.0),)) for i in ids], tok, [])["content"]
    assert any("\ufffd" in e["token"] for e in content), "the case must split a character"
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8") == text
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in content)
    assert all(e["bytes"] == list(e["token"].encode("utf-8")) for e in content if "\ufffd" not in e["token"])


def test_logprobs_equal_with_and_without_speculation(chat_client):
    spec = ask(chat_client, user(QUESTION), speculate=True, logprobs=True, top_logprobs=3)
    naive = ask(chat_client, user(QUESTION), speculate=False, logprobs=True, top_logprobs=3)
    assert_speculated(spec)
    content = spec.choices[0].logprobs.content
    assert [e.model_dump() for e in content] == [e.model_dump() for e in naive.choices[0].logprobs.content]
    assert len(content) == spec.usage.completion_tokens
    assert "".join(e.token for e in content) == spec.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0.0
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)  # greedy: the argmax
        assert e.bytes == list(e.token.encode("utf-8"))
    # streamed: the same numbers, sent with their text (test_streamed_logprobs_go_with_their_text)
    chunks, _, _, _, _ = stream_parts(ask(chat_client, user(QUESTION), speculate=True, stream=True, logprobs=True,
                                          top_logprobs=3))
    streamed = [e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [e.model_dump() for e in content]
    # /v1/completions: the same question, the same layout, the same numbers in its own shape
    comp = chat_client.completions.create(model=CHAT_MODEL, prompt=QUESTION, logprobs=2,
                                          max_tokens=CHAT_ENGINE_CONFIG.generation.max_new_tokens,
                                          extra_body={"ralm": FORCED | {"speculate": True}})
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs == [e.logprob for e in content] and lp.tokens == [e.token for e in content]
    assert all(len(d) == 2 and tok in d for d, tok in zip(lp.top_logprobs, lp.tokens))  # greedy: chosen in top 2
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert [comp.choices[0].text[a:b] for a, b in zip(lp.text_offset, lp.text_offset[1:])] == lp.tokens[:-1]
    # sampled with a seed: still identical
    kw = {"logprobs": True, "top_logprobs": 1, "temperature": 0.9, "seed": 3, "max_tokens": 8}
    s_on, s_off = ask(chat_client, user(QUESTION), speculate=True, **kw), ask(chat_client, user(QUESTION),
                                                                             speculate=False, **kw)
    assert_speculated(s_on)
    assert s_on.choices[0].message.content == s_off.choices[0].message.content
    assert [e.model_dump() for e in s_on.choices[0].logprobs.content] == \
        [e.model_dump() for e in s_off.choices[0].logprobs.content]
    assert ask(chat_client, user(QUESTION)).choices[0].logprobs is None


OK = {"model": CHAT_MODEL, "messages": user("who wrote hamlet"), "max_tokens": 2}


def with_(**kw):
    return {**OK, **kw}


CHAT_CASES = [
    # (id, body, param)
    ("missing-messages", {"model": CHAT_MODEL}, "messages"),
    ("empty-messages", with_(messages=[]), "messages"),
    ("messages-not-list", with_(messages="hi"), "messages"),
    ("message-not-object", with_(messages=["hi"]), "messages[0]"),
    ("unknown-role", with_(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("tool-role", with_(messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}]), "messages[0].role"),
    ("last-not-user", with_(messages=user("hi") + [{"role": "assistant", "content": "yo"}]), "messages[1].role"),
    ("empty-question", with_(messages=user("  ")), "messages[0].content"),
    ("lone-surrogate", with_(messages=user("who wrote \udc00 hamlet")), "messages[0].content"),
    ("lone-surrogate-in-part", with_(messages=[{"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}]),
     "messages[0].content[0].text"),
    ("content-null", with_(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    ("image-part", with_(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), "messages[0].content[1].type"),
    ("assistant-tool-calls", with_(messages=[
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "hi"}]), "messages[0].tool_calls"),
    ("tools", with_(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("n-2", with_(n=2), "n"),
    ("five-stops", with_(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("top-logprobs-6", with_(logprobs=True, top_logprobs=6), "top_logprobs"),
    ("top-logprobs-without-logprobs", with_(top_logprobs=2), "top_logprobs"),
    ("logprobs-int", with_(logprobs=3), "logprobs"),
    ("max-tokens-disagree", with_(max_tokens=2, max_completion_tokens=3), "max_tokens"),
    ("max-completion-tokens-zero", with_(max_tokens=None, max_completion_tokens=0), "max_completion_tokens"),
    ("json-mode", with_(response_format={"type": "json_object"}), "response_format"),
    ("plain-format", with_(ralm={"prompt_format": "plain"}), "ralm.prompt_format"),
    ("unknown-field", with_(functions=[]), "functions"),
    ("ralm-stride-zero", with_(ralm={"stride": 0}), "ralm.stride"),
]


@pytest.mark.parametrize("case", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_bad_input(chat_server, case):
    _, body, param = case
    status, resp = request("POST", f"{chat_server.url}/v1/chat/completions", body)
    assert status == 400, resp
    err = resp["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"], err


def test_a_conversation_too_long_for_the_context_says_which_part(chat_server):
    long = "the history of the roman empire " * 1500  # ~9,000 tokens: past any runner's context
    for messages, want in (
            (user(long), "the prompt has "),  # the question itself
            ([{"role": "system", "content": long}] + user("hi"), "system message and earlier turns takes"),
            (user("a") + [{"role": "assistant", "content": long}] + user("hi"), "system message and earlier turns")):
        status, resp = request("POST", f"{chat_server.url}/v1/chat/completions",
                               with_(messages=messages, max_tokens=4))
        assert status == 400 and resp["error"]["param"] == "messages", resp
        assert want in resp["error"]["message"] and "-" not in resp["error"]["message"].split("at most")[1], resp


def test_model_without_chat_template_is_400(server):
    status, resp = request("POST", f"{server.url}/v1/chat/completions",
                           {"model": MODEL, "messages": user("who wrote hamlet")})
    assert status == 400 and resp["error"]["param"] == "messages", resp
    assert "chat template" in resp["error"]["message"]


def test_official_client_raises_bad_request_on_chat_errors(chat_client):
    import openai

    with pytest.raises(openai.BadRequestError) as exc:
        chat_client.chat.completions.create(model=CHAT_MODEL, messages=[])
    assert exc.value.body["param"] == "messages"


def test_usage_counts_the_prompt_as_the_model_reads_it(chat_client, chat_engine):
    """``usage.prompt_tokens`` is the conversation as the model reads it without a passage: the
    template, the system message and earlier turns and the question, i.e. the tokens of
    ``apply_chat_template(messages, add_generation_prompt=True)`` (it counted the last user
    message alone, so a long history cost nothing); completions count it the same way (the
    kNN-LM server counts its whole prompt too)."""
    hf = chat_engine.lm.tokenizer.hf
    for messages in (user(QUESTION), HISTORY + user(QUESTION)):
        want = len(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        spec, naive = ask(chat_client, messages, speculate=True), ask(chat_client, messages, speculate=False)
        assert spec.usage.prompt_tokens == naive.usage.prompt_tokens == want
        assert spec.usage.total_tokens == want + spec.usage.completion_tokens
    completion = chat_client.completions.create(model=CHAT_MODEL, prompt=QUESTION, max_tokens=4)
    assert completion.usage.prompt_tokens == len(hf.apply_chat_template(
        user(QUESTION), tokenize=True, add_generation_prompt=True)["input_ids"])  # "auto": the chat format
