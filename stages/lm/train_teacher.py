"""DVC stage `train_teacher` (language model), by `teacher.source`:

- train: a GPT-2 of `teacher.layers/heads/width` trained from scratch for `teacher.steps`;
- pretrained: the Hugging Face causal-LM folder `teacher.model` (its tokenizer must be the
  data's), fine-tuned for `teacher.steps`, or used as it is with steps: 0.

The best checkpoint on val (bits per token) is kept. Distributed as the classifier's stage.

    python -m stages.lm.train_teacher --params params.yaml --prepared data/prepared \
        --model models/teacher.pt --history reports/train/teacher.csv --receipt reports/runs/train_teacher.json
"""

from pathlib import Path

from distill import corpus, distributed, lm
from distill.config import load_params
from distill.io import tree_sha256
from stages.common import cli_main, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    args = parser.parse_args(argv)
    params = load_params(args.params, task="language_model")
    teacher = params.teacher

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "teacher": teacher.model_dump(),
                  "distributed": params.distributed.model_dump(), "runtime": params.runtime.model_dump()}
        with distributed.stage_run(world, "train_teacher", params.tracking, logged, args.receipt) as run:
            meta = corpus.read_meta(args.prepared)
            if teacher.source == "pretrained":
                model = lm.pretrained(teacher.model, meta)
            else:
                model = lm.gpt2(teacher, meta, params.seed)
            job = lm.LMJob(teacher, params.seed, "teacher", world=world, precision=params.runtime.precision,
                           on_eval=run.log_step)
            pretrained = teacher.source == "pretrained" and teacher.steps and params.resume.every_steps
            start = {"model_sha256": tree_sha256(teacher.model)} if pretrained else {}
            job = lm.resumable(job, params.resume, meta, source=teacher.source, **start)
            batches = lm.WindowBatches(corpus.read_windows(args.prepared, "train"), teacher.batch_size, world)
            result = lm.train(model, job, batches, corpus.read_windows(args.prepared, "val"))
            info = {"mlflow_run_id": run.run_id, "source": teacher.source}
            out = lm.save_result(result, job, Path(args.model), Path(args.history), meta, info)
            run.log_lm_training(out, args.model)
        return out

    return distributed.run_stage(params.distributed, params.runtime, "stages.lm.train_teacher", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
