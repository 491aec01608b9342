"""DVC stage `train_teacher`: the teacher, by `teacher.source`:

- train: `teacher.arch` trained from scratch (`teacher.*`, `seed`), selected on val;
- pretrained: the Hugging Face folder `teacher.model` (or the bundled minilm) with a new
  classification head, fine-tuned on train (`teacher.trainable_layers`), selected on val;
- checkpoint: the file `teacher.model`, used as it is (nothing trained), scored on val.

With `distributed.nproc` > 1, or started under torchrun, it trains on several
processes (distill/distributed.py); rank 0 writes the outputs.

    python -m stages.train_teacher --params params.yaml --prepared data/prepared \
        --model models/teacher.pt --history reports/train/teacher.csv --receipt reports/runs/train_teacher.json
"""

from pathlib import Path

from distill import data, distributed, pretrained, training
from distill.errors import UserError
from distill.config import load_params
from stages.common import cli_main, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    teacher = params.teacher

    def from_folder(meta):
        if meta.tokens is None:
            raise UserError(f"teacher.source pretrained reads text; data.source '{params.data.source}' is "
                                     "not text (set data.text_column, or use teacher.source: train)")
        return pretrained.load_pretrained(teacher.model, meta.num_classes, meta.tokens, meta.num_features,
                                          teacher.trainable_layers)

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "teacher": teacher.model_dump(),
                  "distributed": params.distributed.model_dump(), "runtime": params.runtime.model_dump()}
        with distributed.stage_run(world, "train_teacher", params.tracking, logged, args.receipt) as run:
            job = training.TrainJob(teacher, params.seed, "teacher", on_epoch=run.log_epoch, world=world,
                                     precision=params.runtime.precision)
            out = training.Outputs(Path(args.model), Path(args.history), {"mlflow_run_id": run.run_id})
            if teacher.source == "checkpoint":
                meta = data.read_meta(args.prepared)
                model, model_args, info = pretrained.load_user_checkpoint(teacher.model, meta.num_features,
                                                                          meta.num_classes, meta.tokens,
                                                                          meta.class_names)
                record = pretrained.source_record(teacher.model)
                run.set_tags({"distill.teacher_source": "checkpoint", "distill.teacher_source_sha256":
                              record["teacher_source_sha256"]})
                result = training.use_as_is(model, model_args, job, args.prepared, out,
                                            record | {"source_info": {k: v for k, v in info.items()
                                                                      if k != "history"}})
            else:
                start = from_folder if teacher.source == "pretrained" else None
                result = training.train_on_labels(job, args.prepared, out, params.resume, start=start)
            run.log_training(result, args.model)
        return result

    return distributed.run_stage(params.distributed, params.runtime, "stages.train_teacher", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
