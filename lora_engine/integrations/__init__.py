"""Integrations with existing training stacks (PEFT, transformers)."""
