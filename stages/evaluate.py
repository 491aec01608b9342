"""DVC stage `evaluate`: test metrics of teacher, student and baseline, and their comparison.

    python -m stages.evaluate --params params.yaml --prepared data/prepared \
        --teacher models/teacher.pt --student models/student.pt --baseline models/baseline.pt \
        --metrics reports/metrics.json --compare reports/compare.md \
        --predictions reports/predictions.csv --reliability reports/reliability
"""

from distill import evaluation
from distill.cli import cli_main, stage_parser
from distill.config import load_params


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    for name in ("teacher", "student", "baseline"):
        parser.add_argument(f"--{name}", required=True, help=f"{name} checkpoint")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--compare", required=True, help="markdown comparison to write")
    parser.add_argument("--predictions", required=True, help="per-example predictions CSV to write")
    parser.add_argument("--reliability", required=True, help="directory of reliability-diagram CSVs")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    checkpoints = {"teacher": args.teacher, "student": args.student, "baseline": args.baseline}
    return evaluation.evaluate(params.evaluate, args.prepared, checkpoints, args.metrics, args.compare,
                          args.predictions, args.reliability)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
