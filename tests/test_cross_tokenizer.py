"""Cross-tokenizer teachers: losses pinned to the same-tokenizer ones, ULD against GOLD, a training run that
lowers held-out span-level KL, and a teacher with another tokenizer behind a real server on 127.0.0.1."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from cross_tokenizers import bpe
from tiny import make_model, make_plain_model, make_tokenizer

from protege import build, run_log
from protege.config import LossConfig, load_config
from protege.data import Example, PromptTokenizer
from protege.forward import HiddenStates, forward_completion_hidden, output_weight
from protege.losses.cross_tokenizer import uld_loss
from protege.modeling import eos_ids
from protege.objective import Objective
from protege.rollout import hf as hf_rollout
from protege.teacher.cross_tokenizer import CrossTokenizerTeacher
from protege.teacher.local import LocalTeacher

PROMPTS = ["what is 3+4?", "name a colour", "say hi", "count to 5", "2 words, please", "é or e?"]


def buffer(student, tok, n=6, seed=0, max_new_tokens=14):
    pt = PromptTokenizer(tok, 64)
    examples = [Example(messages=[{"role": "user", "content": p}]) for p in PROMPTS[:n]]
    torch.manual_seed(seed)
    r = hf_rollout.generate(student, [pt.prompt_ids(e) for e in examples], max_new_tokens=max_new_tokens,
                            eos_ids=eos_ids(tok), pad_id=0, record_topk=4)
    r.examples = examples
    return r


def per_token(objective, student, mb, signal, teacher_weight=None):
    hidden = forward_completion_hidden(HiddenStates(student), mb.prompt_ids, mb.completion_ids, mb.completion_mask, 0)
    return objective.per_token_loss(hidden, output_weight(student), mb, signal, teacher_weight)


@pytest.fixture(scope="module")
def same_pair():
    tok = make_tokenizer()
    student, teacher = make_model(2, 2), make_model(3, 1)
    local = LocalTeacher(teacher, pad_id=0)
    cross = CrossTokenizerTeacher(local, tok, tok, student_vocab_size=128, student_eos_ids=eos_ids(tok),
                                  teacher_eos_ids=eos_ids(tok))
    return tok, student, local, cross


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "forward_kl"])
def test_shared_topk_equals_same_tokenizer_teacher_topk_loss(same_pair, name):
    """Pinned: through the cross-tokenizer path with the same tokenizer on both sides, every token is a 1:1
    span, the vocabulary map is the identity and the loss equals loss.support=teacher (remote top-k)."""
    tok, student, local, cross = same_pair
    mb = buffer(student, tok)
    same = Objective.build(LossConfig(name=name, support="teacher", top_k=8), teacher_local=False)
    ct = Objective.build(LossConfig(name=name, cross_tokenizer="shared_topk", top_k=8), teacher_local=True,
                         cross_tokenizer=True)
    sig = cross.score(mb, ct.teacher_request(mb))
    assert sig.cross.stats["cross/one_to_one_share"] == 1.0
    torch.testing.assert_close(sig.token_logprobs, local.score(mb, ct.teacher_request(mb)).token_logprobs)
    with torch.no_grad():
        want = per_token(same, student, mb, local.score(mb, same.teacher_request(mb)))
        got = per_token(ct, student, mb, sig)
    assert float(want.abs().sum()) > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_span_estimator_equals_sampled_pg_on_one_to_one_spans(same_pair):
    tok, student, local, cross = same_pair
    mb = buffer(student, tok, seed=1)
    pg = Objective.build(LossConfig(name="sampled_pg"), teacher_local=True)
    ct = Objective.build(LossConfig(cross_tokenizer="span"), teacher_local=True, cross_tokenizer=True)
    want = per_token(pg, student, mb, local.score(mb, pg.teacher_request(mb)))
    got = per_token(ct, student, mb, cross.score(mb, ct.teacher_request(mb)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_uld_equals_gold_on_merged_groups():
    """Our ULD with K covering the vocabulary = GOLD's ULDLoss (observed merge, full sorted L1) on groups."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    torch.manual_seed(0)
    s_probs, t_probs = torch.randn(5, 11).softmax(-1), torch.randn(4, 17).softmax(-1)  # (Ts, Vs), (Tt, Vt)
    s_tok, t_tok = torch.randint(0, 11, (5,)), torch.randint(0, 17, (4,))
    s_groups, t_groups = [[0], [1, 2], [3, 4]], [[0, 1], [2], [3]]
    gold = ULDLoss.__new__(ULDLoss)
    gold.token_merge_strategy = "observed"
    s_al = gold._merge_probabilities_with_alignment_groups(s_probs, s_groups, s_tok.tolist())
    t_al = gold._merge_probabilities_with_alignment_groups(t_probs, t_groups, t_tok.tolist())
    pad = torch.nn.functional.pad
    want = (pad(s_al.sort(-1, descending=True).values, (0, 6)) - t_al.sort(-1, descending=True).values).abs().sum()
    first_s, first_t = [g[0] for g in s_groups], [g[0] for g in t_groups]
    rest = lambda p, tokens, groups: torch.stack([sum((p[i, tokens[i]].log() for i in g[1:]), torch.tensor(0.0))  # noqa
                                                  for g in groups])
    got = uld_loss(s_probs[first_s].log(), rest(s_probs, s_tok, s_groups), t_probs[first_t].log(),
                   rest(t_probs, t_tok, t_groups))
    torch.testing.assert_close(got.sum(), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def other_pair(tmp_path_factory):
    """A char-level student and a teacher with a ByteLevel BPE trained here (saved, for the server test)."""
    root = tmp_path_factory.mktemp("cross")
    t_tok = bpe(300)
    t_tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    t_tok.save_pretrained(root / "teacher_tok")
    rows = [{"prompt": f"what is {i % 7}+{i % 5}?", "completion": str(i % 7 + i % 5)} for i in range(40)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"tok": make_tokenizer(), "t_tok": t_tok, "teacher": make_plain_model(len(t_tok), seed=3), "root": root}


def distiller(pair, overrides, **kw):
    from protege.trainer import Distiller

    cfg = load_config(None, ["student.path=s", "teacher.path=t", f"data.path={pair['root'] / 'd.jsonl'}",
                             f"output.dir={pair['root'] / 'out'}", "output.report_to=none", "train.num_threads=1",
                             "train.prompts_per_step=8", "train.micro_batch_size=8", "rollout.max_new_tokens=12",
                             "data.eval_fraction=0.25", "data.eval_prompts=10", "output.diagnostics_top_k=4",
                             *overrides])
    return Distiller(cfg, student=make_model(2, 2), tokenizer=pair["tok"], **kw)


@pytest.mark.parametrize("mode", ["span", "next_byte"])
def test_cross_run_lowers_heldout_span_kl(other_pair, mode):
    """A run with a teacher of another tokenizer (span estimator; next-byte divergence + span estimator):
    held-out span-level reverse KL (eval/rkl, per student token) drops, and the alignment diagnostics are
    logged."""
    d = distiller(other_pair, ["optim.lr=3e-3", "train.max_steps=12", f"loss.cross_tokenizer={mode}",
                               "loss.top_k=32"], teacher_model=other_pair["teacher"], teacher_tokenizer=other_pair["t_tok"])
    assert d.cross and isinstance(d.teacher, CrossTokenizerTeacher)
    before = run_log.heldout(d)["rkl"]
    history = [d.train_step() for _ in range(12)]
    after = run_log.heldout(d)["rkl"]
    assert after < 0.7 * before, (before, after)
    assert 0 < history[-1]["cross/one_to_one_share"] <= 1 and history[-1]["cross/span_len_max"] >= 1


def test_teacher_with_another_tokenizer_over_http(other_pair):
    """`protege serve-teacher`'s app on 127.0.0.1 with the teacher model; the run names only its URL and
    tokenizer: same signal as in-process, and training steps run."""
    from protege.server import HFBackend, create_app
    from protege.server.background import serve_in_thread

    with serve_in_thread(create_app(HFBackend(other_pair["teacher"], model_name="t"), max_k=32)) as server:
        d = distiller(other_pair, ["teacher.path=null", f"teacher.urls=[{server.url}]", "train.max_steps=2",
                                   f"teacher.tokenizer={other_pair['root'] / 'teacher_tok'}",
                                   "loss.cross_tokenizer=shared_topk", "loss.top_k=8"])
        assert d.cross
        mb = d.collect(0)
        request = d.objective.teacher_request(mb)
        remote = d.teacher.score(mb, request)
        local = CrossTokenizerTeacher(LocalTeacher(other_pair["teacher"], pad_id=0), other_pair["tok"],
                                      d.teacher_tok, student_vocab_size=128, student_eos_ids=eos_ids(other_pair["tok"]),
                                      teacher_eos_ids=eos_ids(d.teacher_tok)).score(mb, request)
        torch.testing.assert_close(remote.token_logprobs, local.token_logprobs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(remote.cross.topk_ids, local.cross.topk_ids)
        m = d.train_step(mb, remote)
        assert m["loss"] == m["loss"] and "cross/one_to_one_share" in m


def test_mode_detection_and_start_up_errors(other_pair):
    tok, t_tok = other_pair["tok"], other_pair["t_tok"]
    cfg = load_config(None, ["student.path=s", "teacher.path=t"])
    assert build.cross_tokenizer_mode(cfg, tok, t_tok)[1] is True
    assert build.cross_tokenizer_mode(cfg, tok, make_tokenizer())[1] is False
    on = load_config(None, ["student.path=s", "teacher.path=s", "teacher.cross_tokenizer=on"])
    assert build.cross_tokenizer_mode(on, tok) == (tok, True)  # forced, no tokenizer of its own: the student's
    off = load_config(None, ["student.path=s", "teacher.path=t", "teacher.cross_tokenizer=off"])
    assert build.cross_tokenizer_mode(off, tok, t_tok) == (None, False)
    with pytest.raises(ValueError, match="mix.seq_kd"):
        build.cross_tokenizer_mode(load_config(None, ["student.path=s", "teacher.path=t", "mix.seq_kd=true",
                                                      "mix.lmbda=0"]), tok, t_tok)
    with pytest.raises(ValueError, match="mix.lmbda=1"):
        build.cross_tokenizer_mode(load_config(None, ["student.path=s", "teacher.path=t", "mix.lmbda=0.5"]), tok, t_tok)
    with pytest.raises(ValueError, match="teacher.tokenizer"):
        build.cross_tokenizer_mode(load_config(None, ["student.path=s", "teacher.path=t",
                                                      "teacher.tokenizer=/nonexistent/tok"]), tok)


def test_student_eos_maps_to_the_token_that_ends_the_teachers_turn():
    """A teacher whose template ends an assistant turn with <|im_end|>, not its EOS </s>: the student's EOS
    is re-tokenized as <|im_end|> (what the teacher would emit there)."""
    t_tok = bpe(300)
    t_tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    t_tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    im_end = t_tok.convert_tokens_to_ids("<|im_end|>")
    s_tok = make_tokenizer()
    teacher = CrossTokenizerTeacher(LocalTeacher(make_plain_model(len(t_tok)), pad_id=0), s_tok, t_tok,
                                    student_vocab_size=128, student_eos_ids=eos_ids(s_tok),
                                    teacher_eos_ids=eos_ids(t_tok))
    assert im_end != t_tok.eos_token_id and teacher.t_by_class["eos"] == im_end
    _, segments = teacher.completion_plan(torch.tensor(s_tok("hi")["input_ids"] + [s_tok.eos_token_id]).numpy())
    assert segments == ["hi", im_end]


def test_row_sums_are_the_teachers_logprob_of_the_text(other_pair):
    """Independent reference: the teacher's own forward pass on its template's prompt + the decoded completion
    (+ its EOS when the student stopped): each row's summed token_logprobs and the sum of its span logprobs."""
    tok, t_tok, teacher = other_pair["tok"], other_pair["t_tok"], other_pair["teacher"]
    torch.manual_seed(5)
    mb = buffer(make_model(2, 2), tok, max_new_tokens=20)
    cross = CrossTokenizerTeacher(LocalTeacher(teacher, pad_id=0), tok, t_tok, student_vocab_size=128,
                                  student_eos_ids=eos_ids(tok), teacher_eos_ids=eos_ids(t_tok))
    sig = cross.score(mb, cross_request := Objective.build(LossConfig(cross_tokenizer="uld", top_k=4),
                                                           teacher_local=True, cross_tokenizer=True).teacher_request(mb))
    assert cross_request.topk == 4 and sig.cross.topk_ids.shape[-1] == 4
    for i in range(len(mb)):
        n = int(mb.completion_mask[i].sum())
        ids = mb.completion_ids[i, :n].tolist()
        ended = ids[-1] in eos_ids(tok)
        text = tok.decode(ids[:-1] if ended else ids, skip_special_tokens=False)  # specials spelled out
        prompt = t_tok.apply_chat_template(mb.examples[i].messages, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        comp = t_tok(text, add_special_tokens=False)["input_ids"] + ([t_tok.eos_token_id] if ended else [])
        with torch.no_grad():
            lp = torch.log_softmax(teacher(torch.tensor([prompt + comp])).logits[0].float(), -1)
        want = sum(float(lp[len(prompt) - 1 + j, comp[j]]) for j in range(len(comp)))
        assert abs(float(sig.token_logprobs[i, :n].sum()) - want) < 1e-3 * max(1.0, abs(want)), i
        firsts = sig.cross.first[i, :n]
        assert abs(float(sig.cross.span_logprobs[i, :n][firsts].sum()) - want) < 1e-3 * max(1.0, abs(want))


def test_identical_teacher_gives_zero_advantage_with_the_canonical_baseline():
    """The span estimator with the student's own model and tokenizer as a 'cross' teacher. Rows 1 and 3 spell
    their text in single bytes (a non-canonical path). Against the sampled path's own logprobs (the per-path
    estimator, ScoreRequest.canonical off) they get A != 0: the teacher scores its canonical re-tokenization.
    With the canonical baseline (fill_span_baseline) A = 0 on every token of every row, each span covers the
    same bytes on the sampled and the canonical path, and the span loss is 0. q is a plain forward written
    here, also the reference for the canonical path's logprobs."""
    from protege.cross_objective import fill_span_baseline
    from protege.losses.cross_tokenizer import span_pg_loss
    from protege.records import Rollouts

    tok = bpe(300)
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    model = make_plain_model(len(tok), seed=4)
    texts = ["what is a tent", "pack the stove", "a warm hat", "the trail"]
    prompt = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    canonical = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    byte_ids = [[tok.convert_tokens_to_ids(c) for c in tok.convert_ids_to_tokens(ids) for c in c] for ids in canonical]
    rows = [canonical[0], byte_ids[1], canonical[2], byte_ids[3]]
    assert all(len(b) > len(c) for b, c in zip(byte_ids, canonical))  # the spelled rows really are other paths
    assert [tok.decode(r) for r in rows] == texts

    def forward_logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.cat([prompt, torch.tensor(ids)])[None]).logits[0].float(), -1)
        return lp[len(prompt) - 1: len(prompt) - 1 + len(ids)].gather(-1, torch.tensor(ids)[:, None])[:, 0]

    t = max(map(len, rows))
    ids, mask, q = torch.zeros(4, t, dtype=torch.long), torch.zeros(4, t, dtype=torch.bool), torch.zeros(4, t)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)], q[i, : len(r)] = torch.tensor(r), True, forward_logprobs(r)
    mb = Rollouts(prompt_ids=[prompt] * 4, completion_ids=ids, completion_mask=mask, sampling_logprobs=q,
                  sources=["student"] * 4, finish_reasons=["length"] * 4,
                  examples=[Example(messages=[{"role": "user", "content": "hi"}])] * 4)
    cross = CrossTokenizerTeacher(LocalTeacher(model, pad_id=0), tok, tok, student_vocab_size=len(tok),
                                  student_eos_ids=eos_ids(tok), teacher_eos_ids=eos_ids(tok))
    request = Objective.build(LossConfig(cross_tokenizer="span"), teacher_local=True,
                              cross_tokenizer=True).teacher_request(mb)
    assert request.canonical
    per_path = cross.score(mb, replace(request, canonical=False))
    advantage = ((per_path.token_logprobs - q) * mask).sum(1)  # (4,) sum_c A_c per row against the sampled path
    torch.testing.assert_close(advantage[[0, 2]], torch.zeros(2), rtol=0, atol=1e-4)
    assert (advantage[[1, 3]].abs() > 0.5).all(), advantage
    assert per_path.cross.stats["cross/noncanonical_rows"] == 0.5 and not per_path.cross.canonical

    sig = cross.score(mb, request)
    assert sorted(sig.cross.canonical) == [1, 3]
    for i in (1, 3):
        c_ids, c_span = sig.cross.canonical[i]
        assert c_ids.tolist() == canonical[i]
        n = len(rows[i])
        sp = sig.cross.span_index[i, :n].numpy()
        for span in set(sp.tolist()):  # every span: the same bytes on the sampled and the canonical path
            assert tok.decode(ids[i, :n][sp == span]) == tok.decode(c_ids[c_span == span].tolist())
    fill_span_baseline(sig.cross, mb, lambda prompts, comps: [forward_logprobs(c.tolist()) for c in comps])
    a = (sig.cross.span_logprobs - sig.cross.span_baseline)[mask]
    torch.testing.assert_close(a, torch.zeros_like(a), rtol=0, atol=1e-4)
    loss = span_pg_loss(q, q, sig.cross.span_index, sig.cross.span_logprobs, mask, sig.cross.span_baseline)
    assert float(loss.abs().max()) < 1e-4


