"""DVC stage `train_teacher`: train the teacher from `teacher.*` and `seed`, select on val.

With `distributed.nproc` > 1, or started under torchrun, it trains on several
processes (distill/distributed.py); rank 0 writes the outputs.

    python -m stages.train_teacher --params params.yaml --prepared data/prepared \
        --model models/teacher.pt --history reports/train/teacher.csv --receipt reports/runs/train_teacher.json
"""

from pathlib import Path

from distill import distributed, training
from distill.config import load_params
from stages.common import cli_main, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    args = parser.parse_args(argv)
    params = load_params(args.params)

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "teacher": params.teacher.model_dump(),
                  "distributed": params.distributed.model_dump(), "runtime": params.runtime.model_dump()}
        with distributed.stage_run(world, "train_teacher", params.tracking, logged, args.receipt) as run:
            job = training.TrainJob(params.teacher, params.seed, "teacher", on_epoch=run.log_epoch, world=world,
                                     precision=params.runtime.precision)
            out = training.Outputs(Path(args.model), Path(args.history), {"mlflow_run_id": run.run_id})
            result = training.train_on_labels(job, args.prepared, out, params.resume)
            run.log_training(result, args.model)
        return result

    return distributed.run_stage(params.distributed, params.runtime, "stages.train_teacher", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
