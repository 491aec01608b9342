"""DVC stage `train_student` (language model): a smaller GPT-2 (`student.*`) trained on the stored
teacher targets, alpha * T^2 * KL + (1 - alpha) * cross-entropy, for `student.steps` steps.
Refuses soft labels made with another tokenizer or vocabulary, or over other data.

    python -m stages.lm.train_student --params params.yaml --prepared data/prepared \
        --soft-labels data/soft_labels --model models/student.pt --history reports/train/student.csv \
        --receipt reports/runs/train_student.json
"""

from pathlib import Path

from distill import corpus, distributed, lm, lm_soft_labels
from distill.config import load_params
from stages.common import cli_main, training_parser


def main(argv=None) -> dict:
    parser = training_parser(__doc__)
    parser.add_argument("--soft-labels", required=True, help="soft-label directory")
    args = parser.parse_args(argv)
    params = load_params(args.params, task="language_model")
    student = params.student

    def train(world: distributed.World) -> dict:
        logged = {"seed": params.seed, "student": student.model_dump(),
                  "distributed": params.distributed.model_dump(), "runtime": params.runtime.model_dump()}
        with distributed.stage_run(world, "train_student", params.tracking, logged, args.receipt) as run:
            meta = corpus.read_meta(args.prepared)
            model = lm.gpt2(student, meta, params.seed)
            soft = lm_soft_labels.SoftLabelSet(args.soft_labels, meta, lm.vocab_of(model))
            lineage = lm_soft_labels.lineage(soft)
            job = lm.LMJob(student, params.seed, "student", distill=student, world=world,
                           precision=params.runtime.precision, on_eval=run.log_step)
            job = lm.resumable(job, params.resume, meta, soft_labels=lineage["soft_labels_sha256"])
            batches = lm.WindowBatches(corpus.read_windows(args.prepared, "train"), student.batch_size, world,
                                       soft, student.shuffle_buffer)
            val = corpus.read_windows(args.prepared, "val")
            result = lm.train(model, job, batches, val)
            info = {"mlflow_run_id": run.run_id, "soft_labels": lineage}
            out = lm.save_result(result, job, Path(args.model), Path(args.history), meta, info)
            run.set_tags({"distill.teacher_run_id": lineage["teacher_run_id"],
                          "distill.soft_labels_run_id": lineage["soft_labels_run_id"]})
            run.log_dataset(Path(args.soft_labels), "soft_labels", lineage["soft_labels_sha256"], context="training")
            run.log_lm_training(out, args.model, lm.NextTokenLogits(out["model"]).eval(), val[:2])
        return out | {"soft_labels": lineage}

    return distributed.run_stage(params.distributed, params.runtime, "stages.lm.train_student", argv, train)


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
