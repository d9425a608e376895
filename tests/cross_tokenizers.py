"""Tokenizers of three kinds trained in the tests on the built-in prompts (no network), and hard text."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from protege.prompts import load_builtin_prompts

HARD_TEXTS = [
    "  Héllo,  wörld! 日本語テキスト 🙂🎉 12345 678\n\nnew line\ttab  ",
    "café ñ 中文 😀 naïve résumé",
    " leading space, then   three",
    "x",
    "3+4=7|12+30=42\n\n\n",
    "emoji 👩‍👩‍👧 and ZWJ, Ω≈ç√",
]


def bpe(vocab: int = 400, eos: str = "</s>") -> PreTrainedTokenizerFast:
    """A ByteLevel BPE (GPT-2 / SmolLM2 style)."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(load_builtin_prompts("train"), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token=eos)


def unigram(vocab: int = 300) -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram with byte fallback (<0xNN> pieces) and a '▁' prefix space."""
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(load_builtin_prompts("train"), trainers.UnigramTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    pieces = [(p, s) for p, s in json.loads(t.to_str())["model"]["vocab"]]
    t.model = models.Unigram(pieces + [(f"<0x{b:02X}>", -20.0) for b in range(256)], unk_id=0, byte_fallback=True)
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def wordpiece(vocab: int = 300) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece (lowercasing, accent-stripping normaliser: it loses bytes)."""
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    t.train_from_iterator(load_builtin_prompts("train"), trainers.WordPieceTrainer(
        vocab_size=vocab, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[SEP]")
