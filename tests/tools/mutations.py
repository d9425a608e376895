"""The planted bugs of tests/tools/mutate.py: what a careless refactor would do, one per entry.

name: short id; file: the source file; old -> new: one exact replacement (old occurs once);
tests: the pytest arguments that must fail with the bug in place; why: the bug in words.
"""

SCORING = "tests/test_scoring_reference.py"
SAMPLING = "tests/test_sampling_reference.py"
OBJECTIVES = "tests/test_objectives.py"
RESUME = "tests/test_resume.py"
CHECKPOINT = "tests/test_checkpoint.py"
REPLIES = "tests/test_teacher_replies.py"
SERVER = "tests/test_server.py"
HARDENING = "tests/test_server_hardening.py"
BATCHER = "tests/test_batcher.py"
DATA = "tests/test_data.py"
LOSSES = "tests/test_losses.py"
CACHE = "tests/test_teacher_cache.py"


def m(name, file, old, new, tests, why):
    return {"name": name, "file": file, "old": old, "new": new, "tests": tests if isinstance(tests, list) else [tests],
            "why": why}


MUTATIONS = [
    # ---- teacher scoring
    m("scoring-temperature-ignored", "protege/teacher/local.py", "wide[:c].div_(temperature)",
      "wide[:c].div_(1.0)", SCORING, "in-process scoring at T=1 whatever the request says"),
    m("scoring-position-shift", "protege/forward.py", "torch.arange(p - 1, p - 1 + n, device",
      "torch.arange(p, p + n, device", SCORING, "teacher hidden states one position late"),
    m("scoring-topk-of-logits", "protege/teacher/local.py", "v, i = logprobs.topk(k, dim=-1)",
      "v, i = logits.topk(k, dim=-1)", SCORING, "top-k values are logits, not logprobs"),
    m("scoring-query-at-token", "protege/teacher/local.py",
      "qlp.append(logprobs.gather(-1, flat_query[s:s + chunk_positions]))",
      "qlp.append(logprobs.gather(-1, flat_tokens[s:s + chunk_positions, None].expand(-1, flat_query.shape[1])))",
      SCORING, "logprobs at the sampled token instead of the caller's ids"),
    m("client-reorders-rows", "protege/teacher/remote.py", "idx = torch.as_tensor(chunk, dtype=torch.long)",
      "idx = torch.as_tensor(sorted(chunk, reverse=True), dtype=torch.long)", SCORING,
      "remote client puts a chunk's rows back in the wrong order"),
    # ---- sampling
    m("sampling-logprob-at-T1", "protege/rollout/hf.py", "self.prev = torch.log_softmax(scaled, dim=-1)",
      "self.prev = torch.log_softmax(scores.float(), dim=-1)", SAMPLING, "sampling logprobs ignore the temperature"),
    m("sampling-eos-dropped", "protege/rollout/hf.py", "length = int(hits[0]) + 1 if len(hits) else steps",
      "length = int(hits[0]) if len(hits) else steps", SAMPLING, "EOS cut off the completion it ends"),
    m("sampling-no-trim", "protege/rollout/hf.py", "hits = is_eos[j].nonzero()", "hits = is_eos[j].nonzero()[:0]",
      SAMPLING, "tokens after EOS kept, rows never 'stop'"),
    m("lean-sampled-at-T1", "protege/rollout/lean.py", "        tokens = _inverse_cdf(e, generator)",
      "        tokens = _inverse_cdf(logits.float().softmax(-1), generator)", "tests/test_lean_engine.py",
      "the lean engine draws tokens at temperature 1 whatever rollout.temperature says"),
    m("kernel-reduce-lanes-swapped", "protege/rollout/decode_kernel.c", "_mm256_permute2f128_ps(s0, s1, 0x31)",
      "_mm256_permute2f128_ps(s1, s0, 0x31)", "tests/test_fast_decode.py",
      "the decode kernel's reduction adds rows 4-7's sums to rows 0-3's outputs"),
    m("kernel-tail-dropped", "protege/rollout/decode_kernel.c", "for (int i = 0; i < 8; i++) out[i] += wr[k] * xr[i][k];",
      "for (int i = 0; i < 8; i++) out[i] += 0.0f * wr[k] * xr[i][k];", "tests/test_fast_decode.py",
      "the decode kernel ignores the last K % 8 columns"),
    m("kernel-thread-rows-overlap", "protege/rollout/decode_kernel.c", "long n0 = t * per, n1",
      "long n0 = t * per / 2, n1", "tests/test_fast_decode.py",
      "the decode kernel's threads split the output rows wrongly (some rows never computed)"),
    m("decode-attention-mask-dropped", "protege/rollout/fast_decode.py", "attn_mask=attention_mask, scale=scaling,",
      "attn_mask=None, scale=scaling,", "tests/test_fast_decode.py",
      "the decode step attends to left padding"),
    m("lean-finished-rows-wrong-cache", "protege/rollout/lean.py",
      "self.k_buf, self.v_buf = self.k_buf[rows], self.v_buf[rows]",
      "self.k_buf, self.v_buf = self.k_buf[rows.flip(0)], self.v_buf[rows.flip(0)]", SAMPLING,
      "when rows finish, the remaining rows get each other's KV cache"),
    m("overlap-stale-snapshot", "protege/rollout/overlap.py", "                mine.copy_(live)\n",
      "                pass\n",
      ["tests/test_overlap.py", "-k", "lag1_samples"], "lag 1 samples with the first weights forever"),
    # ---- losses and objective
    m("grad-into-overwrites", "protege/losses/chunked.py", "                weight.grad.add_(scaled[1])",
      "                weight.grad.copy_(scaled[1])", "tests/test_fused_loss.py",
      "with the tied embedding's sparse gradient, the second micro-batch's lm_head gradient replaces the first's"),
    m("loss-sign-flipped", "protege/objective.py", "return out.masked_scatter(mask, values.float())",
      "return out.masked_scatter(mask, -values.float())", OBJECTIVES, "the student is pushed away from the teacher"),
    m("jsd-beta-swapped", "protege/losses/divergences.py",
      "            log_m = _log_mix(beta, log_p, log_q)  # (..., C)\n            kl_p",
      "            log_m = _log_mix(1 - beta, log_p, log_q)  # (..., C)\n            kl_p", [LOSSES, OBJECTIVES],
      "JSD mixture uses 1-beta"),
    m("pg-advantage-sign", "protege/losses/sampled.py", "advantage = reward_scale * (log_p - log_q_old)",
      "advantage = reward_scale * (log_q_old - log_p)", OBJECTIVES, "sampled-token reward with the wrong sign"),
    m("fused-grad-sign", "protege/losses/chunked.py", "grad_h[start: start + chunk_size] = g @ w  # (N_c, H)",
      "grad_h[start: start + chunk_size] = -(g @ w)  # (N_c, H)", OBJECTIVES, "fused chunk gradient negated"),
    m("per-microbatch-mean", "protege/trainer.py",
      "loss = reduce_tokens(per_token, mb.completion_mask.to(acc.device), num_tokens)",
      "loss = reduce_tokens(per_token, mb.completion_mask.to(acc.device), mb.num_tokens)", OBJECTIVES,
      "each micro-batch divided by its own token count"),
    m("gkd-coin-inverted", "protege/trainer.py", "on_policy = [coin.random() < cfg.mix.lmbda for _ in picked]",
      "on_policy = [coin.random() >= cfg.mix.lmbda for _ in picked]", OBJECTIVES, "lmbda picks off-policy rows"),
    m("union-logprobs-misaligned", "protege/objective.py",
      "torch.cat([signal.topk_logprobs[..., :k], signal.query_logprobs], -1)",
      "torch.cat([signal.query_logprobs, signal.topk_logprobs[..., :k]], -1)", OBJECTIVES,
      "union support: teacher logprobs not aligned with the ids"),
    # ---- resume and checkpoints
    m("resume-scheduler-forgotten", "protege/run_state.py",
      '        d.scheduler.load_state_dict(state["scheduler"])\n', "", RESUME,
      "resume restores the optimizer but not the LR schedule's position"),
    m("resume-rng-rank0-file", "protege/checkpoint.py",
      '    rng = _torch_file(folder / f"rng-{acc.process_index}.pt")\n', '    rng = _torch_file(folder / "rng-0.pt")\n',
      [RESUME, "-k", "two_processes"], "every rank restores rank 0's RNG"),
    m("resume-stream-forgotten", "protege/run_state.py",
      '    d.stream.load_state_dict(state["stream"])  # a changed dataset: ValueError, no older checkpoint helps\n',
      "", RESUME, "the prompt stream restarts at the beginning"),
    m("resume-lora-not-reloaded", "protege/checkpoint.py",
      "    if adapters:\n        from peft import set_peft_model_state_dict\n\n        set_peft_model_state_dict(model, weights)\n",
      "    if adapters:\n        return\n", [RESUME, "-k", "lora"], "LoRA adapters not restored"),
    m("checkpoint-unpickles", "protege/checkpoint.py", "return torch.load(path, map_location=\"cpu\", weights_only=True)",
      "return torch.load(path, map_location=\"cpu\", weights_only=False)", CHECKPOINT,
      "trainer state loaded with pickle (runs planted code)"),
    # ---- the wire and the remote client
    m("wire-checksum-unchecked", "protege/wire_container.py", "        if stored != actual:", "        if False:",
      ["tests/test_wire.py", REPLIES], "the payload checksum is computed but never compared"),
    m("replies-logprob-sign-unchecked", "protege/teacher/replies.py", "(x > LOGPROB_TOL)", "(x > LOGPROB_TOL + 1e9)",
      REPLIES, "positive teacher logprobs accepted"),
    # ---- the server
    m("batcher-row-offset", "protege/server/batcher.py", "            row += n\n", "", BATCHER,
      "every caller of a merged batch gets the first caller's rows"),
    m("batcher-never-merges", "protege/server/batcher.py", "            while self.batching:", "            while False:",
      BATCHER, "one engine call per request (batching silently off)"),
    m("batcher-fails-everyone", "protege/server/batcher.py",
      "results.extend(self._call([pieces[i]], temperature))", "raise RuntimeError('merged batch failed')", BATCHER,
      "one poisoned request fails every caller merged with it"),
    m("auth-off-on-metrics", "protege/server/app.py", 'route("/metrics", prometheus, ["GET"]),',
      'route("/metrics", prometheus, ["GET"], auth=False),', BATCHER, "a route left without bearer auth"),
    m("server-temperature-floor-gone", "protege/server/parse.py", "    if 0 < value < MIN_TEMPERATURE:\n",
      "    if 0 < value < 0.0:\n",
      HARDENING, "denormal temperatures accepted (NaN logprobs with 200)"),
    # ---- teacher-score cache
    m("cache-sha256-unchecked", "protege/teacher/cache_store.py",
      "if hashlib.sha256(memoryview(body)[_PREFIX.size:]).digest() != digest:", "if False:", CACHE,
      "a shard with a flipped byte is used"),
    m("cache-lossy-float16", "protege/teacher/cache_store.py",
      'if np.array_equal(small.astype("<f4").view("<u4"), a.view("<u4")):', "if True:", CACHE,
      "float32 logprobs stored as float16: a warm run trains on other numbers"),
    m("cache-key-without-weights", "protege/teacher/cache.py",
      'identity = {"kind": "in-process", "weights_sha256": weights_sha256(teacher.model),',
      'identity = {"kind": "in-process",', CACHE, "another teacher's cache is read"),
    # ---- several teachers
    m("routed-ema-member-frozen", "protege/teacher/routed.py", '            teacher.after_step(student)',
      "            pass", ["tests/test_routed_teachers.py"],
      "an EMA self teacher among routed teachers never follows the student"),
    m("seq-kd-ignores-privileged-context", "protege/trainer.py",
      "gen_p, gen_ex = self.teacher.prompt_view(off_p, off_ex)", "gen_p, gen_ex = off_p, off_ex",
      ["tests/test_privileged.py"], "a privileged teacher's samples are answers to the student's prompt"),
    # ---- cross-tokenizer
    m("span-baseline-sampled-path", "protege/cross_objective.py",
      "base = span_sums(rollouts.sampling_logprobs.float(), cross.span_index, mask)  # (N, T)\n    rows = sorted(cross.canonical)",
      "base = span_sums(rollouts.sampling_logprobs.float(), cross.span_index, mask)  # (N, T)\n    rows = []",
      ["tests/test_cross_tokenizer.py::test_trainer_fills_the_canonical_baseline"],
      "the span estimator's baseline is the sampled path's logprob on non-canonical rows (per-path bias)"),
    m("align-ignores-canonical-boundaries", "protege/teacher/align.py", "common = sorted_intersection(common, c_key)",
      "common = common", ["tests/test_align.py::test_three_way_spans_with_the_students_canonical_path"],
      "spans close where the canonical path has no boundary: its logprobs land in the wrong span"),
    m("eval-rkl-per-path", "protege/eval.py", "out[\"rkl\"] = sampled_rkl(own, signal.token_logprobs, mask)",
      "out[\"rkl\"] = sampled_rkl(rollouts.sampling_logprobs, signal.token_logprobs, mask)", ["tests/test_cross_tokenizer.py::test_trainer_fills_the_canonical_baseline"],
      "held-out rkl across tokenizers against the sampled path (lowered by spreading over tokenizations)"),
    m("next-byte-last-byte", "protege/teacher/align.py", "out[text] = self.flat[self.starts[text]]",
      "out[text] = self.flat[self.starts[text] + self.lengths[text] - 1]",
      ["tests/test_cross_tokenizer.py::test_next_byte_loss_equals_brute_force"],
      "the next-byte loss groups tokens by their last byte"),
    # ---- data
    m("data-splitlines", "protege/data.py", 'text.split("\\n")', "text.splitlines()", DATA,
      "JSONL split on U+2028 / U+0085 inside valid rows"),
]
