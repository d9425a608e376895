"""Multi-turn rollouts (protege.agents.rollout): the loss mask token by token on real chat templates with tool
calling (SmolLM2's, a Qwen-style and a Llama-3.1-style one), the first observation kept (TRL #6067), every turn
trained (not only the last: TRL GKD #2732, ms-swift #7838), limits and finish reasons, raising and hanging
environments. The policy is a scripted one over real token ids (ScriptedEngine); the engine-level test with a
real model is in test_agents_train.py."""

import copy
import time

import pytest
import torch
from agent_envs import calculator
from transformers.utils import get_json_schema

from protege.config.env import EnvConfig
from protege.agents.rollout import AgentRollouts
from protege.agents.template import check_prefix_template, render
from protege.data import Example
from protege.modeling import load_tokenizer
from protege.records import Rollouts
from protege.rollout.base import Sampling

QWEN = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "Call a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA = (
    "<|begin_of_text|>{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "Respond with a JSON function call {\"name\": ..., \"parameters\": ...}.{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}<|eot_id|>{%- endif %}{%- for m in messages %}<|start_header_id|>"
    "{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
THINK_STRIPPING = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{%- if m.role == 'assistant' and not loop.last %}"
    "{{ m.content.split('</think>')[-1] }}{%- else %}{{ m.content }}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CALL = {"smollm2": '<tool_call>{"name": "calculator", "arguments": {"expression": "(17+4)*3"}}</tool_call>',
        "qwen": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "(17+4)*3"}}\n</tool_call>',
        "llama": '{"name": "calculator", "parameters": {"expression": "(17+4)*3"}}'}


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2")


def styled(smol, style: str):
    """(tokenizer, eos id) of a chat-template style, on SmolLM2's vocabulary."""
    tok = copy.deepcopy(smol)
    if style == "qwen":
        tok.chat_template = QWEN
    elif style == "llama":
        tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                             "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]})
        tok.chat_template = LLAMA
        return tok, tok.convert_tokens_to_ids("<|eot_id|>")
    return tok, tok.convert_tokens_to_ids("<|im_end|>")


class ScriptedEngine:
    """A deterministic policy over real token ids (the RolloutEngine protocol): it answers script(prompt text);
    each sampled id's 'logprob' is -(its position + 1) / 10, so tests can tell sampled positions apart."""

    def __init__(self, tok, eos_id: int, script):
        self.tok, self.eos_id, self.script, self.calls = tok, eos_id, script, []

    def generate(self, prompt_ids, sampling: Sampling, *, source: str = "student") -> Rollouts:
        self.calls.append([p.tolist() for p in prompt_ids])
        comps, lps, finish = [], [], []
        for p in prompt_ids:
            ids = self.tok.encode(self.script(self.tok.decode(p.tolist())), add_special_tokens=False) + [self.eos_id]
            finish.append("stop" if len(ids) <= sampling.max_new_tokens else "length")
            ids = ids[: sampling.max_new_tokens]
            comps.append(torch.tensor(ids))
            lps.append(-(torch.arange(len(ids), dtype=torch.float32) + 1) / 10)
        return Rollouts.from_samples(list(prompt_ids), comps, lps, finish, source)


def calculator_policy(call: str):
    return lambda prompt: "The answer is 63." if "63" in prompt.split("Compute")[-1] else call


def expected(tok, eos_id, conversation, prompt_len, tools):
    """Independent expectation: the completion is the full conversation's rendering after the prompt (to the last
    end-of-turn id), and the student sampled exactly each assistant message's content ids + its end-of-turn id,
    starting where the template's prefix up to that message (with the assistant header) ends."""
    full = render(tok, conversation, tools, add_generation_prompt=False)
    last = max(i for i, x in enumerate(full) if x == eos_id)
    ids = full[prompt_len: last + 1]
    mask = [False] * len(ids)
    for i, m in enumerate(conversation):
        if m["role"] == "assistant":
            start = len(render(tok, conversation[:i], tools, add_generation_prompt=True)) - prompt_len
            n = len(tok.encode(m["content"], add_special_tokens=False)) + 1
            assert ids[start + n - 1] == eos_id
            mask[start: start + n] = [True] * n
    return ids, mask


def runner(tok, eos_id, turns="all", **limits):
    cfg = EnvConfig(tools=["agent_envs:calculator"], reward="agent_envs:exact_answer", **limits)
    return AgentRollouts(cfg, tok, (eos_id,), turns=turns)


