"""DVC stage `evaluate` (language model): held-out bits per token, perplexity and KL from the live
teacher for teacher, student and baseline; samples; the student's registration (with the alias
only if it passes `registry.max_test_bits_per_token`).

    python -m stages.lm.evaluate --params params.yaml --prepared data/prepared \
        --teacher models/teacher.pt --student models/student.pt --baseline models/baseline.pt \
        --metrics reports/metrics.json --compare reports/compare.md --report reports/report.html \
        --figures reports/figures --curves reports/curves --receipt reports/runs/evaluate.json
"""

from pathlib import Path

from distill import device, lm_evaluation, tracking
from distill.config import load_params
from stages.common import cli_main, stage_parser

OUTPUTS = {"metrics": "metrics JSON", "compare": "markdown comparison and samples", "report": "HTML report",
           "figures": "directory of the report's PNG figures", "curves": "directory of each model's val curve CSV"}


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    for name in lm_evaluation.MODELS:
        parser.add_argument(f"--{name}", required=True, help=f"{name} checkpoint")
    for name, what in OUTPUTS.items():
        parser.add_argument(f"--{name}", required=True, help=f"{what} to write")
    args = parser.parse_args(argv)
    params = load_params(args.params, task="language_model")
    checkpoints = {name: getattr(args, name) for name in lm_evaluation.MODELS}
    logged = {"evaluate": params.evaluate.model_dump(), "registry": params.registry.model_dump(),
              "runtime": params.runtime.model_dump()}
    with tracking.stage_run("evaluate", params.tracking, logged, args.receipt) as run:
        result = lm_evaluation.evaluate(params.evaluate, args.prepared, checkpoints, device.resolve(params.runtime))
        out = {name: getattr(args, name) for name in OUTPUTS}
        lm_evaluation.write_outputs(result, out)
        gap = result.metrics["gap_closed"]  # None: the teacher is not better, so nothing to close
        run.log_metrics({f"{m}.{k}": v for m in lm_evaluation.MODELS for k, v in result.metrics[m].items()
                         if isinstance(v, (int, float))} | ({} if gap is None else {"gap_closed": gap}))
        for path in out.values():
            run.log_artifact(Path(path))
        passed = lm_evaluation.passes_gate(result.metrics["student"], params.registry)
        registered = tracking.register_student(run, result.run_ids["student"], params.registry, passed)
    return result.metrics | {"run_ids": result.run_ids} | registered


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
