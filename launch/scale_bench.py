"""Set-up at zsRE's full scale: a synthetic 155k-record MEND file, trained on as a user would.

    .venv/bin/python launch/scale_bench.py [--records 155000] [--workers 1] [--out outputs/scale]

Builds the file from the bundled head slice (each record repeated with a numbered subject, so that every
record's text is distinct), then runs `python -m horse_dist.train ... train.steps=1` three times in fresh
run folders: on the bundled slice (the baseline), on the big file with an empty token store (a first run)
and again (the store exists: a restart, a resume, another worker). Reports per run the seconds from launch
to the end of meta-step 1, the tokenising time, the peak RSS and the block-input cache's decision, and
writes them to <out>/scale.json. Works at any size (the suite runs it at 4,000 records).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAD = REPO / "data" / "zsre" / "zsre_mend_eval_head.json"
TAIL = REPO / "data" / "zsre" / "zsre_mend_eval_tail.json"
log = logging.getLogger("scale_bench")
TEXT_FIELDS = ("src", "rephrase", "cond")


def synthetic_file(records: int, path: Path) -> Path:
    """`records` MEND records: the head slice's, repeated with the subject numbered from its second copy."""
    head = json.loads(HEAD.read_text())
    rows = []
    for i in range(records):
        row, copy = dict(head[i % len(head)]), i // len(head)
        if copy:
            subject = f"{row['subject']} {copy}"
            row.update({k: row[k].replace(row["subject"], subject) for k in TEXT_FIELDS})
            row["subject"] = subject
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def timed_run(train_path: Path, out: Path, name: str, workers: int, extra: list[str]) -> dict:
    """One `python -m horse_dist.train` run to the end of meta-step 1, timed from launch."""
    args = [
        f"data.train_path={train_path}",
        f"data.eval_path={TAIL}",
        "train.steps=1",
        "train.eval_batches=1",
        "train.eval_live=false",
        "train.eval_untrained=false",
        "tracking.enabled=false",
        f"train.out_dir={out / 'runs'}",
        f"data.token_store={out / 'tokens'}",  # a store of its own: the first run tokenises
        f"train.run_name={name}",
        *(["dist.backend=ray", f"dist.num_workers={workers}"] if workers > 1 else []),
        *extra,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "horse_dist.train", *args],
        cwd=out,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    report: dict = {"run": name}
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "step 1/1" in line and "to_step_1_s" not in report:
            report["to_step_1_s"] = round(time.perf_counter() - started, 1)
        if match := re.search(r"tokenised (\d+) records into .* in ([\d.]+)s", line):
            report.setdefault("tokenise_s", []).append(float(match.group(2)))
        if "block-input cache" in line:
            report["block_cache"] = line.split("block-input cache", 1)[1].strip()
    if process.wait():
        sys.stderr.writelines(lines[-20:])
        raise SystemExit(f"{name}: horse_dist.train exited with {process.returncode}")
    results = json.loads((out / "runs" / name / "results.json").read_text())
    report["peak_rss_gb"] = round(results["peak_rss_gb"], 3)
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=155_000)
    parser.add_argument("--workers", type=int, default=1, help="1: local mode; more: Ray workers")
    parser.add_argument("--out", type=Path, default=Path("outputs/scale"))
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides for every run (e.g. model.source=...)"
    )
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = opts.out.resolve()
    if (out / "runs").exists():
        raise SystemExit(
            f"{out / 'runs'} exists: choose another --out (this benchmark needs fresh run folders)"
        )
    started = time.perf_counter()
    big = synthetic_file(opts.records, out / f"zsre_synthetic_{opts.records}.json")
    log.info("built %s (%d records) in %.1fs", big, opts.records, time.perf_counter() - started)
    reports = []
    for name, path in (("bundled", HEAD), ("first", big), ("stored", big)):
        reports.append(timed_run(path, out, name, opts.workers, opts.overrides))
        log.info("%s", json.dumps(reports[-1]))
    data_rss = reports[-1]["peak_rss_gb"] - reports[0]["peak_rss_gb"]
    summary = {
        "records": opts.records,
        "workers": opts.workers,
        "runs": reports,
        "data_rss_gb": round(data_rss, 3),
    }
    (out / "scale.json").write_text(json.dumps(summary, indent=1))
    log.info("peak RSS over the bundled slice's (the big pool's host memory): %.3f GiB", data_rss)


if __name__ == "__main__":
    main()