@pytest.mark.parametrize("style", ["smollm2", "qwen", "llama"])
def test_mask_token_by_token_on_real_templates(smol, style):
    tok, eos_id = styled(smol, style)
    question = [{"role": "user", "content": "Compute (17+4)*3 with the calculator."}]
    engine = ScriptedEngine(tok, eos_id, calculator_policy(CALL[style]))
    agents = runner(tok, eos_id)
    out = agents.rollout(engine, [Example(question, columns={"answer": 63})], Sampling(max_new_tokens=64))
    conversation = question + [{"role": "assistant", "content": CALL[style]},
                               {"role": "tool", "name": "calculator", "content": "63"},
                               {"role": "assistant", "content": "The answer is 63."}]
    tools = [get_json_schema(calculator)]
    prompt = render(tok, question, tools, add_generation_prompt=True)
    assert out.prompt_ids[0].tolist() == prompt
    if style != "smollm2":  # SmolLM2's template does not show tools
        assert '"name": "calculator"' in tok.decode(prompt)
    n = int(out.completion_mask[0].sum())
    got, got_mask = out.completion_ids[0, :n].tolist(), out.loss_mask[0, :n].tolist()
    # the text of prompt + completion is the template's rendering of the whole conversation (to the last turn's end)
    text = tok.apply_chat_template(conversation, tools=tools, tokenize=False)
    eos_text = tok.convert_ids_to_tokens(eos_id)
    assert tok.decode(prompt + got) == text[: text.rindex(eos_text) + len(eos_text)]
    # the sampled runs are exactly the assistant messages, each with its end-of-turn id
    runs, run = [], []
    for x, m in zip(got + [None], got_mask + [False]):
        if m:
            run.append(x)
        elif run:
            runs, run = runs + [run], []
    assert runs == [tok.encode(m["content"], add_special_tokens=False) + [eos_id] for m in conversation
                    if m["role"] == "assistant"]
    if style != "llama":  # a vocabulary that tokenizes the template's glue the same alone and in context
        ids, mask = expected(tok, eos_id, conversation, len(prompt), tools)
        assert got == ids
        assert got_mask == mask  # token by token: both turns trained, the tool output not
    mask = got_mask
    assert out.train_mask.sum() == sum(mask) and out.num_tokens == sum(mask)
    lps = out.sampling_logprobs[0, :n]
    assert (lps[~out.loss_mask[0, :n]] == 0).all() and (lps[out.loss_mask[0, :n]] < 0).all()
    turn0 = len(tok.encode(CALL[style], add_special_tokens=False)) + 1
    assert lps[:turn0].tolist() == pytest.approx((-(torch.arange(turn0) + 1) / 10).tolist())
    assert out.turn_index[0, :n].tolist() == [0] * mask.index(True, turn0) + [1] * (n - mask.index(True, turn0))
    ep = out.episodes[0]
    assert (ep["turns"], ep["finish"], ep["reward"], ep["tool_calls"], ep["tool_errors"]) == (2, "env_done", 1.0, 1, 0)
    assert len(engine.calls) == 2  # one generate call per turn
    assert engine.calls[1][0] == prompt + got[: mask.index(True, turn0)]  # turn 2 saw exactly the ids so far


def test_loss_turns_last_masks_earlier_turns(smol):
    tok, eos_id = styled(smol, "smollm2")
    question = [{"role": "user", "content": "Compute (17+4)*3 with the calculator."}]
    out_all, out_last = (runner(tok, eos_id, turns=t).rollout(ScriptedEngine(tok, eos_id, calculator_policy(
        CALL["smollm2"])), [Example(question)], Sampling(max_new_tokens=64)) for t in ("all", "last"))
    assert torch.equal(out_all.completion_ids, out_last.completion_ids)
    last = out_all.turn_index == 1
    assert torch.equal(out_last.loss_mask, out_all.loss_mask & last)
    assert (out_all.loss_mask & ~last).any()  # the default trains the first turn too


def test_the_first_observation_is_in_the_prompt(smol):
    """TRL #6067: the environment's reset observation (the task) was dropped from the prompt."""
    tok, eos_id = styled(smol, "smollm2")
    cfg = EnvConfig(**{"class": "agent_envs:TaskEnv", "args": {"turns": 3}})
    engine = ScriptedEngine(tok, eos_id, lambda p: "one two three")
    row = Example([{"role": "user", "content": "Hello."}], columns={"task": "T-17"})
    out = AgentRollouts(cfg, tok, (eos_id,)).rollout(engine, [row], Sampling(max_new_tokens=16))
    with_task = row.messages + [{"role": "user", "content": "Task T-17: count to three."}]
    assert out.prompt_ids[0].tolist() == render(tok, with_task, None, add_generation_prompt=True)
    assert "Task T-17" in tok.decode(engine.calls[0][0])
    ep = out.episodes[0]
    assert (ep["turns"], ep["finish"], ep["reward"]) == (3, "env_done", 1.0)
    assert out.loss_mask[0].sum() == 3 * len(tok.encode("one two three", add_special_tokens=False)) + 3


