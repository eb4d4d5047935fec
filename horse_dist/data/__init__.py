"""zsRE / CounterFact readers, tokenisation with pre-shifted labels, batching and deterministic sharding."""

from horse_dist.data.batching import (
    TokenBatch,
    collate,
    meta_batch_indices,
    micro_batch_plan,
    micro_batches,
    shard_slice,
    steps_per_epoch,
    train_eval_split,
)
from horse_dist.data.formats import FORMATS, TARGETS, detect_format, load_records, read_json
from horse_dist.data.records import DataFormatError, EditRecord, first_few, records_fingerprint
from horse_dist.data.tokenize import (
    IGNORE_INDEX,
    ContrastViews,
    TokenizedExample,
    TokenizedRecords,
    answer_stop_id,
    concat_records,
    overlong,
    select_records,
    tokenize_example,
    tokenize_examples,
    tokenize_records,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TARGETS",
    "ContrastViews",
    "DataFormatError",
    "EditRecord",
    "TokenBatch",
    "TokenizedExample",
    "TokenizedRecords",
    "collate",
    "detect_format",
    "first_few",
    "load_records",
    "read_json",
    "records_fingerprint",
    "meta_batch_indices",
    "micro_batch_plan",
    "micro_batches",
    "shard_slice",
    "steps_per_epoch",
    "train_eval_split",
    "answer_stop_id",
    "concat_records",
    "overlong",
    "select_records",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_records",
]
