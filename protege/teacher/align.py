"""Byte alignment of two tokenizations of the same text: the smallest spans whose boundaries coincide.

Cross-tokenizer distillation compares a student and a teacher that cut the same completion text into
different tokens. Every token owns a run of the text's UTF-8 bytes; a *span* is a smallest run of
tokens on each side that covers the same bytes, i.e. spans close exactly at the byte offsets where
both tokenizations have a boundary:

    boundaries B = {cumsum(student byte lengths)} ∩ {cumsum(teacher byte lengths)}
    span of a token = searchsorted(B, its end offset)        (sorted intersection + np.searchsorted)

Byte lengths come from each token's own bytes (a per-vocabulary table built once, `VocabBytes`), not
from character offsets of a normalised string:
  ByteLevel BPE   each char of the piece is one byte through GPT-2's byte-to-unicode alphabet (Ġ = ' ')
  SentencePiece   '▁' is a space, '<0xNN>' byte-fallback pieces are one byte each; a leading '▁' that
                  the tokenizer added in front of the text (prefix space) is not a byte of the text
  WordPiece       a '##' piece continues a word; a word-initial piece owns a space before it.
  normalising     (WordPiece, or any tokenizer whose normaliser changes the text: lowercasing, accent
                  stripping, NFKC ligatures and combining marks, dropped whitespace, `<unk>`): when the
                  table's bytes do not reproduce the text, the tokenizer's own offsets into the
                  *original* text are used (`lengths_from_offsets`): a token whose offsets overlap the
                  next one's shares the next token's span; uncovered whitespace belongs to the token
                  after it, other uncovered bytes (a combining accent) to the token before them; so the
                  tokens still tile the text, every span's bytes are equal on both sides, and a span's
                  original text normalises to its teacher tokens' text
  other           the piece's UTF-8 bytes (WordLevel / character tokenizers)

Special tokens own no text bytes. They are paired explicitly, in order, by class: the EOS / end-of-turn
tokens of each side pair with each other ("eos"), BOS with BOS, any other special with the special of
the same content. A paired special is a span of its own on both sides (a virtual byte in the boundary
key). An unpaired special never disappears and never shifts the text: a BOS joins the span after it;
any other is taken as text (its content bytes), which is what the other side
holds when it had to spell the token out (an EOS that one tokenizer splits into pieces).
Invalid UTF-8 (a truncated multi-byte character) is decoded with U+FFFD as Python does, and token ends
inside the replaced bytes move to the end of the replacement (see `repair_utf8`).

Only per-row and per-special Python work remains; per-token work is numpy (gathers, cumsums, set
intersections).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, PLAIN = "byte_level", "sentencepiece", "wordpiece", "plain"
def silent(special_class: str) -> bool:
    """Special classes never spelled out as text when unpaired: BOS, and ids past the tokenizer's vocabulary."""
    return special_class == "bos" or special_class.startswith("unused:")