def test_limits_and_finish_reasons(smol):
    tok, eos_id = styled(smol, "smollm2")
    q = [Example([{"role": "user", "content": "Compute (17+4)*3 with the calculator."}])]
    always_call = ScriptedEngine(tok, eos_id, lambda p: CALL["smollm2"])
    out = runner(tok, eos_id, max_turns=3).rollout(always_call, q, Sampling(max_new_tokens=64))
    assert out.episodes[0]["finish"] == "max_turns" and out.episodes[0]["turns"] == 3
    assert out.episodes[0]["turn_finish"] == ["stop", "stop", "max_turns"]
    short = runner(tok, eos_id, max_tokens_per_turn=5).rollout(always_call, q, Sampling(max_new_tokens=64))
    assert short.episodes[0]["finish"] == "length" and int(short.completion_mask.sum()) == 5
    prompt = len(render(tok, q[0].messages, None, add_generation_prompt=True))
    tight = runner(tok, eos_id, max_total_tokens=prompt + 40).rollout(always_call, q, Sampling(max_new_tokens=64))
    assert tight.episodes[0]["finish"] == "context_overflow"
    assert len(tight.prompt_ids[0]) + int(tight.completion_mask.sum()) <= prompt + 40
    long_out = runner(tok, eos_id, tool_output_max_tokens=1).rollout(
        ScriptedEngine(tok, eos_id, lambda p: CALL["smollm2"].replace("(17+4)*3", "123456789*987654321")), q,
        Sampling(max_new_tokens=64))
    assert long_out.episodes[0]["truncated_outputs"] >= 1
    assert "...[truncated]" in tok.decode(long_out.completion_ids[0].tolist())


def test_a_bad_tool_call_is_a_tool_error_sent_back(smol):
    tok, eos_id = styled(smol, "smollm2")
    engine = ScriptedEngine(tok, eos_id, lambda p: "fine" if "error:" in p else '<tool_call>{"name": 1}</tool_call>')
    out = runner(tok, eos_id).rollout(engine, [Example([{"role": "user", "content": "Go."}])],
                                      Sampling(max_new_tokens=64))
    ep = out.episodes[0]
    assert (ep["turn_finish"], ep["invalid_calls"], ep["tool_errors"], ep["finish"]) == (
        ["tool_error", "env_done"], 1, 1, "env_done")


@pytest.mark.parametrize("kind", ["RaisingEnv", "HangingEnv"])
def test_raising_and_hanging_environments_end_their_row_only(smol, kind, caplog):
    tok, eos_id = styled(smol, "smollm2")
    engine = ScriptedEngine(tok, eos_id, lambda p: "ok")
    rows = [Example([{"role": "user", "content": "Hi."}], columns={"task": i}) for i in range(3)]
    agents = AgentRollouts(EnvConfig(**{"class": f"agent_envs:{kind}"}, timeout_s=0.3, max_turns=3), tok, (eos_id,))
    start = time.perf_counter()
    out = agents.rollout(engine, rows, Sampling(max_new_tokens=8))
    assert time.perf_counter() - start < 1.4  # the rows' calls ran concurrently and were abandoned at the timeout
    assert [e["finish"] for e in out.episodes] == ["env_error"] * 3 and agents.env_errors == 3
    assert all(e["turns"] == 1 and e["error"].startswith("step: ") for e in out.episodes)
    assert out.loss_mask.sum() == 3 * 2  # each row's sampled turn is still trained
    assert "the episode ends with env_error" in caplog.text
    agents.close()


def test_a_template_that_rewrites_earlier_turns_is_refused(smol):
    tok = copy.deepcopy(smol)
    tok.chat_template = THINK_STRIPPING
    with pytest.raises(ValueError, match="does not keep earlier turns as a prefix.*Tinker"):
        check_prefix_template(tok, (tok.convert_tokens_to_ids("<|im_end|>"),))
    check_prefix_template(smol, (tok.convert_tokens_to_ids("<|im_end|>"),))


