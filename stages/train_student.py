"""DVC stage `train_student`: the student distilled from the stored soft labels (`student.*`, `seed`):
alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy, or the loss `student.loss` names.
Refuses soft labels made by another teacher, over other data, or with another tokenizer.

Distributed training as in train_teacher (`distributed.nproc`, or under torchrun).

    python -m stages.train_student --params params.yaml --prepared data/prepared \
        --soft-labels data/soft_labels --model models/student.pt --history reports/train/student.csv \
        --receipt reports/runs/train_student.json
"""

from pathlib import Path

from distill import distributed
from distill.task import TrainPaths
from stages.common import cli_main, fingerprint, logged, stage_params, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    parser.add_argument("--soft-labels", required=True, help="soft-label directory")
    args = parser.parse_args(argv)
    params, task = stage_params(args.params)
    paths = TrainPaths(Path(args.prepared), Path(args.model), Path(args.history), Path(args.soft_labels))
    record = logged("train_student", params, task)
    return distributed.run_training("train_student", task, params, paths, args.receipt, record, argv,
                                    fingerprint("train_student", record))


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
