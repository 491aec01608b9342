"""DVC stage `train_baseline`: the student trained on the labels only, for comparison.

Same architecture, seed and optimizer steps as the distilled student; it reads every `student.*` key
except the task's distillation ones (the task's `distillation_keys`). Distributed training as
in train_teacher.

    python -m stages.train_baseline --params params.yaml --prepared data/prepared \
        --model models/baseline.pt --history reports/train/baseline.csv --receipt reports/runs/train_baseline.json
"""

from pathlib import Path

from distill import distributed
from distill.task import TrainPaths
from stages.common import cli_main, fingerprint, logged, stage_params, training_parser


def main(argv=None) -> dict:
    args = training_parser(__doc__).parse_args(argv)
    params, task = stage_params(args.params)
    paths = TrainPaths(Path(args.prepared), Path(args.model), Path(args.history))
    record = logged("train_baseline", params, task)
    return distributed.run_training("train_baseline", task, params, paths, args.receipt, record, argv,
                                    fingerprint("train_baseline", record))


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
