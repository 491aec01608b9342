"""DVC stage `train_baseline` (language model): the student's architecture, seed and steps on
next-token cross-entropy alone; it reads every `student.*` key except the distillation ones
(config.LM_DISTILLATION_KEYS).

    python -m stages.lm.train_baseline --params params.yaml --prepared data/prepared \
        --model models/baseline.pt --history reports/train/baseline.csv --receipt reports/runs/train_baseline.json
"""

from pathlib import Path

from distill import corpus, distributed, lm
from distill.config import LM_DISTILLATION_KEYS, load_params
from stages.common import cli_main, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    args = parser.parse_args(argv)
    params = load_params(args.params, task="language_model")
    student = params.student

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "student": student.model_dump(exclude=set(LM_DISTILLATION_KEYS)),
                  "distributed": params.distributed.model_dump(), "runtime": params.runtime.model_dump()}
        with distributed.stage_run(world, "train_baseline", params.tracking, logged, args.receipt) as run:
            meta = corpus.read_meta(args.prepared)
            model = lm.gpt2(student, meta, params.seed)
            job = lm.LMJob(student, params.seed, "baseline", world=world, precision=params.runtime.precision,
                           on_eval=run.log_step)
            job = lm.resumable(job, params.resume, meta)
            batches = lm.WindowBatches(corpus.read_windows(args.prepared, "train"), student.batch_size, world)
            result = lm.train(model, job, batches, corpus.read_windows(args.prepared, "val"))
            out = lm.save_result(result, job, Path(args.model), Path(args.history), meta,
                                 {"mlflow_run_id": run.run_id})
            run.log_lm_training(out, args.model)
        return out

    return distributed.run_stage(params.distributed, params.runtime, "stages.lm.train_baseline", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
