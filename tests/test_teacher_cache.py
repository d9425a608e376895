"""The teacher-score cache (protege.teacher.cache): exact reuse, damage detection, teacher identity, the CLI.

Teacher calls are counted on the real teacher model (a forward hook on its embedding: every scoring
forward runs it) or on a real server's count of scored sequences; losses are compared bit for bit
with runs that have no cache at all (the independent reference)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny import make_plain_model
from transformers import AutoModelForCausalLM

from protege.cli import main
from protege.config import ConfigError, load_config
from protege.records import Rollouts
from protege.server import HFBackend, create_app
from protege.server.background import serve_in_thread
from protege.teacher.base import ScoreRequest
from protege.teacher.cache import open_cache
from protege.teacher.cache_store import ShardStore, decode_field, encode_field, pack_shard, read_shard
from protege.teacher.local import LocalTeacher
from protege.teacher.remote import RemoteTeacher
from protege.trainer import Distiller

VOCAB = 96
UNTIMED = ("time_", "tokens_per_s", "train_tokens_per_s", "cache/")


def _args(paths, out, *extra) -> list[str]:
    return [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}", f"data.path={paths['data']}",
            "rollout.max_new_tokens=6", "train.prompts_per_step=4", "train.micro_batch_size=2", "optim.lr=3e-3",
            f"output.dir={out}", "output.progress=false", "train.num_threads=1", "data.eval_prompts=0",
            "train.max_steps=3", *extra]


def _counted_teacher(paths):
    """The tiny teacher, loaded, with a list that grows by one at every forward (every scoring batch)."""
    model = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    return model, calls


def _run(paths, out, *extra):
    model, calls = _counted_teacher(paths)
    history = Distiller(load_config(None, _args(paths, out, *extra)), teacher_model=model).train()
    steps = [m for m in history if "loss" in m]
    return steps, len(calls)


def _untimed(steps):
    return [{k: v for k, v in m.items() if not k.startswith(UNTIMED)} for m in steps]


def _rollouts(n: int, seed: int, vocab: int = VOCAB) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 12, (n,), generator=g)
    t = int(lens.max())
    mask = torch.arange(t)[None] < lens[:, None]
    completion = torch.randint(0, vocab, (n, t), generator=g) * mask
    prompts = [torch.randint(0, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g) for _ in range(n)]
    return Rollouts(prompt_ids=prompts, completion_ids=completion, completion_mask=mask)


def test_warm_run_calls_no_teacher_and_logs_the_same_losses(tiny_paths, tmp_path):
    """On-policy (the student samples every row), exact full-vocabulary loss from cached hidden states:
    a rerun with the same seed samples the same rows, so every one is answered from the cache."""
    cache = ["teacher.cache_dir=" + str(tmp_path / "cache"), "teacher.cache_hidden=true"]
    plain, plain_calls = _run(tiny_paths, tmp_path / "plain")
    cold, cold_calls = _run(tiny_paths, tmp_path / "cold", *cache)
    warm, warm_calls = _run(tiny_paths, tmp_path / "warm", *cache)
    assert plain_calls > 0 and cold_calls == plain_calls
    assert warm_calls == 0
    assert _untimed(cold) == _untimed(plain)  # the cache changes nothing, bit for bit
    assert _untimed(warm) == _untimed(cold)
    assert [m["cache/misses"] for m in cold] == [4, 4, 4] and [m["cache/hits"] for m in cold] == [0, 0, 0]
    assert [m["cache/hits"] for m in warm] == [4, 4, 4] and [m["cache/misses"] for m in warm] == [0, 0, 0]
    assert [m["cache/teacher_calls"] for m in warm] == [0, 0, 0] and [m["cache/teacher_calls"] for m in cold] == [1] * 3
    assert all(m["cache/off_policy_rows"] == 0 for m in warm)  # the student sampled them itself
    assert "cache/hits" not in plain[0]  # no cache, no new metrics


@pytest.fixture(scope="module")
def server():
    s = serve_in_thread(create_app(HFBackend(make_plain_model(VOCAB), model_name="tiny"), max_k=32))
    yield s
    s.stop()


def test_hits_and_misses_when_half_the_rows_are_new(server, tmp_path):
    """Over a real server: 8 rows, then 4 of them again plus 4 new ones; also the query ids are part of the key."""
    scored = lambda: server.server.config.app.state.batcher.stats.scored_sequences  # noqa: E731
    old, new = _rollouts(8, 0), _rollouts(4, 1)
    query = lambda r, seed: torch.randint(0, VOCAB, (*r.completion_ids.shape, 3),  # noqa: E731
                                          generator=torch.Generator().manual_seed(seed))
    q_old = query(old, 5)
    with RemoteTeacher(server.url) as inner:
        teacher = open_cache(inner, tmp_path)
        first = teacher.score(old, ScoreRequest(topk=8, query_ids=q_old))
        assert teacher.take_counts() | {"bytes_written": 0} == {"hits": 0, "misses": 8, "teacher_calls": 1,
                                                                 "off_policy_rows": 0, "bytes_written": 0,
                                                                 "tokens_written": old.num_tokens}
        keep = [0, 2, 5, 7]
        mixed = Rollouts.concat([old.select(keep), new])
        t = mixed.completion_ids.shape[1]
        q_mixed = torch.zeros((8, t, 3), dtype=torch.long)
        for j, i in enumerate(keep):
            q_mixed[j, : old.completion_ids.shape[1]] = q_old[i]
        q_mixed[4:, : new.completion_ids.shape[1]] = query(new, 6)
        before = scored()
        got = teacher.score(mixed, ScoreRequest(topk=8, query_ids=q_mixed))
        counts = teacher.take_counts()
        assert (counts["hits"], counts["misses"], counts["teacher_calls"]) == (4, 4, 1)
        assert scored() - before == 4  # only the new rows reached the server
        ref = inner.score(mixed, ScoreRequest(topk=8, query_ids=q_mixed))  # no cache
        q_other = q_mixed.clone()
        q_other[0] = (q_other[0] + 1) % VOCAB  # same tokens, other query ids: another answer, a miss
        first_len = int(mixed.completion_mask[0].sum())
        teacher.score(mixed.select([0]), ScoreRequest(topk=8, query_ids=q_other[:1, :first_len]))
        assert teacher.take_counts()["misses"] == 1
    mask = mixed.completion_mask
    for name in ("token_logprobs", "topk_logprobs", "query_logprobs"):
        torch.testing.assert_close(getattr(got, name)[mask], getattr(ref, name)[mask], atol=1e-5, rtol=0)
        assert torch.all(getattr(got, name)[~mask] == 0)
        for j, i in enumerate(keep):  # the hits are what the first call returned, bit for bit
            n = int(old.completion_mask[i].sum())
            assert torch.equal(getattr(got, name)[j, :n], getattr(first, name)[i, :n])
    assert torch.equal(got.topk_ids[mask], ref.topk_ids[mask])


def test_warm_run_over_a_server_sends_it_nothing(tiny_paths, tmp_path):
    """The same with a teacher server (top-k support): the warm run's requests never reach it (its own count)."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    with serve_in_thread(create_app(HFBackend(teacher, pad_id=0), max_k=32)) as srv:
        scored = lambda: srv.server.config.app.state.batcher.stats.scored_sequences  # noqa: E731
        args = [f"teacher.urls=[{srv.url}]", "teacher.path=null", "loss.support=teacher", "loss.top_k=8",
                "train.max_steps=2"]
        runs = []
        for name in ("cold", "warm"):
            before = scored()
            cfg = load_config(None, _args(tiny_paths, tmp_path / name, *args, f"teacher.cache_dir={tmp_path / 'c'}"))
            steps = [m for m in Distiller(cfg).train() if "loss" in m]
            runs.append((_untimed(steps), scored() - before, [m["cache/teacher_calls"] for m in steps]))
    (cold, n_cold, calls_cold), (warm, n_warm, calls_warm) = runs
    assert (n_cold, calls_cold) == (8, [1, 1]) and (n_warm, calls_warm) == (0, [0, 0])
    assert warm == cold


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) - 7]))
    else:  # flip one byte: of a stored logprob (the end of the payload) or of the sha256 in the prefix
        data[len(data) - 3 if how == "payload" else 30] ^= 0x40
        path.write_bytes(bytes(data))


