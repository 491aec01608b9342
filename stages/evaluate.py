"""DVC stage `evaluate`: test metrics of teacher, student and baseline (on text, beside them, a TF-IDF
reference fitted here), their comparison with what in it is noise, and report (the files the task
writes, by name), and the student's registration (with the alias only if it passes `registry.*`);
the gate's verdict and its reason, one line, logged and written into compare.md and report.html
(distill/gate.py).

    python -m stages.evaluate --params params.yaml --prepared data/prepared \
        --teacher models/teacher.pt --student models/student.pt --baseline models/baseline.pt \
        --metrics reports/metrics.json --compare reports/compare.md --report reports/report.html \
        --figures reports/figures --curves reports/curves [the task's other reports] \
        --receipt reports/runs/evaluate.json
"""

from pathlib import Path

from distill import gate, model_registry
from distill.task import ROLES, EvaluatePaths
from stages.common import cli_main, open_run, stage_params, stage_parser


def main(argv=None) -> dict:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", required=True, help="prepared-data directory")
    for name in ROLES:
        parser.add_argument(f"--{name}", required=True, help=f"{name} checkpoint")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    known, _ = parser.parse_known_args(argv)
    params, task = stage_params(known.params)
    for name, what in task.reports.items():
        parser.add_argument(f"--{name}", required=True, help=what)
    args = parser.parse_args(argv)
    outputs = {"metrics": Path(args.metrics)} | {name: Path(getattr(args, name)) for name in task.reports}
    paths = EvaluatePaths(Path(args.prepared), {name: Path(getattr(args, name)) for name in ROLES}, outputs)
    with open_run("evaluate", params, task, args.receipt) as run:
        result = task.evaluate(params, paths, run)
        verdict = gate.as_verdict(result.pop("passed"))
        registered = model_registry.register_student(run, result["run_ids"]["student"], params.registry,
                                                     verdict.passed, verdict.reason)
        line = gate.verdict_line(verdict, params.registry.alias, registered)
        for changed in gate.announce(line, verdict.passed, outputs.get("compare"), outputs.get("report")):
            run.log_artifact(changed)  # again, now with the verdict
    return result | registered | {"gate": line}


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
