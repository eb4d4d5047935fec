"""Edits as a user sees them: greedy generation from the edited LM and the scores read off its text."""