def test_corrupted_shard_is_detected_and_rebuilt(tmp_path, caplog):
    teacher_model = make_plain_model(VOCAB)
    parts = [_rollouts(3, s) for s in (10, 11, 12, 13)]
    request = ScoreRequest(topk=4, entropy=True)
    cached = open_cache(LocalTeacher(teacher_model, pad_id=0), tmp_path)
    want = [cached.score(r, request) for r in parts]  # one shard per call
    folder = cached.store.folder
    shards = sorted(folder.glob("*.ptc"), key=lambda p: p.stat().st_mtime_ns)
    assert len(shards) == 4
    for path, how in zip(shards, ("payload", "truncate", "prefix")):  # the 4th stays intact
        _damage(path, how)
    caplog.set_level(logging.WARNING, "protege")
    again = open_cache(LocalTeacher(teacher_model, pad_id=0), tmp_path)
    got = [again.score(r, request) for r in parts]
    counts = again.take_counts()
    assert (counts["hits"], counts["misses"], counts["teacher_calls"]) == (3, 9, 3)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 3 and all(any(str(p) in m for m in damaged) for p in shards[:3])
    for g, w, r in zip(got, want, parts):
        mask = r.completion_mask
        for name in ("token_logprobs", "topk_logprobs", "entropy"):
            torch.testing.assert_close(getattr(g, name)[mask], getattr(w, name)[mask], atol=1e-6, rtol=0)
        assert torch.equal(g.topk_ids[mask], w.topk_ids[mask])
    for path in shards:  # rebuilt: the same rows, so the same content-addressed names, now sound
        assert len(read_shard(path)[1]) == 3
    caplog.clear()
    third = open_cache(LocalTeacher(teacher_model, pad_id=0), tmp_path)  # the rebuilt shards are sound
    for r in parts:
        third.score(r, request)
    assert third.take_counts()["hits"] == 12 and not caplog.records


