"""DVC stage `soft_labels`: the teacher's raw logits over train + transfer, as Parquet shards
(part-00000.parquet, ...) and one provenance.json.

    python -m stages.soft_labels --params params.yaml --teacher models/teacher.pt \
        --prepared data/prepared --out data/soft_labels --receipt reports/runs/soft_labels.json
"""

from distill import device, softlabels, tracking
from distill.config import load_params
from stages.common import cli_main, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    parser.add_argument("--out", required=True, help="soft-label directory to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    where = device.resolve(params.runtime)  # a device that is not there: one sentence, before any work
    logged = {"soft_labels": params.soft_labels.model_dump(), "runtime": params.runtime.model_dump()}
    with tracking.stage_run("soft_labels", params.tracking, logged, args.receipt) as run:
        result = softlabels.dump(args.teacher, args.prepared, args.out, params.soft_labels, run_id=run.run_id,
                                 device=where, precision=params.runtime.precision)
        run.log_metrics({"rows": result["rows"], "bytes": result["bytes"], "shards": len(result["shards"]),
                         "bytes_per_row": result["bytes"] / max(result["rows"], 1)})
        run.set_tags({"distill.teacher_run_id": result["teacher_run_id"],
                      "distill.teacher_sha256": result["teacher_sha256"]})
    return result


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
