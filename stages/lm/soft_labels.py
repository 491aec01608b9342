"""DVC stage `soft_labels` (language model): the teacher's next-token targets at every position of
every train window (`soft_labels.targets`: top_k, sampled or dense), as Parquet shards and one
provenance.json.

    python -m stages.lm.soft_labels --params params.yaml --teacher models/teacher.pt \
        --prepared data/prepared --out data/soft_labels --receipt reports/runs/soft_labels.json
"""

from distill import device, lm_soft_labels, tracking
from distill.config import load_params
from stages.common import cli_main, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    parser.add_argument("--out", required=True, help="soft-label directory to write")
    args = parser.parse_args(argv)
    params = load_params(args.params, task="language_model")
    where = device.resolve(params.runtime)
    logged = {"soft_labels": params.soft_labels.model_dump(), "runtime": params.runtime.model_dump()}
    with tracking.stage_run("soft_labels", params.tracking, logged, args.receipt) as run:
        result = lm_soft_labels.dump(args.teacher, args.prepared, args.out, params.soft_labels, run_id=run.run_id,
                                     device=where, precision=params.runtime.precision)
        run.log_metrics({"windows": result["rows"], "bytes": result["bytes"], "shards": len(result["shards"]),
                         "bytes_per_token": result["bytes_per_token"]})
        run.set_tags({"distill.teacher_run_id": result["teacher_run_id"],
                      "distill.teacher_sha256": result["teacher_sha256"]})
    return result


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
