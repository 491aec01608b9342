"""DVC stage `soft_labels`: the teacher's outputs over the training data, stored once as Parquet
shards (part-00000.parquet, ...) and one provenance.json (`soft_labels.*`).

Classification: raw logits per train and transfer row; language model: next-token targets at
every position of every train window (top-k, sampled or dense).

    python -m stages.soft_labels --params params.yaml --teacher models/teacher.pt \
        --prepared data/prepared --out data/soft_labels --receipt reports/runs/soft_labels.json
"""

from pathlib import Path

from stages.common import cli_main, open_run, stage_params, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    parser.add_argument("--out", required=True, help="soft-label directory to write")
    args = parser.parse_args(argv)
    params, task = stage_params(args.params)
    with open_run("soft_labels", params, task, args.receipt) as run:
        result = task.soft_labels(params, Path(args.teacher), Path(args.prepared), Path(args.out), run)
        run.set_tags({"distill.teacher_run_id": result["teacher_run_id"],
                      "distill.teacher_sha256": result["teacher_sha256"]})
    return result


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