def test_guided_turns_are_the_teachers_and_masked_out(smol):
    """mix.teacher_turns: a turn generated by the teacher engine stays in the trajectory, out of the loss; the
    probability decays linearly to 0."""
    tok, eos_id = styled(smol, "smollm2")
    student = ScriptedEngine(tok, eos_id, lambda p: "student says hi")
    teacher = ScriptedEngine(tok, eos_id, lambda p: "TEACHER speaks")
    cfg = EnvConfig(**{"class": "agent_envs:TaskEnv", "args": {"turns": 3}})
    agents = AgentRollouts(cfg, tok, (eos_id,), guide=(0.5, 10), seed=3)
    assert [agents.teacher_turn_probability(s) for s in (0, 5, 10, 20)] == [0.5, 0.25, 0.0, 0.0]
    rows = [Example([{"role": "user", "content": "Hi."}], columns={"task": i}) for i in range(8)]
    out = agents.rollout(student, rows, Sampling(max_new_tokens=16), step=0, teacher_engine=teacher)
    t_ids = tok.encode("TEACHER speaks", add_special_tokens=False) + [eos_id]
    s_ids = tok.encode("student says hi", add_special_tokens=False) + [eos_id]
    guided = sum(e["teacher_turns"] for e in out.episodes)
    assert 0 < guided < 24 and len(teacher.calls) > 0
    for i, e in enumerate(out.episodes):
        n = int(out.completion_mask[i].sum())
        ids, mask = out.completion_ids[i, :n].tolist(), out.loss_mask[i, :n].tolist()
        trained = [x for x, m in zip(ids, mask) if m]
        assert trained == s_ids * (3 - e["teacher_turns"])  # exactly the student's turns are trained
        text = tok.decode(ids)
        assert text.count("TEACHER speaks") == e["teacher_turns"] and text.count("student says hi") == 3 - e[
            "teacher_turns"]
        assert all(out.sampling_logprobs[i, j] == 0 for j in range(n) if not mask[j])
    assert t_ids != s_ids
    late = agents.rollout(student, rows, Sampling(max_new_tokens=16), step=10, teacher_engine=teacher)
    assert sum(e["teacher_turns"] for e in late.episodes) == 0


def test_another_eos_than_the_templates_is_followed_by_the_templates_end_of_turn(smol):
    """SmolLM2 stops at <|endoftext|> or <|im_end|>; its template closes turns with <|im_end|>. A turn that ended
    with <|endoftext|> is followed by <|im_end|> (not trained), so the history is the one the template shows."""
    tok, im_end = styled(smol, "smollm2")
    other = tok.convert_tokens_to_ids("<|endoftext|>")
    engine = ScriptedEngine(tok, other, lambda p: "one two three")
    cfg = EnvConfig(**{"class": "agent_envs:TaskEnv", "args": {"turns": 2}})
    out = AgentRollouts(cfg, tok, (other, im_end)).rollout(engine, [Example([{"role": "user", "content": "Hi."}])],
                                                          Sampling(max_new_tokens=16))
    n = int(out.completion_mask[0].sum())
    ids, mask = out.completion_ids[0, :n].tolist(), out.loss_mask[0, :n].tolist()
    turn = len(tok.encode("one two three", add_special_tokens=False)) + 1
    assert ids[turn - 1] == other and mask[turn - 1] and ids[turn] == im_end and not mask[turn]
    assert tok.decode(ids[turn:]).startswith("<|im_end|>\n<|im_start|>user\ncontinue<|im_end|>\n<|im_start|>assistant\n")


def test_a_reset_that_raises_ends_that_row_before_its_first_turn(smol):
    tok, eos_id = styled(smol, "smollm2")
    engine = ScriptedEngine(tok, eos_id, lambda p: "ok")
    rows = [Example([{"role": "user", "content": "Hi."}], columns={"task": i}) for i in range(3)]
    agents = AgentRollouts(EnvConfig(**{"class": "agent_envs:BrokenResetEnv"}, max_turns=2), tok, (eos_id,))
    out = agents.rollout(engine, rows, Sampling(max_new_tokens=8))
    assert [e["finish"] for e in out.episodes] == ["max_turns", "env_error", "max_turns"]
    assert out.episodes[1]["turns"] == 0 and out.episodes[1]["error"].startswith("reset: KeyError")
    assert int(out.completion_mask[1].sum()) == 0 and agents.env_errors == 1
    assert [len(c) for c in engine.calls] == [2, 2]  # the broken row was never generated for
