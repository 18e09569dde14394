"""Tokenizers of other kinds than the shipped models' (tiny: WordPiece; SmolLM2: byte-level BPE),
built here from real text (nothing can be downloaded): a SentencePiece-style BPE with byte
fallback, as in Llama 2's, Mistral's and Gemma's ``tokenizer.json`` (``"\\u2581"`` for a space,
``<0x00>``..``<0xFF>`` for any character outside the vocabulary)."""

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
    tokens learnt from 1,500 of the embedded WikiText passages, with a chat template."""
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
