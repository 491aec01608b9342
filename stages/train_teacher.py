"""DVC stage `train_teacher`: the teacher, by `teacher.source`:

- train: trained here from `teacher.*` and `seed`, selected on val;
- pretrained: a Hugging Face folder `teacher.model` (a classifier: with a new head), fine-tuned
  on train, selected on val;
- checkpoint (classification): the file `teacher.model`, used as it is, scored on val.

With `distributed.nproc` > 1, or started under torchrun, it trains on several processes
(distill/distributed.py); rank 0 writes the outputs.

    python -m stages.train_teacher --params params.yaml --prepared data/prepared \
        --model models/teacher.pt --history reports/train/teacher.csv --receipt reports/runs/train_teacher.json
"""

from pathlib import Path

from distill import distributed
from distill.task import TrainPaths
from stages.common import cli_main, fingerprint, logged, stage_params, training_parser


def main(argv=None) -> dict:
    args = training_parser(__doc__).parse_args(argv)
    params, task = stage_params(args.params)
    paths = TrainPaths(Path(args.prepared), Path(args.model), Path(args.history))
    record = logged("train_teacher", params, task)
    return distributed.run_training("train_teacher", task, params, paths, args.receipt, record, argv,
                                    fingerprint("train_teacher", record))


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
