"""Distribution: the World (collectives, layer ownership), the DeepSpeed-wrapped frozen LM and the Ray launcher.

- world.py         LocalWorld / TorchWorld: the only place collectives are called
- deepspeed_lm.py  frozen LM under DeepSpeed ZeRO stage 0 or 3 (weights loaded straight into shards)
- ray_launch.py    Ray Train TorchTrainer, the worker entry and RayCheckpointStore

deepspeed and ray are imported lazily by those modules (seconds each); importing this package is cheap.
"""

from horse_dist.dist.world import LocalWorld, TorchWorld

__all__ = ["LocalWorld", "TorchWorld"]
