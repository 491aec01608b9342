"""DVC stage `prepare`: build data/prepared/{train,val,test[,transfer]}.parquet from `data.*`.

    python -m stages.prepare --params params.yaml --out data/prepared
"""

from distill import data
from distill.cli import cli_main, stage_parser
from distill.config import load_params


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="prepared-data directory")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    return data.prepare(params.data, args.out).summary()


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
