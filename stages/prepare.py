"""DVC stage `prepare`: the data source (`data.*`) made into the task's prepared splits.

Classification: train/val/test/transfer Parquet splits of features (or token ids) and labels;
language model: documents split whole, a tokenizer, token windows per split.

    python -m stages.prepare --params params.yaml --out data/prepared --receipt reports/runs/prepare.json
"""

from pathlib import Path

from stages.common import cli_main, open_run, stage_params, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="prepared-data directory")
    args = parser.parse_args(argv)
    params, task = stage_params(args.params)
    with open_run("prepare", params, task, args.receipt) as run:
        return task.prepare(params, Path(args.out), run)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
