"""DVC stage `prepare`: build data/prepared/{train,val,test[,transfer]}.parquet from `data.*`.

    python -m stages.prepare --params params.yaml --out data/prepared --receipt reports/runs/prepare.json
"""

from distill import data, tracking
from distill.config import load_params
from stages.common import cli_main, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="prepared-data directory")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with tracking.stage_run("prepare", params.tracking, {"data": params.data.model_dump()}, args.receipt) as run:
        summary = data.prepare(params.data, args.out).summary()
        run.log_metrics({f"rows_{split}": n for split, n in summary["splits"].items()}
                        | {"num_classes": summary["num_classes"], "num_features": summary["num_features"]})
    return summary


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
