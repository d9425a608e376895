"""Matmul FLOP accounting for bench_vs_trl.py's part 2 and bench_generate.py: what one protege step
computes, per phase, from its actual rows, and each phase's floor on this machine.

tests/test_bench_flops.py holds `step_flops` to a count of every matmul and attention call of a real step.
"""

from __future__ import annotations


def linear_params(cfg) -> int:
    """Matmul weights of one decoder layer (attention projections + gated MLP)."""
    h, hd = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q = cfg.num_attention_heads * hd
    kv = cfg.num_key_value_heads * hd
    return h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size


def step_flops(buffer, s_cfg, t_cfg, mb: int, gen_rows: int, engine: str = "lean",
               checkpointing: bool = True) -> dict:
    """Matmul FLOPs of one protege step (2 per multiply-add), per phase, from the actual buffer.

    Attention counts 4 * heads * head_dim per (query, key) pair and layer (QK^T and PV, every pair of
    the padded square, as sdpa computes it); its backward counts twice its forward (dQ, dK, dV, dP).
    - generate: per generation call of `gen_rows` rows, the prefill of the left-padded prompts (lm_head
      on the last position only), then one decode step per step t = 1 .. longest completion - 1: HF
      generate (`engine="hf"`) runs every row of the call until the last one stops, the lean engine
      only the rows still running (those with more than t tokens), each attending to width + t keys.
    - teacher: one padded forward of all rows + the lm_head on the completion positions.
    - train: per micro-batch (rows sorted by length, padded), the student forward + backward (3x the
      forward) and the fused loss's four vocabulary matmuls per completion token (student logits,
      teacher logits from its hidden states, the hidden-state and weight gradients).
    - recompute: what gradient checkpointing runs again during the backward, not part of `train`:
      torch's non-reentrant checkpoint stops recomputing once the tensors the backward needs are back,
      so each layer's forward without its last matmul (down_proj, whose output nothing saves).
    tests/test_bench_flops.py checks these counts against every matmul and sdpa call of a real step."""
    p_lens = [len(p) for p in buffer.prompt_ids]
    c_lens = buffer.completion_mask.sum(1).tolist()
    n_tok = sum(c_lens)
    v, h = s_cfg.vocab_size, s_cfg.hidden_size
    head = v * h
    s_lin, t_lin = linear_params(s_cfg) * s_cfg.num_hidden_layers, linear_params(t_cfg) * t_cfg.num_hidden_layers
    s_att = 4 * s_cfg.num_attention_heads * (h // s_cfg.num_attention_heads) * s_cfg.num_hidden_layers  # x context
    t_att = 4 * t_cfg.num_attention_heads * (t_cfg.hidden_size // t_cfg.num_attention_heads) * t_cfg.num_hidden_layers
    gen = gen_hf = prefill = decode_tokens = 0  # gen_hf: the same rows through HF generate (TRL's estimate below)
    order = sorted(range(len(p_lens)), key=lambda i: -p_lens[i])
    for s in range(0, len(order), gen_rows):
        rows = order[s:s + gen_rows]
        width, steps = max(p_lens[i] for i in rows), max(c_lens[i] for i in rows)
        prefill += len(rows) * width * (2 * s_lin + s_att * width) + len(rows) * 2 * head
        for t in range(1, steps):
            live = len(rows) if engine == "hf" else sum(c_lens[i] > t for i in rows)
            gen += live * (2 * (s_lin + head) + s_att * (width + t))
            gen_hf += len(rows) * (2 * (s_lin + head) + s_att * (width + t))
            decode_tokens += live
    gen, gen_hf = gen + prefill, gen_hf + prefill
    seq = max(p + c for p, c in zip(p_lens, c_lens))
    teacher = len(p_lens) * seq * (2 * t_lin + t_att * seq) + n_tok * 2 * head
    order = sorted(range(len(p_lens)), key=lambda i: p_lens[i] + c_lens[i])
    train = recompute = 0
    last_matmul = h * s_cfg.intermediate_size * s_cfg.num_hidden_layers  # down_proj of every layer
    for s in range(0, len(order), mb):
        rows = order[s:s + mb]
        seq = max(p_lens[i] + c_lens[i] for i in rows)
        train += 3 * len(rows) * seq * (2 * s_lin + s_att * seq)
        train += sum(c_lens[i] for i in rows) * 2 * head * 4
        recompute += len(rows) * seq * (2 * (s_lin - last_matmul) + s_att * seq) if checkpointing else 0
    # TRL 1.16 on the same rows (estimate): same generation; per row (micro-batch 1) prompts left-padded to the
    # longest prompt and completions right-padded to the longest completion of the generation batch; student
    # forward + backward (+1 forward with gradient checkpointing); teacher forward; chunked loss over every padded
    # completion position: student and teacher lm_head forward, both again in backward, two gradient matmuls.
    width, c_max = max(p_lens) + max(c_lens), max(c_lens)
    trl_row = len(p_lens) * (width * (2 * t_lin + t_att * width) + c_max * 2 * head * 6)
    trl = {"trl_gc": gen_hf + trl_row + len(p_lens) * 4 * width * (2 * s_lin + s_att * width),
           "trl_nogc": gen_hf + trl_row + len(p_lens) * 3 * width * (2 * s_lin + s_att * width)}
    return {"generate": gen, "teacher": teacher, "train": train, "tokens": n_tok, "decode_steps_rows": decode_tokens,
            "prefill": prefill, "recompute": recompute, **trl,
            "prompt_tokens": sum(p_lens), "student_bytes": (s_lin + head) * 4,
            "decode_steps": max(c_lens) - 1}  # forward passes after the prefill


def peak_rate(rates) -> float:
    """The best fp32 matmul rate measured in this run, FLOP/s: the FLOP bound's rate."""
    return max(rates[k] for k in ("fp32_square_2048", "fp32_square_1024", "fp32_square_512",
                                  "fp32_train_mlp_800x576x1536")) * 1e9


def floors(profile, rates) -> dict:
    """Each phase's floor in CPU seconds, from this run's rates: generate = the larger of its FLOP bound and
    the prefill's FLOPs plus every decode step streaming the student's weights at the measured read rate;
    teacher = its FLOP bound; train = its FLOP bound plus gradient checkpointing's recomputation (which the
    memory target needs). `nogc` is the train floor without the recomputation."""
    fl, peak = profile["flops"], peak_rate(rates)
    stream = fl["decode_steps"] * fl["student_bytes"] / (rates["read_gb_s"] * 1e9)
    out = {"generate": max(fl["generate"] / peak, fl["prefill"] / peak + stream), "teacher": fl["teacher"] / peak,
           "train": (fl["train"] + fl["recompute"]) / peak, "train_nogc": fl["train"] / peak, "stream": stream}
    out["step"] = out["generate"] + out["teacher"] + out["train"]
    out["step_nogc"] = out["step"] - out["train"] + out["train_nogc"]
    return out