def test_a_nan_under_a_valid_sha256_is_a_damaged_shard(tmp_path, caplog):
    """A shard rewritten with a NaN logprob and a correct sha256 (what a faulty teacher or an attacker
    writes): the warning names the cache file, the file is removed, its rows are scored again, and
    the scores are the teacher's. Before: the NaN reached the loss and stopped the run with a message
    that did not name the cache."""
    teacher_model = make_plain_model(VOCAB)
    parts, request = [_rollouts(3, s) for s in (20, 21)], ScoreRequest(topk=4)
    cached = open_cache(LocalTeacher(teacher_model, pad_id=0), tmp_path)
    want = [cached.score(r, request) for r in parts]
    shards = sorted(cached.store.folder.glob("*.ptc"), key=lambda p: p.stat().st_mtime_ns)
    header, rows = read_shard(shards[0])
    rows[1]["token_logprobs"][0] = float("nan")
    shards[0].write_bytes(pack_shard(header["manifest"], [bytes.fromhex(k) for k in header["keys"]], rows))
    caplog.set_level(logging.WARNING, "protege")
    again = open_cache(LocalTeacher(teacher_model, pad_id=0), tmp_path)
    got = [again.score(r, request) for r in parts]
    counts = again.take_counts()
    assert (counts["hits"], counts["misses"], counts["teacher_calls"]) == (3, 3, 1), counts
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and str(shards[0]) in damaged[0] and "token_logprobs" in damaged[0] and "NaN" in damaged[0]
    for g, w, r in zip(got, want, parts):
        assert torch.isfinite(g.token_logprobs[r.completion_mask]).all()
        torch.testing.assert_close(g.token_logprobs[r.completion_mask], w.token_logprobs[r.completion_mask],
                                   atol=1e-6, rtol=0)
    assert len(read_shard(shards[0])[1]) == 3  # rebuilt, sound


def test_another_teachers_cache_is_not_read(tmp_path, caplog):
    a, b = make_plain_model(VOCAB, seed=0), make_plain_model(VOCAB, seed=1)  # same shape, other weights
    rows, request = _rollouts(5, 20), ScoreRequest(topk=4)
    ca = open_cache(LocalTeacher(a, pad_id=0), tmp_path)
    ca.score(rows, request)
    cb = open_cache(LocalTeacher(b, pad_id=0), tmp_path)
    got = cb.score(rows, request)
    assert cb.take_counts()["hits"] == 0 and cb.manifest_hash != ca.manifest_hash
    ref = LocalTeacher(b, pad_id=0).score(rows, request)
    torch.testing.assert_close(got.token_logprobs, ref.token_logprobs, atol=1e-6, rtol=0)
    a_bf16 = open_cache(LocalTeacher(make_plain_model(VOCAB, seed=0).to(torch.bfloat16), pad_id=0), tmp_path)
    assert a_bf16.manifest_hash not in (ca.manifest_hash, cb.manifest_hash)  # the dtype is part of the identity
    # a shard of teacher a copied into b's folder (same file name scheme) is never read
    for shard in ca.store.folder.glob("*.ptc"):
        (cb.store.folder / shard.name).write_bytes(shard.read_bytes())
    for shard in cb.store.folder.glob("*.ptc"):
        if not (ca.store.folder / shard.name).exists():
            shard.unlink()  # b's own rows gone: only a's copies remain
    caplog.set_level(logging.WARNING, "protege")
    cb2 = open_cache(LocalTeacher(b, pad_id=0), tmp_path)
    assert len(cb2.store) == 0 and any("another teacher" in r.getMessage() for r in caplog.records)
    cb2.score(rows, request)
    assert cb2.take_counts()["misses"] == 5


