"""Meta-training of the hypernetwork editors: the engine (`EditEngine`: cache, predict, loss, meta-step), the
hypernetwork bank behind it, how a run config becomes an engine and data (assembly), checkpoints and the
validation score that selects among a run's editors."""
