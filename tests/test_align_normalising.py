"""Cross-tokenizer alignment against teachers whose normaliser changes the text (issue 32, item 7):
NFKC WordPiece (ligatures, combining marks), a Unigram without byte fallback that adds a prefix
space (`<unk>` for what it cannot spell). Tokenizers built here with the `tokenizers` library; the
student is a ByteLevel BPE (exact). Every span's student bytes, run through the teacher's own
normaliser, must be the text of the span's teacher tokens (an `<unk>` stands for any non-empty text)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from cross_tokenizers import HARD_TEXTS, bpe
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from protege.prompts import load_builtin_prompts
from protege.teacher.align import VocabBytes, align, lengths_from_offsets, text_lengths

NORMALISED_TEXTS = [
    "the ﬁne print, ﬃ and ﬂow",  # ligatures: one char, several teacher tokens
    "cafe\u0301 and re\u0301sume\u0301 e\u0301",  # combining accents NFKC folds into the char before
    "\nline one\n\nline two\tend",  # a prefix space in front of a newline the Unigram cannot spell
    "² ½ Ⅻ ｆｕｌｌ ｗｉｄｔｈ ㎏",  # compatibility forms NFKC expands
    "😀 日本語 ﬁ",
] + HARD_TEXTS
UNK = {"[UNK]", "<unk>"}


def nfkc_wordpiece() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    t.train_from_iterator(load_builtin_prompts("train"), trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[SEP]")


def unigram_no_fallback() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.NFKC()
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    t.train_from_iterator(load_builtin_prompts("train"), trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers_():
    out = {"student": bpe(), "nfkc_wordpiece": nfkc_wordpiece(), "unigram_no_fallback": unigram_no_fallback()}
    return {k: (t, VocabBytes.from_tokenizer(t, eos_ids=[t.eos_token_id])) for k, t in out.items()}


def _encode(tok, vocab, text):
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    lens = text_lengths(vocab, ids, text)
    return enc, ids, (lens if lens is not None else lengths_from_offsets(text, np.asarray(enc.offsets).reshape(-1, 2)))


def _piece_text(piece: str) -> str:
    return piece.removeprefix("##").replace("▁", " ")


def _matches(normalised: str, pieces: list[str]) -> bool:
    """`normalised` (whitespace removed: the pre-tokenizers drop it) is the pieces' text in order, an
    unknown-token piece standing for any non-empty run."""
    pattern = "".join("(?s:.+?)" if p in UNK else re.escape(re.sub(r"\s", "", _piece_text(p))) for p in pieces)
    return re.fullmatch(pattern, re.sub(r"\s", "", normalised)) is not None


@pytest.mark.parametrize("teacher", ["nfkc_wordpiece", "unigram_no_fallback"])
def test_every_span_holds_the_teachers_normalised_text(tokenizers_, teacher):
    (s_tok, s_vocab), (t_tok, t_vocab) = tokenizers_["student"], tokenizers_[teacher]
    normalise = t_tok.backend_tokenizer.normalizer.normalize_str
    used_offsets = 0
    for text in NORMALISED_TEXTS:
        data = text.encode("utf-8")
        _, s_ids, s_len = _encode(s_tok, s_vocab, text)
        enc, t_ids, t_len = _encode(t_tok, t_vocab, text)
        used_offsets += text_lengths(t_vocab, t_ids, text) is None
        assert s_len.sum() == t_len.sum() == len(data) and (t_len >= 0).all(), (teacher, text)
        al = align(s_ids, t_ids, s_vocab, t_vocab, student_lengths=s_len, teacher_lengths=t_len)
        s_cut, t_cut = np.r_[0, np.cumsum(s_len)], np.r_[0, np.cumsum(t_len)]
        for span in range(al.num_spans):
            ss, ts = np.flatnonzero(al.student_span == span), np.flatnonzero(al.teacher_span == span)
            student_bytes = data[s_cut[ss[0]]:s_cut[ss[-1] + 1]]
            assert student_bytes == data[t_cut[ts[0]]:t_cut[ts[-1] + 1]], (teacher, text, span)
            pieces = [enc.tokens[j] for j in ts]
            assert _matches(normalise(student_bytes.decode("utf-8")), pieces), \
                (teacher, text, student_bytes.decode("utf-8"), pieces)
    assert used_offsets >= 3  # the offsets path (not the table's bytes) was what got tested


def test_the_three_cases_of_the_issue_by_hand():
    """Offsets as the tokenizers give them, lengths worked out by hand: NFKC "ﬁne" -> f (0, 1),
    ##in (0, 2), ##e (2, 3): `f` shares the span of `##in` (lengths 4, 0, 1: "ﬁn" + "e", was 3, 1, 1);
    "e\\u0301 x" -> é (0, 1), x (3, 4): the accent's 2 bytes stay with é (3, 2; was 1, 4); a prefix
    '▁' (0, 1) and the <unk> of "\\n" (0, 1): one span, the "\\n" (1, 0, 2; the ▁ alone before)."""
    assert lengths_from_offsets("ﬁne", np.array([[0, 1], [0, 2], [2, 3]])).tolist() == [4, 0, 1]
    assert lengths_from_offsets("e\u0301 x", np.array([[0, 1], [3, 4]])).tolist() == [3, 2]
    assert lengths_from_offsets("\nab", np.array([[0, 1], [0, 1], [1, 3]])).tolist() == [1, 0, 2]
    assert lengths_from_offsets("  ab  cd ", np.array([[2, 4], [6, 8]])).tolist() == [4, 5]  # spaces: the next