def test_cache_teacher_cli_then_training_calls_no_teacher(tiny_paths, tmp_path, capsys, caplog):
    """`protege cache-teacher` on the dataset's completions, then a run on those rows (mix.lmbda=0)."""
    cache = [f"teacher.cache_dir={tmp_path / 'cache'}", "loss.support=sampled"]
    args = _args(tiny_paths, tmp_path / "unused", *cache, "train.max_steps=2")
    assert main(["cache-teacher", *args]) == 0
    out = capsys.readouterr().out
    n_rows = sum(1 for line in Path(tiny_paths["data"]).read_text().splitlines() if line.strip())
    assert f"cached {n_rows} rows" in out and "policy being trained" in out
    caplog.set_level(logging.WARNING, "protege")
    plain, _ = _run(tiny_paths, tmp_path / "plain", "mix.lmbda=0", "loss.support=sampled", "train.max_steps=2")
    warm, calls = _run(tiny_paths, tmp_path / "warm", "mix.lmbda=0", *cache, "train.max_steps=2")
    assert calls == 0
    assert _untimed(warm) == _untimed(plain)
    assert [(m["cache/hits"], m["cache/off_policy_rows"], m["cache/misses"]) for m in warm] == [(4, 4, 0)] * 2
    assert any("off-policy rows" in r.getMessage() for r in caplog.records)


def test_config_errors_name_the_keys(tiny_paths, tmp_path):
    with pytest.raises(ConfigError, match="teacher.cache_hidden=true needs teacher.cache_dir"):
        load_config(None, _args(tiny_paths, tmp_path, "teacher.cache_hidden=true"))
    with pytest.raises(ConfigError, match="teacher.cache_hidden=true to cache them"):
        load_config(None, _args(tiny_paths, tmp_path, f"teacher.cache_dir={tmp_path}"))  # support=full, in-process
    with pytest.raises(ConfigError, match="teacher.self=ema: a self teacher is not cached"):
        load_config(None, [*_args(tiny_paths, tmp_path, f"teacher.cache_dir={tmp_path}", "loss.support=sampled"),
                           "teacher.path=null", "teacher.self=ema"])
    load_config(None, _args(tiny_paths, tmp_path, f"teacher.cache_dir={tmp_path}", "loss.support=sampled"))


def test_stored_values_come_back_bit_for_bit(tmp_path):
    """Each field in its smallest lossless dtype, read back exactly: -inf, NaN, float16-exact and not, ids, bf16."""
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(7, 5, generator=g).float()
    lp[0, 0], lp[1, 1] = float("-inf"), float("nan")
    halfable = lp.half().float()
    ids_small, ids_big = torch.randint(0, 60000, (7, 5), generator=g), torch.randint(0, 200000, (7, 5), generator=g)
    hidden = torch.randn(7, 3, generator=g).to(torch.bfloat16)
    for x, code in ((lp, "f4"), (halfable, "f2"), (ids_small, "u2"), (ids_big, "i4"), (hidden, "bf16")):
        got_code, raw = encode_field(x)
        back = decode_field(raw, got_code, str(x.dtype).replace("torch.", ""))
        assert got_code == code and back.dtype == x.dtype
        assert torch.equal(back.view(torch.int16) if x.dtype == torch.bfloat16 else back.nan_to_num(0.5),
                           x.view(torch.int16) if x.dtype == torch.bfloat16 else x.nan_to_num(0.5))
    store = ShardStore(tmp_path, "m" * 64)
    finite = lp.nan_to_num(nan=-1.0)  # a shard holding NaN is damaged (test_a_nan_under_a_valid_sha256...)
    rows = [{"token_logprobs": finite[i], "hidden_states": hidden[i:i + 1].expand(5, 3)} for i in range(2)]
    store.put([b"a" * 32, b"b" * 32], rows)
    fresh = ShardStore(tmp_path, "m" * 64)
    back = fresh.get(b"b" * 32)["hidden_states"]
    assert torch.equal(back.view(torch.int16), rows[1]["hidden_states"].view(torch.int16))
    assert fresh.get(b"c" * 32) is None and ShardStore(tmp_path, "x" * 64).get(b"a" * 32) is None
