"""Agents that read a run and act on it: the Feedback-Agent (which lever next), the Meta-Agent
(how to rewrite the harness). Import from the submodules; this package imports nothing."""