_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass(frozen=True)
class VocabBytes:
    """The bytes of every token id of one tokenizer (built once per run).

    flat (S,) uint8 all pieces' bytes concatenated; starts (V,) and lengths (V,) int64 locate id v's
    bytes in flat; special (V,) bool: owns no text bytes; special_class: id -> pairing class ("eos",
    "bos", or the token's content); content: id -> the special's text (spelled out when unpaired)."""

    kind: str
    flat: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    special: np.ndarray
    special_class: dict
    content: dict
    fallback: np.ndarray  # (V,) bool: a SentencePiece <0xNN> byte-fallback piece

    @property
    def size(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_tokenizer(cls, tokenizer, *, eos_ids=(), size: int | None = None) -> "VocabBytes":
        """From an HF fast tokenizer; eos_ids: its EOS / end-of-turn ids (class "eos"); size: pad the
        table to this many ids (a model whose embedding is larger than the tokenizer; extra ids are
        specials that own no bytes)."""
        backend = tokenizer.backend_tokenizer
        kind, prefix = tokenizer_kind(backend)
        n = max(size or 0, len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
        added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
        special_ids = ({i for i, t in added.items() if t.special} | set(tokenizer.all_special_ids)) - {
            tokenizer.unk_token_id}  # UNK stands for text: its bytes come from the tokenizer's offsets
        pieces, special, fallback = [], np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        cls_of, content = {}, {}
        bos, eos = tokenizer.bos_token_id, set(eos_ids)
        for i in range(n):
            piece = backend.id_to_token(i)
            if i == tokenizer.unk_token_id:
                pieces.append(b"")
                continue
            if piece is None or i in special_ids:
                special[i] = True
                pieces.append(b"")
                content[i] = piece if piece is not None else ""
                cls_of[i] = "eos" if i in eos else "bos" if i == bos else f"unused:{i}" if piece is None else piece
                continue
            pieces.append(piece_bytes(piece, kind, prefix, i in added))
            fallback[i] = kind == SENTENCEPIECE and _HEX_BYTE.fullmatch(piece) is not None
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=n)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        return cls(kind, flat, starts, lengths, special, cls_of, content, fallback)

    def bytes_of(self, ids: np.ndarray) -> bytes:
        """The concatenated bytes of `ids` (specials contribute nothing): one vectorised gather."""
        lens = self.lengths[ids]
        total = int(lens.sum())
        if total == 0:
            return b""
        out_starts = np.cumsum(lens) - lens  # where each token's bytes go in the output
        index = np.repeat(self.starts[ids] - out_starts, lens) + np.arange(total)
        return self.flat[index].tobytes()

    def first_bytes(self) -> np.ndarray:
        """(V,) int64 category of each id for the next-byte loss: the first byte of its text (0..255), 256 for
        an EOS / end-of-turn special, 257 for any other special and for tokens without text."""
        out = np.full(self.size, 257, dtype=np.int64)
        text = ~self.special & (self.lengths > 0)
        out[text] = self.flat[self.starts[text]]
        out[[int(v) for v in np.flatnonzero(self.special) if self.special_class[int(v)] == "eos"]] = 256
        return out

    def piece(self, token_id: int) -> bytes:
        s = int(self.starts[token_id])
        return self.flat[s: s + int(self.lengths[token_id])].tobytes()


def tokenizer_kind(backend) -> tuple[str, str]:
    """(kind, WordPiece continuation prefix) of a `tokenizers.Tokenizer`."""
    spec = json.loads(backend.to_str())
    model = spec.get("model", {}) or {}
    text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder")})
    if "ByteLevel" in text:
        return BYTE_LEVEL, ""
    if model.get("type") == "WordPiece":
        return WORDPIECE, model.get("continuing_subword_prefix") or "##"
    if "Metaspace" in text or "\\u2581" in text or "▁" in text or model.get("byte_fallback"):
        return SENTENCEPIECE, ""
    return PLAIN, ""


def piece_bytes(piece: str, kind: str, prefix: str = "", added: bool = False) -> bytes:
    """The text bytes one (non-special) token piece stands for, by tokenizer kind (module docstring)."""
    if added:  # a non-special added token is matched on the raw text: its content is its bytes
        return piece.encode("utf-8")
    if kind == BYTE_LEVEL:
        if all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return piece.encode("utf-8")
    if kind == SENTENCEPIECE:
        m = _HEX_BYTE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
    if kind == WORDPIECE:
        return piece[len(prefix):].encode("utf-8") if piece.startswith(prefix) else (" " + piece).encode("utf-8")
    return piece.encode("utf-8")


# ------------------------------------------------------------------------------ text <-> lengths
def repair_utf8(raw: bytes, ends: np.ndarray) -> tuple[str, np.ndarray]:
    """(text, ends in text bytes): raw decoded as Python's errors="replace" does (each invalid run ->
    U+FFFD, 3 bytes); token end offsets move with it, an end inside a replaced run to the run's end."""
    runs, pos = [], 0
    while True:
        try:
            raw[pos:].decode("utf-8")
            break
        except UnicodeDecodeError as e:
            runs.append((pos + e.start, pos + e.end))
            pos += e.end
    text = raw.decode("utf-8", errors="replace")
    if not runs:
        return text, ends
    old = ends.copy()
    out = ends.copy()
    shift = 0
    for s, e in runs:  # few: one per invalid run, not per token
        inside = (old > s) & (old < e)
        out[inside] = e + shift + (3 - (e - s))
        after = old >= e
        out[after] += 3 - (e - s)
        shift += 3 - (e - s)
    return text, out


def char_to_byte_offsets(text: str, offsets: np.ndarray) -> np.ndarray:
    """Character offsets into `text` -> UTF-8 byte offsets (vectorised over the characters)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    table = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    return table[np.clip(offsets, 0, len(cps))]


_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[list(b" \t\n\r\x0b\x0c")] = True


def lengths_from_offsets(text: str, char_offsets: np.ndarray) -> np.ndarray:
    """Byte lengths that tile `text` from a tokenizer's (n, 2) char offsets into the original text.

    A normalising tokenizer's offsets can overlap, leave bytes uncovered, or cover none:
      overlap   token i ends after token i+1 starts (NFKC "ﬁ" -> `f` (0, 1) and `##in` (0, 2); a
                prefix '▁' and the `<unk>` after it on the same char): token i gets no bytes of its
                own, it shares the next token's span (its end is the next one's end, the next token
                then owns 0 bytes and the same boundary key);
      gap       bytes between token i's end and token i+1's start: the run of non-whitespace bytes
                at the gap's start goes to token i (a combining accent NFKC folded into the char
                before it, an ignored control character), the rest, from the gap's first ASCII
                whitespace byte, to token i+1 (dropped spaces before a word); bytes before the
                first token go to the first, after the last to the last.
    Every token's end E_i is thus monotone and E_{n-1} = len(bytes): the lengths diff(E) tile the text.
    """
    n = len(char_offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    starts = char_to_byte_offsets(text, char_offsets[:, 0])  # (n,)
    ends = np.maximum.accumulate(char_to_byte_offsets(text, char_offsets[:, 1]))  # (n,)
    is_space = np.r_[_ASCII_SPACE[data], True]  # (B + 1,): a sentinel at the end
    next_space = np.minimum.accumulate(np.where(is_space, np.arange(len(is_space)), len(is_space))[::-1])[::-1]
    gap_end = np.maximum(starts[1:], ends[:-1])  # (n - 1,) where token i+1's own bytes begin
    split = np.minimum(next_space[np.minimum(ends[:-1], len(data))], gap_end)  # end of token i's non-space tail
    overlap = ends[:-1] > starts[1:]  # (n - 1,)
    out = np.r_[np.where(overlap, ends[:-1], split), len(data)].astype(np.int64)  # (n,)
    if overlap.any():  # an overlapping token ends where the first non-overlapping token after it ends
        own = np.r_[~overlap, True]
        first_own = np.minimum.accumulate(np.where(own, np.arange(n), n)[::-1])[::-1]
        out = out[first_own]
    out = np.maximum.accumulate(np.minimum(out, len(data)))
    return np.diff(np.r_[0, out])


def text_lengths(vocab: VocabBytes, ids: np.ndarray, text: str) -> np.ndarray | None:
    """Per-token byte lengths of `ids` that tile `text`, from the table; None when the table's bytes do
    not spell the text (a lossy tokenizer: use the tokenizer's offsets). A prefix space the tokenizer
    added in front of the text (SentencePiece) is taken off the first token."""
    lens = vocab.lengths[ids].copy()
    raw, want = vocab.bytes_of(ids), text.encode("utf-8")
    if raw == want:
        return lens
    if raw[:1] == b" " and raw[1:] == want:
        first = int(np.flatnonzero(lens)[0])
        lens[first] -= 1
        return lens
    return None


# ---------------------------------------------------------------------------------- alignment
@dataclass
class Alignment:
    """Spans of one row. student_span (Ts,), teacher_span (Tt,) int64: the span of each token (spans are
    numbered in text order, 0..num_spans-1); student_size / teacher_size (num_spans,): tokens per span
    on each side (0 on one side only for a trailing remainder when the texts differ)."""

    student_span: np.ndarray
    teacher_span: np.ndarray
    num_spans: int
    student_size: np.ndarray
    teacher_size: np.ndarray
    canonical_span: np.ndarray | None = None  # (Tc,) the span of each token of the student's canonical path

    @property
    def one_to_one(self) -> np.ndarray:
        """(num_spans,) bool: spans of one token on each side."""
        return (self.student_size == 1) & (self.teacher_size == 1)


def pair_specials(student_classes: list, teacher_classes: list) -> list[tuple[int, int]]:
    """Pairs (i, j) of specials (indices into the two lists of classes) matched in order by class: the
    longest common subsequence, so an unmatched one on either side does not stop the others pairing."""
    n, m = len(student_classes), len(teacher_classes)
    if n == 0 or m == 0:
        return []
    best = np.zeros((n + 1, m + 1), dtype=np.int64)  # specials are few per row: a tiny table
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best[i, j] = best[i + 1, j + 1] + 1 if student_classes[i] == teacher_classes[j] else \
                max(best[i + 1, j], best[i, j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if student_classes[i] == teacher_classes[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i + 1, j] >= best[i, j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def boundary_keys(lengths: np.ndarray, special_pos: np.ndarray, paired: np.ndarray, scale: int) -> np.ndarray:
    """(n,) int64 key of each token's end: text_end * scale + paired specials up to it (inclusive).
    Paired specials thus end at a coordinate of their own, the same on both sides."""
    counter = np.zeros(len(lengths), dtype=np.int64)
    counter[special_pos[paired]] = 1
    return np.cumsum(lengths) * scale + np.cumsum(counter)


def align(student_ids, teacher_ids, student_vocab: VocabBytes, teacher_vocab: VocabBytes, *,
          student_lengths: np.ndarray | None = None, teacher_lengths: np.ndarray | None = None,
          canonical_ids=None, canonical_lengths: np.ndarray | None = None) -> Alignment:
    """Spans of two tokenizations of the same text (module docstring).

    student_ids (Ts,), teacher_ids (Tt,): token ids, specials included. *_lengths: each token's text
    bytes when the caller knows them better than the table (a prefix space, a lossy tokenizer); the
    table's lengths otherwise. Specials own 0 bytes whatever is passed.
    canonical_ids (Tc,) (+ canonical_lengths): a third tokenization in the student's vocabulary (its
    tokenizer's own encoding of the text, with the same specials in the same order as student_ids); spans
    then close only where all three have a boundary, and `canonical_span` gives its tokens' spans."""
    s_ids, t_ids = np.asarray(student_ids, dtype=np.int64), np.asarray(teacher_ids, dtype=np.int64)
    s_len = student_vocab.lengths[s_ids].copy() if student_lengths is None else np.asarray(student_lengths).copy()
    t_len = teacher_vocab.lengths[t_ids].copy() if teacher_lengths is None else np.asarray(teacher_lengths).copy()
    s_sp, t_sp = np.flatnonzero(student_vocab.special[s_ids]), np.flatnonzero(teacher_vocab.special[t_ids])
    s_len[s_sp], t_len[t_sp] = 0, 0
    pairs = pair_specials([student_vocab.special_class[int(s_ids[p])] for p in s_sp],
                          [teacher_vocab.special_class[int(t_ids[p])] for p in t_sp])
    s_paired, t_paired = np.zeros(len(s_sp), dtype=bool), np.zeros(len(t_sp), dtype=bool)
    for i, j in pairs:
        s_paired[i], t_paired[j] = True, True
    _spell_unpaired(s_len, s_ids, s_sp, s_paired, student_vocab)
    _spell_unpaired(t_len, t_ids, t_sp, t_paired, teacher_vocab)
    scale = len(pairs) + 1
    s_key = boundary_keys(s_len, s_sp, s_paired, scale)
    t_key = boundary_keys(t_len, t_sp, t_paired, scale)
    common = sorted_intersection(s_key, t_key)
    c_key = None
    if canonical_ids is not None:  # the student's canonical path shares the sampled path's specials and pairing
        c_ids = np.asarray(canonical_ids, dtype=np.int64)
        c_len = student_vocab.lengths[c_ids].copy() if canonical_lengths is None else np.asarray(canonical_lengths).copy()
        c_sp = np.flatnonzero(student_vocab.special[c_ids])
        if not np.array_equal(c_ids[c_sp], s_ids[s_sp]):
            raise ValueError("align: canonical_ids must hold the same special tokens, in order, as student_ids")
        c_len[c_sp] = 0
        _spell_unpaired(c_len, c_ids, c_sp, s_paired, student_vocab)
        c_key = boundary_keys(c_len, c_sp, s_paired, scale)
        common = sorted_intersection(common, c_key)
    s_span = np.searchsorted(common, s_key, side="left")
    t_span = np.searchsorted(common, t_key, side="left")
    c_span = None if c_key is None else np.searchsorted(common, c_key, side="left")
    spans = [s_span, t_span] + ([] if c_span is None else [c_span])
    num = len(common) + int(any(bool((x == len(common)).any()) for x in spans))
    return Alignment(s_span, t_span, num, np.bincount(s_span, minlength=num), np.bincount(t_span, minlength=num),
                     c_span)


def sorted_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.intersect1d for two non-decreasing int arrays, by binary search instead of hashing."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.minimum(np.searchsorted(b, a), len(b) - 1)
    hit = a[b[pos] == a]
    return hit[np.r_[True, hit[1:] != hit[:-1]]] if len(hit) else hit


def _spell_unpaired(lengths: np.ndarray, ids: np.ndarray, specials: np.ndarray, paired: np.ndarray,
                    vocab: VocabBytes) -> None:
    """Unpaired specials: a BOS, or an id past the tokenizer's vocabulary (`silent`), keeps 0 bytes and
    joins the next span; any other owns its content's bytes (the other side spelled it out as text)."""
    for pos in specials[~paired]:  # rare: unpaired specials only
        token = int(ids[pos])
        if not silent(vocab.special_class[token]):
            lengths[pos] = len(vocab.content[token].encode("utf-8"))
