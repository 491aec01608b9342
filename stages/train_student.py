"""DVC stage `train_student`: distil the student from the stored soft labels (`student.*`, `seed`).

Distributed training as in train_teacher (`distributed.nproc`, or under torchrun).

    python -m stages.train_student --params params.yaml --prepared data/prepared \
        --soft-labels data/soft_labels --model models/student.pt --history reports/train/student.csv \
        --receipt reports/runs/train_student.json
"""

from pathlib import Path

from distill import distributed, training
from distill.config import load_params
from stages.common import cli_main, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    parser.add_argument("--soft-labels", required=True, help="soft-label directory")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "student": params.student.model_dump(),
                  "distributed": params.distributed.model_dump(), "runtime": params.runtime.model_dump()}
        with distributed.stage_run(world, "train_student", params.tracking, logged, args.receipt) as run:
            job = training.TrainJob(params.student, params.seed, "student", on_epoch=run.log_epoch, world=world,
                                     precision=params.runtime.precision)
            out = training.Outputs(Path(args.model), Path(args.history), {"mlflow_run_id": run.run_id})
            result = training.train_student(job, args.prepared, args.soft_labels, out, params.resume)
            lineage = result["soft_labels"]
            run.set_tags({"distill.teacher_run_id": lineage["teacher_run_id"],
                          "distill.soft_labels_run_id": lineage["soft_labels_run_id"]})
            # the folder; the digest is provenance.json's, which lists every shard's sha256
            run.log_dataset(Path(args.soft_labels), "soft_labels", lineage["soft_labels_sha256"],
                            context="training")
            run.log_training(result, args.model, mlflow_model=True)
        return result

    return distributed.run_stage(params.distributed, params.runtime, "stages.train_student", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
