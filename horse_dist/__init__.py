"""horse_dist: distributed HORSE-family hypernetwork editing of LLMs."""
