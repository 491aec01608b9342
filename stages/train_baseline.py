"""DVC stage `train_baseline`: the student trained on hard labels only, for comparison.

Same architecture, seed and budget as the distilled student; it reads every
`student.*` key except the distillation ones (temperature, alpha).

    python -m stages.train_baseline --params params.yaml --prepared data/prepared \
        --model models/baseline.pt --history reports/train/baseline.csv
"""

from distill import training
from distill.cli import cli_main, stage_parser
from distill.config import load_params


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    parser.add_argument("--model", required=True, help="checkpoint to write")
    parser.add_argument("--history", required=True, help="per-epoch CSV to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    return training.train_on_labels(params.student, params.seed, args.prepared, args.model, args.history,
                                    name="baseline")


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
