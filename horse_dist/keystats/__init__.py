"""Key statistics of locate-then-edit methods: C0 = K0 K0ᵀ per edited module over a text corpus (issue 6).

    python -m horse_dist.keystats [--config FILE] model.source=smollm2-135m keystats.num_workers=2 ...

`load_or_compute_stats(cfg, model_source, module_names)` (keystats/job.py) returns {module name: KeyStats}, cached by content
hash under keystats.cache_dir (see job.py for the layout, resume and provenance).
"""
