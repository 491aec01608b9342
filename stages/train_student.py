"""DVC stage `train_student`: distil the student from the stored soft labels (`student.*`, `seed`).

    python -m stages.train_student --params params.yaml --prepared data/prepared \
        --soft-labels data/soft_labels --model models/student.pt --history reports/train/student.csv
"""

from distill import training
from distill.cli import cli_main, stage_parser
from distill.config import load_params


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    parser.add_argument("--soft-labels", required=True, help="soft-label directory")
    parser.add_argument("--model", required=True, help="checkpoint to write")
    parser.add_argument("--history", required=True, help="per-epoch CSV to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    return training.train_student(params.student, params.seed, args.prepared, args.soft_labels, args.model, args.history)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
