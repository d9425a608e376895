"""Multi-turn, tool-calling on-policy distillation: environments, tool calls, multi-turn rollouts (docs/agents.md)."""
