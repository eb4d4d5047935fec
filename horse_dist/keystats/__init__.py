"""Key statistics of locate-then-edit methods: C0 = K0 K0ᵀ per edited module over a text corpus (issue 6).

    python -m horse_dist.keystats [--config FILE] model.source=smollm2-135m keystats.num_workers=2 ...

`load_or_compute_stats(cfg, model_source, module_names)` returns {module name: KeyStats}, cached by content
hash under keystats.cache_dir (see job.py for the layout, resume and provenance).
"""

from horse_dist.keystats.accumulate import KeyStats, accumulate_texts
from horse_dist.keystats.corpus import Corpus, Shard, build_corpus, plan_shards
from horse_dist.keystats.job import JobReport, load_or_compute_stats, load_stats_file, run_job

__all__ = [
    "Corpus",
    "JobReport",
    "KeyStats",
    "Shard",
    "accumulate_texts",
    "build_corpus",
    "load_or_compute_stats",
    "load_stats_file",
    "plan_shards",
    "run_job",
]
