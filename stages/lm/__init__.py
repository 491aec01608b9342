"""DVC stages of the language-model pipeline (lm/dvc.yaml): the same stage names as the classifier's,
one module each, over distill/corpus.py, lm.py, lm_soft_labels.py and lm_evaluation.py."""
