"""Sequential (lifelong) editing: every method behind one `Editor` protocol, and the weight statistics a
stream reports (`python -m horse_dist.sequential`)."""
