"""DVC stage `train_baseline`: the student trained on hard labels only, for comparison.

Same architecture, seed and budget as the distilled student; it reads every
`student.*` key except the distillation ones (temperature, alpha). Distributed
training as in train_teacher.

    python -m stages.train_baseline --params params.yaml --prepared data/prepared \
        --model models/baseline.pt --history reports/train/baseline.csv --receipt reports/runs/train_baseline.json
"""

from distill import distributed, training
from distill.cli import cli_main, training_parser
from distill.config import DISTILLATION_KEYS, load_params


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    args = parser.parse_args(argv)
    params = load_params(args.params)

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "student": params.student.model_dump(exclude=set(DISTILLATION_KEYS)),
                  "distributed": params.distributed.model_dump()}
        with distributed.stage_run(world, "train_baseline", params.tracking, logged, args.receipt) as run:
            result = training.train_on_labels(params.student, params.seed, args.prepared, args.model, args.history,
                                              name="baseline", on_epoch=run.log_epoch,
                                              info={"mlflow_run_id": run.run_id}, resume=params.resume, world=world)
            run.log_training(result, args.model)
        return result

    return distributed.run_stage(params.distributed, "stages.train_baseline", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
