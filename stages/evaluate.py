"""DVC stage `evaluate`: test metrics of teacher, student and baseline, their comparison,
and the student's registration (with the alias only if it passes `registry.*`).

    python -m stages.evaluate --params params.yaml --prepared data/prepared \
        --teacher models/teacher.pt --student models/student.pt --baseline models/baseline.pt \
        --metrics reports/metrics.json --compare reports/compare.md \
        --predictions reports/predictions.csv --reliability reports/reliability \
        --report reports/report.html --figures reports/figures --curves reports/curves \
        --receipt reports/runs/evaluate.json
"""

from pathlib import Path

from distill import device, evaluation, report, tracking
from distill.config import load_params
from distill.io import write_text
from stages.common import cli_main, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    for name in evaluation.MODELS:
        parser.add_argument(f"--{name}", required=True, help=f"{name} checkpoint")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--compare", required=True, help="markdown comparison to write")
    parser.add_argument("--predictions", required=True, help="per-example predictions CSV to write")
    parser.add_argument("--reliability", required=True, help="directory of reliability-diagram CSVs")
    parser.add_argument("--report", required=True, help="HTML report to write")
    parser.add_argument("--figures", required=True, help="directory of the report's PNG figures")
    parser.add_argument("--curves", required=True, help="directory of each model's per-epoch CSV (plot data)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    checkpoints = {name: getattr(args, name) for name in evaluation.MODELS}
    where = device.resolve(params.runtime)
    logged = {"evaluate": params.evaluate.model_dump(), "registry": params.registry.model_dump(),
              "runtime": params.runtime.model_dump()}
    with tracking.stage_run("evaluate", params.tracking, logged, args.receipt) as run:
        result = evaluation.evaluate(params.evaluate, args.prepared, checkpoints, where)
        evaluation.write_outputs(result, args.metrics, args.predictions, args.reliability, args.curves)
        write_text(args.compare, report.compare_table(result.metrics))
        report.write_report(result, args.report, args.figures)
        artifacts = [Path(p) for p in (args.metrics, args.compare, args.predictions, args.reliability,
                                       args.report, args.figures, args.curves)]
        tracking.log_evaluation(run, result, artifacts)
        passed = evaluation.passes_gate(result.metrics["student"], params.registry)
        registered = tracking.register_student(run, result.run_ids["student"], params.registry, passed)
    return result.metrics | {"run_ids": result.run_ids} | registered


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
