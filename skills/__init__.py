"""pipefit's Agent Skill (``skills/pipefit``: SKILL.md and its references), shipped as package data."""
