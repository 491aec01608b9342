"""DVC stage `soft_labels`: the teacher's raw logits over train + transfer, as Parquet.

    python -m stages.soft_labels --params params.yaml --teacher models/teacher.pt \
        --prepared data/prepared --out data/soft_labels
"""

from distill import softlabels
from distill.cli import cli_main, stage_parser
from distill.config import load_params


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    parser.add_argument("--out", required=True, help="soft-label directory to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    return softlabels.dump(args.teacher, args.prepared, args.out, params.soft_labels)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