def test_trainer_fills_the_canonical_baseline(other_pair):
    """Through the trainer: the student's own samples (a random BPE model: most rows are not canonical),
    scored by an identical copy of it forced through the cross-tokenizer path. Distiller.score runs the
    student's forward on the canonical paths; every token's A_c is then 0, and so are the step's loss, its
    sampled_rkl and the held-out rkl."""
    import copy

    tok = bpe(300)
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    student = make_plain_model(len(tok), seed=6)
    from protege.trainer import Distiller

    cfg = load_config(None, ["student.path=s", "teacher.path=t", f"data.path={other_pair['root'] / 'd.jsonl'}",
                             f"output.dir={other_pair['root'] / 'out_canonical'}", "output.report_to=none",
                             "train.num_threads=1", "train.prompts_per_step=8", "train.micro_batch_size=3",
                             "rollout.max_new_tokens=12", "teacher.cross_tokenizer=on", "data.eval_fraction=0.25",
                             "data.eval_prompts=6"])
    d = Distiller(cfg, student=student, teacher_model=copy.deepcopy(student), tokenizer=tok, teacher_tokenizer=tok)
    mb = d.collect(0)
    sig = d.score(mb)
    assert len(sig.cross.canonical) >= 2, sig.cross.stats  # the test needs non-canonical samples
    valid = mb.completion_mask & sig.cross.valid
    a = (sig.cross.span_logprobs - sig.cross.span_baseline)[valid]
    torch.testing.assert_close(a, torch.zeros_like(a), rtol=0, atol=2e-4)
    assert abs(run_log.heldout(d)["rkl"]) < 1e-5  # the held-out estimate uses the same baseline (its own forward)
    m = d.train_step(mb, sig)  # (after it, weight decay has moved the student away from its copy)
    assert abs(m["loss"]) < 1e-5 and abs(m["sampled_rkl"]) < 1e-5  # and so does the step metric


