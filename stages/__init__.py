"""DVC stages: one module per stage in dvc.yaml, each a thin command line over the library (distill/)."""
