"""Distribution: the World (collectives, layer ownership), the DeepSpeed-wrapped frozen LM and the Ray cluster.

- world.py         LocalWorld / TorchWorld: the only place collectives are called
- deepspeed_lm.py  frozen LM under DeepSpeed ZeRO stage 0 or 3 (weights loaded straight into shards)
- ray_cluster.py   attach to RAY_ADDRESS or start a local Ray (the Ray Train launcher of the training loop is
                   training/ray_trainer.py)

deepspeed and ray are imported inside the functions that use them (seconds each): importing the package is cheap.
"""

from horse_dist.dist.world import LocalWorld, TorchWorld

__all__ = ["LocalWorld", "TorchWorld"]
