"""DVC stage `prepare` (language model): documents split whole into train/val/test, the tokenizer
(trained here on train, or data.tokenizer), fixed-length windows, from `data.*`.

    python -m stages.lm.prepare --params params.yaml --out data/prepared --receipt reports/runs/prepare.json
"""

from distill import corpus, tracking
from distill.config import load_params
from stages.common import cli_main, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="prepared-data directory")
    args = parser.parse_args(argv)
    params = load_params(args.params, task="language_model")
    with tracking.stage_run("prepare", params.tracking, {"data": params.data.model_dump()}, args.receipt) as run:
        meta = corpus.prepare(params.data, args.out)
        run.log_metrics({f"{key}_{split}": n for split, counts in meta.splits.items() for key, n in counts.items()}
                        | {"vocab_size": meta.vocab_size})
    return {"vocab_size": meta.vocab_size, "splits": meta.splits}


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
