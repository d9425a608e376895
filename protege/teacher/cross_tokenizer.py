"""A teacher with its own tokenizer and chat template, seen through the student's completion positions.

    teacher = CrossTokenizerTeacher(inner, student_tokenizer, teacher_tokenizer, student_vocab_size=V_s)
    signal = teacher.score(rollouts, request)        # TeacherSignal on the student's positions

For every row of a student buffer:
1. the prompt is rendered for the teacher with the teacher's chat template from the row's messages
   (`Rollouts.examples`; a row without one: the student's prompt text as one user message);
2. the student's completion becomes text (its tokens' bytes, protege.teacher.align) and is
   re-tokenized by the teacher; a special token the student emitted maps to the teacher's token of
   the same class (the student's EOS / end-of-turn -> the token that ends the teacher's assistant turn,
   BOS -> BOS, others by content) or, when the teacher has none, is spelled out as text;
3. the inner teacher (LocalTeacher in this process or RemoteTeacher behind `protege serve-teacher`, both
   in the teacher's vocabulary) scores those ids: token logprobs, and its top-k when asked;
4. both tokenizations are aligned by bytes into spans (align.align) and the teacher's answer is put back
   on the student's positions (`CrossSignal`, `TeacherSignal.cross`).

`token_logprobs` of the returned signal spreads each span's teacher logprob log P_T(c) evenly over the
student tokens of c, so the per-row sum is the teacher's logprob of the whole completion and every
sequence-level diagnostic (teacher_nll, sampled reverse KL) keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from protege.data import Example, PromptTokenizer
from protege.records import Rollouts, TeacherSignal
from protege.teacher.align import SENTENCEPIECE, VocabBytes, align, lengths_from_offsets, repair_utf8, silent, text_lengths
from protege.teacher.base import Capabilities, ScoreRequest, Teacher, Wrapper


@dataclass
class CrossSignal:
    """The teacher's answer per aligned span, on the student's completion positions (all (N, T[, K])).

    span_index:     int64 span of each student token within its row (0, 1, ... in text order)
    first:          bool, the first student token of its span (where per-span values sit)
    valid:          bool, the token's span has teacher tokens (False only for a trailing remainder
                    the teacher could not match; such tokens get no loss)
    student_size:   int64 student tokens in the token's span;  teacher_size: teacher tokens in it
    span_logprobs:  float32 log P_T(c) = sum of the teacher's logprobs of the span's tokens (each token)
    rest_logprobs:  float32 sum of the teacher's logprobs of the span's 2nd.. tokens (GOLD's "observed"
                    merge), at `first` positions
    topk_logprobs:  (N, T, K) the teacher's top-K logprobs at the span's first teacher token, at `first`
                    positions (-inf elsewhere), or None
    topk_ids:       (N, T, K) those teacher ids mapped into the student's vocabulary (the student token
                    with the same bytes, space markers canonicalised), -1 where none, or None
    matched_share:  share of the teacher's vocabulary with a student token of the same bytes
    student_matched: (V_s,) bool, student ids some teacher id maps to (GOLD's hybrid), or None
    stats:          alignment diagnostics of the buffer (floats, for the step metrics)
    canonical:      (ScoreRequest.canonical) for each student row whose tokens are not its tokenizer's own
                    encoding of its text: that encoding's ids and the span of each; the spans of such a row close
                    only where the sampled path, the canonical path and the teacher all have a boundary
    span_baseline:  log q_old(c) of the canonical path of each token's span, filled by the trainer
                    (protege.cross_objective.fill_span_baseline); None: the sampled path's own logprobs
    topk_bytes, student_bytes: the first byte of each top-K teacher id and of each student id (256 EOS,
                    257 other specials: VocabBytes.first_bytes), for loss.cross_tokenizer=next_byte
    """

    span_index: torch.Tensor
    first: torch.Tensor
    valid: torch.Tensor
    student_size: torch.Tensor
    teacher_size: torch.Tensor
    span_logprobs: torch.Tensor
    rest_logprobs: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    matched_share: float = 0.0
    student_matched: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    canonical: dict = field(default_factory=dict)  # row -> (ids (Tc,), span of each (Tc,)): rows not canonical
    span_baseline: torch.Tensor | None = None  # (N, T) log q_old of the canonical path over each token's span
    topk_bytes: torch.Tensor | None = None  # (N, T, K) next-byte category of each teacher top-K id, -1 padding
    student_bytes: torch.Tensor | None = None  # (V_s,) next-byte category of each student id
    first_span_bytes: bool = True  # False: the student's decoder drops a leading space (no next-byte loss there)

    @property
    def one_to_one(self) -> torch.Tensor:
        """(N, T) bool: the token is a span of one token on both sides."""
        return self.valid & (self.student_size == 1) & (self.teacher_size == 1)

    def select(self, rows: list[int], t: int) -> "CrossSignal":
        idx = torch.as_tensor(rows, dtype=torch.long)
        cut = lambda x: None if x is None else x[idx][:, :t]  # noqa: E731
        return CrossSignal(cut(self.span_index), cut(self.first), cut(self.valid), cut(self.student_size),
                           cut(self.teacher_size), cut(self.span_logprobs), cut(self.rest_logprobs),
                           cut(self.topk_logprobs), cut(self.topk_ids), self.matched_share, self.student_matched,
                           self.stats, span_baseline=cut(self.span_baseline), topk_bytes=cut(self.topk_bytes),
                           student_bytes=self.student_bytes, first_span_bytes=self.first_span_bytes)


def end_of_turn_id(tokenizer, eos: list[int]) -> int | None:
    """The id that ends an assistant turn in `tokenizer`'s chat template (the first of `eos` after the
    assistant's text), else its EOS token."""
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                                 {"role": "assistant", "content": "protege"}], tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            after = tokenizer.decode(ids).rfind("protege")
            for i in range(len(ids)):
                if ids[i] in eos and len(tokenizer.decode(ids[: i + 1])) > after >= 0:
                    return ids[i]
        except Exception:  # a template that refuses this conversation: fall back to EOS
            pass
    return tokenizer.eos_token_id


