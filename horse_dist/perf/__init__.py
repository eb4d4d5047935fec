"""Performance accounting for the bench jobs: FLOP counts of a meta-step and of an edit call."""
