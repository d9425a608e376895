"""Speed of the byte alignment (protege.teacher.align) against GOLD's (trl 1.16) on a buffer of text.

    nice -n 5 python bench/bench_align.py          # writes bench/results/align.md (~1 min)

Two ByteLevel BPEs (vocabularies 2000 and 500, trained here on the built-in prompts) cut the same
buffer (64 rows of ~600 bytes of the built-in prompts): protege's `align` (table gather + cumsum +
np.intersect1d per row) vs GOLD's `encode_with_byte_offsets` + `ULDLoss._align_by_byte_offsets` (char
offsets, then a Python walk per token). Both start from the same token ids / the same texts; the
spans are checked equal. Also: protege on a ByteLevel / SentencePiece (byte fallback) pair, which
GOLD refuses. Median of 5 repeats, 1 thread.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tokenizers():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from protege.prompts import load_builtin_prompts

    texts = load_builtin_prompts("train")
    out = []
    for vocab in (2000, 500):
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
        out.append(PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>"))
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=1000, special_tokens=["<unk>", "</s>"],
                                                         unk_token="<unk>", show_progress=False))
    pieces = [(p, s) for p, s in json.loads(t.to_str())["model"]["vocab"]]
    t.model = models.Unigram(pieces + [(f"<0x{b:02X}>", -20.0) for b in range(256)], unk_id=0, byte_fallback=True)
    out.append(PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>"))
    return out, texts


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import numpy as np
    import torch
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets

    from protege.teacher.align import VocabBytes, align, lengths_from_offsets, text_lengths

    torch.set_num_threads(1)
    (a, b, sp), texts = tokenizers()
    rows, cur = [], ""
    for x in texts * 4:
        cur += x + "\n"
        if len(cur.encode()) > 600:
            rows.append(cur)
            cur = ""
        if len(rows) == 64:
            break
    t0 = time.perf_counter()
    va, vb, vs = (VocabBytes.from_tokenizer(t, eos_ids=[t.eos_token_id]) for t in (a, b, sp))
    table_s = time.perf_counter() - t0

    def ours(tb, vt, encoded=None):
        encs_a, encs_b = encoded or (a.backend_tokenizer.encode_batch(rows, add_special_tokens=False),
                                     tb.backend_tokenizer.encode_batch(rows, add_special_tokens=False))
        out = []
        for text, ea, eb in zip(rows, encs_a, encs_b):
            ia, ib = np.asarray(ea.ids), np.asarray(eb.ids)
            lb = text_lengths(vt, ib, text)
            lb = lb if lb is not None else lengths_from_offsets(text, np.asarray(eb.offsets))
            out.append(align(ia, ib, va, vt, student_lengths=text_lengths(va, ia, text), teacher_lengths=lb))
        return out

    def gold():
        oa = encode_with_byte_offsets(a.backend_tokenizer, rows)
        ob = encode_with_byte_offsets(b.backend_tokenizer, rows)
        return [ULDLoss._align_by_byte_offsets(x[1], y[1]) for x, y in zip(oa, ob)]

    spans = ours(b, vb)
    for al, (ga, gb) in zip(spans, gold()):
        assert [np.flatnonzero(al.student_span == s).tolist() for s in range(al.num_spans)] == ga
    tokens = sum(len(al.student_span) + len(al.teacher_span) for al in spans)
    t_ours, t_gold, t_sp = timed(lambda: ours(b, vb)), timed(gold), timed(lambda: ours(sp, vs))
    encoded = (a.backend_tokenizer.encode_batch(rows, add_special_tokens=False),
               b.backend_tokenizer.encode_batch(rows, add_special_tokens=False))
    offsets = (encode_with_byte_offsets(a.backend_tokenizer, rows), encode_with_byte_offsets(b.backend_tokenizer, rows))
    t_ours_align = timed(lambda: ours(b, vb, encoded))
    t_gold_walk = timed(lambda: [ULDLoss._align_by_byte_offsets(x[1], y[1]) for x, y in zip(*offsets)])
    lines = ["# Byte alignment speed: protege vs GOLD (trl 1.16)", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {platform.platform()}, {os.cpu_count()} cores (shared with other jobs), 1 thread",
             "- command: `nice -n 5 python bench/bench_align.py`",
             f"- buffer: {len(rows)} rows, {sum(len(r.encode()) for r in rows)} bytes of the built-in prompts; "
             f"{tokens} tokens on the two sides of the ByteLevel pair (vocabularies 2000 and 500)",
             f"- per-vocabulary byte tables, built once per run: {table_s * 1000:.0f} ms for the three tokenizers",
             "- both encode the texts (batched) and align every row; the spans are checked equal to GOLD's", "",
             "| pair | what | median s per buffer | tokens/s |", "|---|---|---:|---:|",
             f"| ByteLevel / ByteLevel | protege `align` | {t_ours:.4f} | {tokens / t_ours:.0f} |",
             f"| ByteLevel / ByteLevel | GOLD `encode_with_byte_offsets` + `_align_by_byte_offsets` | {t_gold:.4f} | "
             f"{tokens / t_gold:.0f} |",
             f"| ByteLevel / SentencePiece (byte fallback) | protege `align` (GOLD refuses this pair) | {t_sp:.4f} | "
             "- |",
             f"| ByteLevel / ByteLevel | protege, given the encodings: byte lengths + spans | {t_ours_align:.4f} | "
             f"{tokens / t_ours_align:.0f} |",
             f"| ByteLevel / ByteLevel | GOLD, given the byte offsets: `_align_by_byte_offsets` | {t_gold_walk:.4f} | "
             f"{tokens / t_gold_walk:.0f} |",
             "", f"protege / GOLD time, whole: {t_ours / t_gold:.2f}; alignment step alone: "
             f"{t_ours_align / t_gold_walk:.2f}. The machine was shared with other jobs: absolute times are noisy."]
    out = ROOT / "bench" / "results" / "align.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