def shared_vocab_map(teacher: VocabBytes, student: VocabBytes, *, teacher_eos: list[int],
                     student_eos: int | None) -> np.ndarray:
    """(V_t,) int64: for each teacher id the student id whose bytes are the same (ByteLevel 'Ġ' and
    SentencePiece '▁' both decode to a space byte, so they match), -1 where none. Specials map by class:
    the teacher's EOS / end-of-turn tokens to the student's EOS, others by content."""
    index = {}
    for sid in range(student.size):  # once per run: a dict over the student's vocabulary
        if not student.special[sid] and student.lengths[sid]:
            b = student.piece(sid)
            if b not in index or (len(b) == 1 and student.fallback[index[b]]):
                index[b] = sid  # prefer a regular token over a <0xNN> byte-fallback one
    out = np.full(teacher.size, -1, dtype=np.int64)
    for tid in range(teacher.size):
        if not teacher.special[tid] and teacher.lengths[tid]:
            out[tid] = index.get(teacher.piece(tid), -1)
    by_class = {student.special_class[int(s)]: int(s) for s in np.flatnonzero(student.special)}
    for tid in np.flatnonzero(teacher.special):
        if tid in teacher_eos and student_eos is not None:
            out[tid] = student_eos
        elif teacher.special_class[int(tid)] in by_class:  # same content (ids past both vocabularies: same id)
            out[tid] = by_class[teacher.special_class[int(tid)]]
    return out


