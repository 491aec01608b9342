"""DVC stage `train_baseline`: the student trained on hard labels only, for comparison.

Same architecture, seed and budget as the distilled student; it reads every
`student.*` key except the distillation ones (config.DISTILLATION_KEYS). Distributed
training as in train_teacher.

    python -m stages.train_baseline --params params.yaml --prepared data/prepared \
        --model models/baseline.pt --history reports/train/baseline.csv --receipt reports/runs/train_baseline.json
"""

from pathlib import Path

from distill import distributed, training
from distill.config import DISTILLATION_KEYS, load_params
from stages.common import cli_main, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    args = parser.parse_args(argv)
    params = load_params(args.params)

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "student": params.student.model_dump(exclude=set(DISTILLATION_KEYS)),
                  "distributed": params.distributed.model_dump(), "runtime": params.runtime.model_dump()}
        with distributed.stage_run(world, "train_baseline", params.tracking, logged, args.receipt) as run:
            job = training.TrainJob(params.student, params.seed, "baseline", on_epoch=run.log_epoch, world=world,
                                     precision=params.runtime.precision)
            out = training.Outputs(Path(args.model), Path(args.history), {"mlflow_run_id": run.run_id})
            result = training.train_on_labels(job, args.prepared, out, params.resume)
            run.log_training(result, args.model)
        return result

    return distributed.run_stage(params.distributed, params.runtime, "stages.train_baseline", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
