"""Tool-call parsing (protege.agents.parse) and the ToolEnv adapter with a real calculator (protege.agents.env)."""

import time

import pytest
from agent_envs import calculator, exact_answer, no_docstring

from protege.config.env import EnvConfig
from protege.agents.env import ToolEnv, import_object, make_env_factory, tool_schema
from protege.agents.parse import parse_tool_calls


@pytest.mark.parametrize("text", [
    'Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>',
    '<|python_tag|>{"name": "calculator", "parameters": {"expression": "12*7"}}',
    '{"name": "calculator", "arguments": "{\\"expression\\": \\"12*7\\"}"}',
    'I will call {"name": "calculator", "arguments": {"expression": "12*7"}} now',
])
def test_formats_give_the_same_call(text):
    (call,) = parse_tool_calls(text)
    assert (call.name, call.arguments, call.error) == ("calculator", {"expression": "12*7"}, None)


def test_several_calls_and_no_call():
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call> and <tool_call>{"name": "b", "arguments": {"x": 1}}'
    assert [(c.name, c.arguments) for c in parse_tool_calls(two)] == [("a", {}), ("b", {"x": 1})]
    assert parse_tool_calls("The answer is {84}.") == []
    assert parse_tool_calls("plain answer: 84") == []


@pytest.mark.parametrize("text", ['<tool_call>{"name": calculator}</tool_call>', '{"name": "calc", "arguments": [1]}',
                                  '<tool_call>["calculator"]</tool_call>', 'call {"name": "calc", "arguments": {'])
def test_malformed_calls_are_errors_not_exceptions(text):
    calls = parse_tool_calls(text)
    assert len(calls) == 1 and calls[0].error


def test_parsing_is_bounded_on_hostile_text():
    start = time.perf_counter()
    for text in ("{" * 200_000, '{"name"' * 50_000, "<tool_call>" * 50_000, '{"a":' * 30_000):
        parse_tool_calls(text)
    assert time.perf_counter() - start < 5.0


def test_tool_env_computes_and_sends_errors_back():
    env = ToolEnv([calculator])
    assert env.tools[0]["function"]["name"] == "calculator"
    assert env.reset({"messages": []}) == []
    ok = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "(17+4)*3"}}</tool_call>')
    assert ok.messages == [{"role": "tool", "name": "calculator", "content": "63"}] and not ok.done
    assert ok.info == {"tool_calls": 1, "invalid_calls": 0, "tool_errors": 0}
    raised = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>')
    assert raised.messages[0]["content"].startswith("error: calculator raised ZeroDivisionError")
    assert raised.info["tool_errors"] == 1 and raised.info["invalid_calls"] == 0
    for bad in ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>',
                '<tool_call>{"name": "search", "arguments": {}}</tool_call>', '<tool_call>{oops</tool_call>'):
        r = env.step(bad)
        assert r.messages[0]["content"].startswith("error:") and r.info == {"tool_calls": 1, "invalid_calls": 1,
                                                                            "tool_errors": 1}, bad
    final = env.step("The answer is 63.")
    assert final.done and final.messages == []


def test_reward_of_the_final_answer():
    env = ToolEnv([calculator], exact_answer)
    env.reset({"messages": [], "answer": 63})
    assert env.step("It is 63.").reward == 1.0
    assert env.step("It is 64.").reward == 0.0


def test_a_tool_without_schema_is_one_clear_error():
    with pytest.raises(ValueError, match="tool no_docstring: no usable JSON schema.*docstring"):
        tool_schema(no_docstring)
    with pytest.raises(ValueError, match="tool no_docstring"):
        make_env_factory(EnvConfig(tools=["agent_envs:no_docstring"]))


def test_import_errors_name_the_path_and_the_fix():
    with pytest.raises(ValueError, match=r"env.class='nopkg_xyz.envs:Maze': cannot import module 'nopkg_xyz.envs'.*"
                                         "PYTHONPATH"):
        make_env_factory(EnvConfig(**{"class": "nopkg_xyz.envs:Maze"}))
    with pytest.raises(ValueError, match="has no 'Maze'"):
        import_object("agent_envs:Maze", "env.class")
    with pytest.raises(ValueError, match="not an import path"):
        import_object("Maze", "env.class")
    env = make_env_factory(EnvConfig(**{"class": "agent_envs:TaskEnv", "args": {"turns": 5}}))()
    assert env.turns == 5


def test_env_config_needs_one_kind():
    with pytest.raises(ValueError, match="exactly one of env.class"):
        EnvConfig()
    with pytest.raises(ValueError, match="exactly one of env.class"):
        EnvConfig(**{"class": "a:B", "tools": ["a:f"]})