class CrossTokenizerTeacher(Wrapper):
    """Teacher protocol over an inner teacher in another vocabulary (module docstring)."""

    vocab_size = None  # set per instance: the student's (the signal speaks of the student's positions and ids)

    def __init__(self, inner: Teacher, student_tokenizer, teacher_tokenizer, *, student_vocab_size: int,
                 student_eos_ids: list[int], teacher_eos_ids: list[int], max_prompt_tokens: int = 512):
        self.inner = inner
        self.s_tok, self.t_tok = student_tokenizer, teacher_tokenizer
        self.vocab_size = student_vocab_size  # the signal speaks of the student's positions and ids
        self.s_vocab = VocabBytes.from_tokenizer(student_tokenizer, eos_ids=student_eos_ids, size=student_vocab_size)
        self.t_vocab = VocabBytes.from_tokenizer(teacher_tokenizer, eos_ids=teacher_eos_ids,
                                                 size=inner.vocab_size)
        self.prompts = PromptTokenizer(teacher_tokenizer, max_prompt_tokens)
        self.t_eot = end_of_turn_id(teacher_tokenizer, teacher_eos_ids)
        s_eos = student_tokenizer.eos_token_id
        self.vocab_map = shared_vocab_map(self.t_vocab, self.s_vocab, teacher_eos=list(teacher_eos_ids),
                                          student_eos=s_eos)
        text_ids = ~self.t_vocab.special
        self.matched_share = float((self.vocab_map[text_ids] >= 0).mean()) if text_ids.any() else 0.0
        matched = np.zeros(student_vocab_size, dtype=bool)
        matched[self.vocab_map[self.vocab_map >= 0]] = True
        self.student_matched = torch.from_numpy(matched)  # (V_s,)
        t_by_class = {}
        for tid in np.flatnonzero(self.t_vocab.special):
            t_by_class.setdefault(self.t_vocab.special_class[int(tid)], int(tid))
        if self.t_eot is not None:
            t_by_class["eos"] = self.t_eot
        self.t_by_class = t_by_class  # pairing class -> the teacher's special id for it
        self.s_bytes, self.t_bytes = self.s_vocab.first_bytes(), self.t_vocab.first_bytes()  # next_byte loss

    # ------------------------------------------------------------------------- the teacher's view
    def teacher_prompt(self, rollouts: Rollouts, i: int) -> torch.Tensor:
        """Row i's prompt rendered with the teacher's template from its data row's messages."""
        ex = rollouts.examples[i] if rollouts.examples is not None else None
        if ex is None:
            text = self.s_tok.decode(rollouts.prompt_ids[i].tolist(), skip_special_tokens=True)
            ex = Example(messages=[{"role": "user", "content": text}])
        return self.prompts.prompt_ids(ex)

    def student_text(self, ids: np.ndarray) -> tuple[str, np.ndarray]:
        """(text, per-token byte lengths) of a run of the student's non-special tokens: their bytes, a
        leading space dropped where the student's decoder drops it, invalid UTF-8 as U+FFFD."""
        raw, lens = self.s_vocab.bytes_of(ids), self.s_vocab.lengths[ids].copy()
        decoded = self.s_tok.backend_tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        if decoded.encode("utf-8") == raw:
            return decoded, lens
        if raw[:1] == b" " and decoded.encode("utf-8") == raw[1:]:
            lens[int(np.flatnonzero(lens)[0])] -= 1
            return decoded, lens
        text, ends = repair_utf8(raw, np.cumsum(lens))
        return text, np.diff(np.concatenate([[0], ends]))

    @property
    def capabilities(self) -> Capabilities:
        """The inner teacher's, across tokenizers: no hidden states over the student's vocabulary, no samples the
        student can train on (they are in the teacher's vocabulary); the teacher's tokenizer in its identity."""
        inner = self.inner.capabilities
        return inner.but(cross_tokenizer=True, hidden=False, generates=False,
                         identity={**inner.identity, "tokenizer": str(getattr(self.t_tok, "name_or_path", ""))})

    def completion_plan(self, ids: np.ndarray) -> tuple[np.ndarray, list]:
        """The plan of one completion for the teacher: (student byte lengths, segments), segments being text
        (str) to encode or a teacher special id, in order. A student special the teacher has no token for is
        spelled out inside the text around it (a BOS the teacher lacks is left out: it joins the next span)."""
        s_len = np.zeros(len(ids), dtype=np.int64)
        specials = np.flatnonzero(self.s_vocab.special[ids])
        segments, text, start = [], "", 0
        for pos in [*specials.tolist(), len(ids)]:  # per special token, not per token
            if pos > start:
                part, lens = self.student_text(ids[start:pos])
                s_len[start:pos] = lens
                text += part
            if pos < len(ids):
                sid = int(ids[pos])
                cls = self.s_vocab.special_class[sid]
                tid = self.t_by_class.get(cls)
                if tid is not None:
                    segments += [text, tid] if text else [tid]
                    text = ""
                elif not silent(cls):
                    text += self.s_vocab.content[sid]
            start = pos + 1
        return s_len, segments + ([text] if text else [])

    def canonical_paths(self, rows: list[np.ndarray], sources: list[str]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """For each student row whose tokens are not the student tokenizer's own encoding of its text: that
        encoding's (ids, byte lengths), the row's specials kept in place; None for other rows.

        A sampling student can reach a text by a rarer path (`t`,`e`,`n`,`t` for `tent`); the teacher scores its
        own encoding of the text, so the span estimator compares like with like only against the student's
        canonical path (docs/cross_tokenizer.md, "Non-canonical samples")."""
        plans = []
        for ids, src in zip(rows, sources):
            segs = None
            if src == "student" and len(ids):
                segs, start = [], 0
                for pos in [*np.flatnonzero(self.s_vocab.special[ids]).tolist(), len(ids)]:  # per special token
                    if pos > start:
                        segs.append(self.student_text(ids[start:pos])[0])
                    if pos < len(ids):
                        segs.append(int(ids[pos]))
                    start = pos + 1
            plans.append(segs)
        encoded = iter(self.encode_segments([g for segs in plans if segs for g in segs if isinstance(g, str)],
                                            self.s_tok, self.s_vocab))
        out = []
        for ids, segs in zip(rows, plans):
            if segs is None:
                out.append(None)
                continue
            parts = [next(encoded) if isinstance(g, str) else (np.array([g]), np.zeros(1, np.int64)) for g in segs]
            c_ids, c_len = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            out.append(None if np.array_equal(c_ids, ids) else (c_ids, c_len))
        return out

    def encode_segments(self, texts: list[str], tok=None, vocab: VocabBytes | None = None) \
            -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, byte lengths) of each text by the teacher's tokenizer (or `tok` with its `vocab`), one batched
        encode."""
        tok, vocab = (tok, vocab) if tok is not None else (self.t_tok, self.t_vocab)
        encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for text, enc in zip(texts, encs):
            ids = np.asarray(enc.ids, dtype=np.int64)
            lens = text_lengths(vocab, ids, text)
            if lens is None:  # a lossy tokenizer (WordPiece normalisation): its offsets into the text
                lens = lengths_from_offsets(text, np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2))
            out.append((ids, lens))
        return out

    # ------------------------------------------------------------------------------- scoring
    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        if request.hidden or request.query_ids is not None:
            raise ValueError("a cross-tokenizer teacher sends token logprobs and its top-k only (its hidden states "
                             "and logprobs at student ids do not exist in the student's vocabulary): use "
                             "loss.cross_tokenizer=span|shared_topk|uld|hybrid")
        mask = rollouts.completion_mask.bool()
        rows = [rollouts.completion_ids[i, : int(mask[i].sum())].numpy().astype(np.int64) for i in range(len(rollouts))]
        plans = [self.completion_plan(ids) for ids in rows]
        texts = [seg for _, segs in plans for seg in segs if isinstance(seg, str)]
        encoded = iter(self.encode_segments(texts))
        canon = self.canonical_paths(rows, rollouts.sources)
        t_rows, alignments = [], []
        for ids, (s_len, segs), c in zip(rows, plans, canon):
            parts = [next(encoded) if isinstance(seg, str) else (np.array([seg]), np.zeros(1, np.int64))
                     for seg in segs]
            t_ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
            t_len = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
            t_rows.append(t_ids)
            c = c if request.canonical else None
            alignments.append(align(ids, t_ids, self.s_vocab, self.t_vocab, student_lengths=s_len,
                                    teacher_lengths=t_len, canonical_ids=None if c is None else c[0],
                                    canonical_lengths=None if c is None else c[1]))
        inner = self._inner_score(rollouts, t_rows, request)
        signal = self._on_student_positions(rollouts, rows, alignments, inner, request.topk)
        signal.cross.canonical = {i: (c[0], al.canonical_span) for i, (c, al) in enumerate(zip(canon, alignments))
                                  if c is not None and al.canonical_span is not None}
        # Share of student rows that are not their tokenizer's own encoding of their text: a rising value means
        # the student learns to spread its mass over tokenizations (docs/cross_tokenizer.md).
        student = [i for i, (ids, src) in enumerate(zip(rows, rollouts.sources)) if src == "student" and len(ids)]
        signal.cross.stats["cross/noncanonical_rows"] = \
            sum(canon[i] is not None for i in student) / len(student) if student else 0.0
        return signal

    def _inner_score(self, rollouts: Rollouts, t_rows: list[np.ndarray], request: ScoreRequest) -> TeacherSignal:
        t = max([len(r) for r in t_rows] + [1])
        ids = torch.zeros((len(t_rows), t), dtype=torch.long)  # (N, Tt)
        tmask = torch.zeros((len(t_rows), t), dtype=torch.bool)  # (N, Tt)
        for i, r in enumerate(t_rows):
            ids[i, : len(r)] = torch.from_numpy(r)
            tmask[i, : len(r)] = True
        view = Rollouts(prompt_ids=[self.teacher_prompt(rollouts, i) for i in range(len(rollouts))],
                        completion_ids=ids, completion_mask=tmask, sources=list(rollouts.sources),
                        examples=rollouts.examples)  # a privileged teacher inside renders its own view
        return self.inner.score(view, ScoreRequest(topk=request.topk, temperature=request.temperature,
                                                   entropy=request.entropy))

    def _on_student_positions(self, rollouts: Rollouts, rows, alignments, inner: TeacherSignal,
                              k: int) -> TeacherSignal:
        n, t = rollouts.completion_mask.shape
        z = lambda dtype, fill=0: torch.full((n, t), fill, dtype=dtype)  # noqa: E731
        span_index, first, valid = z(torch.long), z(torch.bool, False), z(torch.bool, False)
        s_size, t_size, span_lp, rest_lp, token_lp = z(torch.long), z(torch.long), z(torch.float32), \
            z(torch.float32), z(torch.float32)
        k = 0 if inner.topk_ids is None else k
        topk_lp = torch.full((n, t, k), float("-inf")) if k else None  # (N, T, K)
        topk_ids = torch.full((n, t, k), -1, dtype=torch.long) if k else None  # (N, T, K)
        topk_bytes = torch.full((n, t, k), -1, dtype=torch.long) if k else None  # (N, T, K)
        entropy = z(torch.float32) if inner.entropy is not None else None
        for i, (ids, al) in enumerate(zip(rows, alignments)):  # per row; within a row numpy only
            ts = len(ids)
            if ts == 0:
                continue
            tt = len(al.teacher_span)
            t_lp = inner.token_logprobs[i, :tt].double().numpy()
            per_span = np.bincount(al.teacher_span, weights=t_lp, minlength=al.num_spans)  # (S,)
            t_first = np.minimum(np.searchsorted(al.teacher_span, np.arange(al.num_spans)), max(tt - 1, 0))
            has_t = al.teacher_size > 0  # (S,)
            rest = per_span - (t_lp[t_first] if tt else 0.0)
            sp = al.student_span
            s_first = np.r_[True, sp[1:] != sp[:-1]]  # (Ts,)
            span_index[i, :ts] = torch.from_numpy(sp)
            first[i, :ts] = torch.from_numpy(s_first)
            valid[i, :ts] = torch.from_numpy(has_t[sp])
            s_size[i, :ts] = torch.from_numpy(al.student_size[sp])
            t_size[i, :ts] = torch.from_numpy(al.teacher_size[sp])
            span_lp[i, :ts] = torch.from_numpy(np.where(has_t, per_span, 0.0)[sp]).float()
            rest_lp[i, :ts] = torch.from_numpy(np.where(s_first & has_t[sp], rest[sp], 0.0)).float()
            token_lp[i, :ts] = torch.from_numpy(np.where(has_t, per_span, 0.0)[sp] / al.student_size[sp]).float()
            at = torch.from_numpy(np.flatnonzero(s_first & has_t[sp]))  # student positions of span starts
            src = torch.from_numpy(t_first[sp[at.numpy()]])  # the teacher's first token of those spans
            if k:
                topk_lp[i, at] = inner.topk_logprobs[i, src].float()
                topk_ids[i, at] = torch.from_numpy(self.vocab_map[inner.topk_ids[i, src].numpy()])
                topk_bytes[i, at] = torch.from_numpy(self.t_bytes[inner.topk_ids[i, src].numpy()])
            if entropy is not None:
                entropy[i, at] = inner.entropy[i, src].float()
        cross = CrossSignal(span_index, first, valid, s_size, t_size, span_lp, rest_lp, topk_lp, topk_ids,
                            self.matched_share, self.student_matched, topk_bytes=topk_bytes,
                            student_bytes=torch.from_numpy(self.s_bytes),
                            first_span_bytes=self.s_vocab.kind != SENTENCEPIECE)
        cross.stats = alignment_stats(cross, rollouts.completion_mask.bool(), self.matched_share)
        cross.stats.update(aligned_overlap(rollouts, cross))
        return TeacherSignal(token_logprobs=token_lp, entropy=entropy, cross=cross)


def alignment_stats(cross: CrossSignal, mask: torch.Tensor, matched_share: float) -> dict:
    """cross/one_to_one_share: completion tokens in 1:1 spans; cross/span_len_mean and _max: student tokens
    per span; cross/teacher_span_len_mean; cross/unaligned_share: tokens of no span; cross/vocab_matched."""
    m = mask & cross.first
    spans = max(1, int(m.sum()))
    return {"cross/one_to_one_share": float((cross.one_to_one & mask).sum()) / max(1, int(mask.sum())),
            "cross/span_len_mean": float(cross.student_size[m].sum()) / spans,
            "cross/span_len_max": int(cross.student_size[m].max()) if m.any() else 0,
            "cross/teacher_span_len_mean": float(cross.teacher_size[m].sum()) / spans,
            "cross/unaligned_share": float((mask & ~cross.valid).sum()) / max(1, int(mask.sum())),
            "cross/vocab_matched": matched_share}


def aligned_overlap(rollouts: Rollouts, cross: CrossSignal) -> dict:
    """The same-tokenizer top-k overlap signals (protege.diagnostics.overlap_metrics) at the 1:1 spans of
    student rows, the teacher's top-k mapped into the student's vocabulary ({} without both top-k lists)."""
    from protege.diagnostics import overlap_metrics

    if rollouts.student_topk_ids is None or rollouts.student_topk_logprobs is None or cross.topk_ids is None:
        return {}
    rows = torch.tensor([s == "student" for s in rollouts.sources], dtype=torch.bool)
    at = rollouts.completion_mask.bool() & cross.one_to_one & rows[:, None]  # (N, T)
    if not bool(at.any()):
        return {}
    k = min(rollouts.student_topk_ids.shape[-1], cross.topk_ids.shape[-1])
    return overlap_metrics(rollouts.student_topk_ids[..., :k], rollouts.student_topk_logprobs[..., :k],
                           cross.topk_ids[..., :k], cross.topk_logprobs[..., :k], at)
