"""The layout of a run directory (``training.output_dir``): what is written where, by whom, read back by whom.

mrpo_config.yaml     the resolved config                      written by train, read by report / evaluate
metrics.jsonl        one JSON object per Trainer log line     train; report
diagnostics.jsonl    live warnings, one per condition         train (trainer.DiagnosticsCallback); report
data_summary.json    rows read, pairs used, drops             train; report
eval_results.json    held-out metrics                         evaluate; report
inspect.json         the reference audit                      inspect; report
suspect_pairs.jsonl  pairs the references contradict          inspect
checkpoint-N/        Trainer checkpoints                      train (--resume reads them)
final/               the trained model or adapter             train; evaluate
merged/              LoRA merged into the base (optional)     train
report.md, *.png     the report                               report
"""

CONFIG_FILE = "mrpo_config.yaml"
METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
DATA_SUMMARY_FILE = "data_summary.json"
EVAL_RESULTS_FILE = "eval_results.json"
INSPECT_FILE = "inspect.json"
SUSPECTS_FILE = "suspect_pairs.jsonl"
FINAL_DIR = "final"
MERGED_DIR = "merged"
REPORT_FILE = "report.md"
