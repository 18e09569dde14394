"""Tokenizers of other kinds than the shipped models' (tiny: WordPiece; SmolLM2: byte-level BPE),
built here from real text (nothing can be downloaded): a SentencePiece-style BPE with byte
fallback, as in Llama 2's, Mistral's and Gemma's ``tokenizer.json`` (``"\\u2581"`` for a space,
``<0x00>``..``<0xFF>`` for any character outside the vocabulary), with their chat templates; and
a Llama-3-style byte-level BPE with added special tokens and Llama 3's template (``| trim``)."""

from __future__ import annotations

import functools
import json

from ralmspec.lm.hf import HFTokenizer
from ralmspec.data.loaders import default_corpus

# rare characters, so that the vocabulary learns some of them and spells the rest in bytes
NON_ASCII = ["Le café est très célèbre à Paris, où l'été est chaud. Naïve façade, élève.",
             "日本の首都は東京です。日本語を話します。", "Emoji 🎉🚀 and smile 😀 with café crème 🍰."]


@functools.lru_cache(maxsize=None)
def byte_fallback_tokenizer() -> HFTokenizer:
    """A Llama-2-style tokenizer (normalizer: prepend "\\u2581", spaces as "\\u2581"; BPE with byte
    fallback; decoder: "\\u2581" -> " ", byte fallback, fuse, strip one leading space), 2,000
    tokens learnt from 1,500 of the embedded WikiText passages; no chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.text for p in list(default_corpus())[:1500]]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")  # for training only
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  limit_alphabet=90, show_progress=False)
    tok.train_from_iterator(texts + NON_ASCII * 3, trainer)
    tok.pre_tokenizer = None
    spec = json.loads(tok.to_str())  # byte tokens are plain vocabulary in the real files, not added tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    return HFTokenizer(fast)


# chat templates of the families, cut to what matters here (the official ones, less their dates/tools)
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct's (Llama 2's layout): spaces around [INST], system folded in
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}")
GEMMA_TEMPLATE = (  # Gemma's: turns in <start_of_turn> / <end_of_turn>, each message trimmed
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
LLAMA3_TEMPLATE = (  # Llama 3's: headers and <|eot_id|>, each message trimmed
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]


def sentencepiece_chat_tokenizer(template: str = MISTRAL_TEMPLATE, metaspace: bool = False) -> HFTokenizer:
    """``byte_fallback_tokenizer`` with ``template`` as its chat template; ``metaspace``: the
    space written before a text by a Metaspace pre-tokenizer (``prepend_scheme="first"``, as in
    newer Llama / Gemma files) instead of the Prepend normalizer. Gemma's own special tokens
    (<start_of_turn>) are added as such when the template names them."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(byte_fallback_tokenizer().hf.backend_tokenizer.to_str())
    if metaspace:
        spec["normalizer"] = None
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                 "split": False}
    backend = Tokenizer.from_str(json.dumps(spec))
    if "<start_of_turn>" in template:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in ("<start_of_turn>", "<end_of_turn>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = template
    return HFTokenizer(fast)


@functools.lru_cache(maxsize=None)
def llama3_tokenizer() -> HFTokenizer:
    """A Llama-3-style tokenizer: byte-level BPE (GPT-2's pre-tokenizer) of 1,000 tokens learnt from
    500 embedded passages, Llama 3's special tokens added as special, and Llama 3's template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([p.text for p in list(default_corpus())[:500]], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return HFTokenizer(fast)