def _first_byte_reference(tok) -> list[int]:
    """Independent of protege.teacher.align: each id's first text byte from its piece string (GPT-2's byte
    alphabet for ByteLevel, '▁' = space and <0xNN> for SentencePiece), 256 for EOS, 257 other specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    level = "ByteLevel" in type(tok.backend_tokenizer.pre_tokenizer).__name__
    out = []
    for v, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if v == tok.eos_token_id:
            out.append(256)
        elif v in tok.all_special_ids or not piece:
            out.append(257)
        elif level:
            out.append(byte_of[piece[0]])
        elif piece.startswith("<0x") and len(piece) == 6:
            out.append(int(piece[3:5], 16))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8")[0])
    return out


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl"])
def test_next_byte_loss_equals_brute_force(name):
    """A ByteLevel BPE student and a SentencePiece (byte fallback) teacher: the first-byte tables equal a
    reference read from the piece strings, and with the teacher's whole vocabulary as its top-K the loss is
    the divergence between P(next byte) summed token by token in Python."""
    import math

    from protege.losses.cross_tokenizer import next_byte_loss
    from protege.teacher.align import VocabBytes

    from cross_tokenizers import unigram

    s_tok, t_tok = bpe(300), unigram(300)
    s_ref, t_ref = _first_byte_reference(s_tok), _first_byte_reference(t_tok)
    s_tab = VocabBytes.from_tokenizer(s_tok, eos_ids=[s_tok.eos_token_id]).first_bytes()
    t_tab = VocabBytes.from_tokenizer(t_tok, eos_ids=[t_tok.eos_token_id]).first_bytes()
    assert s_tab.tolist() == s_ref and t_tab.tolist() == t_ref
    torch.manual_seed(0)
    n, vs, vt = 3, len(s_tok), len(t_tok)
    logits = torch.randn(n, vs, dtype=torch.float64) * 2
    t_lp = torch.log_softmax(torch.randn(n, vt, dtype=torch.float64) * 2, -1)
    order = t_lp.argsort(-1, descending=True)  # a top-K list holding the whole vocabulary
    got = next_byte_loss(logits, torch.tensor(s_ref), t_lp.gather(-1, order), torch.tensor(t_ref)[order], name=name)
    q = torch.softmax(logits, -1)
    for i in range(n):
        pq, pp = [0.0] * 258, [0.0] * 258
        for v in range(vs):
            pq[s_ref[v]] += float(q[i, v])
        for v in range(vt):
            pp[t_ref[v]] += math.exp(float(t_lp[i, v]))
        a, b = (pq, pp) if name == "reverse_kl" else (pp, pq)
        want = sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
        assert abs(float(got[i]) - want) < 1e-6 * max(1.0, want), (i, float(got[i]), want)
    same = next_byte_loss(logits, torch.tensor(s_ref), torch.log_softmax(logits, -1).sort(-1, descending=True).values,
                          torch.tensor(s_ref)[logits.argsort(-1, descending=True)], name=name)
    torch.testing.assert_close(same, torch.zeros(n, dtype=same.dtype), atol=1e-6, rtol=0)  # a teacher = the student (fp32)


def test_a_privileged_teacher_across_tokenizers_reads_its_own_view(other_pair):
    """teacher.system_prompt with the cross-tokenizer path: the wrapper hands the data rows to the privileged
    teacher inside it (it raised 'needs each sequence's data row' before), whose prompts then hold the system
    message: the same buffer gets other teacher logprobs than without it, and a step trains on them."""
    import copy

    from protege.trainer import Distiller

    tok = bpe(300)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    student = make_plain_model(len(tok), seed=6)
    base = ["student.path=s", "teacher.path=t", f"data.path={other_pair['root'] / 'd.jsonl'}",
            "output.report_to=none", "train.num_threads=1", "train.prompts_per_step=4", "train.micro_batch_size=2",
            "rollout.max_new_tokens=8", "teacher.cross_tokenizer=on", "data.eval_prompts=0"]

    def distiller(name, *extra):
        cfg = load_config(None, [*base, f"output.dir={other_pair['root'] / name}", *extra])
        return Distiller(cfg, student=copy.deepcopy(student), teacher_model=copy.deepcopy(student), tokenizer=tok,
                         teacher_tokenizer=tok)
    plain = distiller("plain")
    buffer = plain.collect(0)
    told = distiller("told", "teacher.system_prompt=Answer in one short line.")
    sig_told, sig_plain = told.score(buffer), plain.score(buffer)
    valid = buffer.completion_mask & sig_told.cross.valid & sig_plain.cross.valid
    assert not torch.allclose(sig_told.cross.span_logprobs[valid], sig_plain.cross.span_logprobs[valid])
    m = told.train_step(buffer, sig_told)
    assert torch.isfinite(torch.tensor(m["loss"]))
