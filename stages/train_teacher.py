"""DVC stage `train_teacher`: train the teacher from `teacher.*` and `seed`, select on val.

With `distributed.nproc` > 1, or started under torchrun, it trains on several
processes (distill/distributed.py); rank 0 writes the outputs.

    python -m stages.train_teacher --params params.yaml --prepared data/prepared \
        --model models/teacher.pt --history reports/train/teacher.csv --receipt reports/runs/train_teacher.json
"""

from distill import distributed, training
from distill.cli import cli_main, training_parser
from distill.config import load_params


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    args = parser.parse_args(argv)
    params = load_params(args.params)

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "teacher": params.teacher.model_dump(),
                  "distributed": params.distributed.model_dump()}
        with distributed.stage_run(world, "train_teacher", params.tracking, logged, args.receipt) as run:
            result = training.train_on_labels(params.teacher, params.seed, args.prepared, args.model, args.history,
                                              name="teacher", on_epoch=run.log_epoch,
                                              info={"mlflow_run_id": run.run_id}, resume=params.resume, world=world)
            run.log_training(result, args.model)
        return result

    return distributed.run_stage(params.distributed, "stages.train_teacher", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
