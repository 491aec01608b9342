"""DVC stage `train_student`: distil the student from the stored soft labels (`student.*`, `seed`).

    python -m stages.train_student --params params.yaml --prepared data/prepared \
        --soft-labels data/soft_labels --model models/student.pt --history reports/train/student.csv \
        --receipt reports/runs/train_student.json
"""

from pathlib import Path

from distill import softlabels, tracking, training
from distill.cli import cli_main, training_parser
from distill.config import load_params


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    parser.add_argument("--soft-labels", required=True, help="soft-label directory")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    logged = {"seed": params.seed, "student": params.student.model_dump()}
    with tracking.stage_run("train_student", params.tracking, logged, args.receipt) as run:
        result = training.train_student(params.student, params.seed, args.prepared, args.soft_labels, args.model,
                                        args.history, on_epoch=run.log_epoch, info={"mlflow_run_id": run.run_id},
                                        resume=params.resume)
        lineage = result["soft_labels"]
        run.set_tags({"distill.teacher_run_id": lineage["teacher_run_id"],
                      "distill.soft_labels_run_id": lineage["soft_labels_run_id"]})
        run.log_dataset(Path(args.soft_labels) / softlabels.FILE_NAME, "soft_labels",
                        lineage["soft_labels_sha256"], context="training")
        run.log_training(result, args.model, mlflow_model=True)
    return result


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
