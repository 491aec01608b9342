"""params.yaml validation, and the agreement between the config models, params.yaml and dvc.yaml."""


import pytest
import yaml
from pydantic import BaseModel, ValidationError

from distill.classification_params import DISTILLATION_KEYS, Params, StudentConfig
from distill.config import load_params
from distill.errors import UserError
from stages.common import dvc_deps

from conftest import REPO, tiny_params, write_params


def test_the_committed_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "mnist1d"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("student.temprature", 2.0, "unknown key 'student.temprature'"),
        ("student.temperature", 0.0, "student.temperature = 0.0"),
        ("student.temperature", -1.0, "student.temperature = -1.0"),
        ("student.alpha", 1.5, "student.alpha = 1.5"),
        ("student.alpha", -0.1, "student.alpha = -0.1"),
        ("teacher.batch_size", 0, "teacher.batch_size = 0"),
        ("teacher.arch", "transformer", "teacher.arch = 'transformer'"),
        ("data.source", "imagenet", "data.source = 'imagenet'"),
        ("data.transfer_size", -5, "data.transfer_size = -5"),
        ("teacher.epochs", "ten", "teacher.epochs = 'ten'"),
        ("teacher.hidden", [64, 0], "teacher.hidden = [64, 0] is not allowed: every entry must be a positive"),
        ("soft_labels.dtype", "int8", "soft_labels.dtype = 'int8'"),
        ("seed", "x", "seed = 'x'"),
    ],
)
def test_a_bad_value_is_refused_naming_the_key_and_value(tmp_path, key, value, expected):
    path = write_params(tmp_path / "params.yaml", tiny_params(**{key: value}))
    with pytest.raises(UserError) as err:
        load_params(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_a_file_source_without_a_path_is_refused_in_one_short_sentence(tmp_path):
    path = write_params(tmp_path / "params.yaml", tiny_params(**{"data.source": "csv"}))
    with pytest.raises(UserError, match="data.path is required") as err:
        load_params(path)
    assert "{" not in str(err.value) and len(str(err.value)) < len(str(path)) + 150  # not the whole section


def test_your_own_file_needs_only_its_source_path_and_label_column(tmp_path):
    # the committed params ask for a transfer set of the generated data: a file source just has none
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["data"]["transfer_size"] > 0
    raw["data"] |= {"source": "csv", "path": "data/raw/wine.csv", "label_column": "cultivar"}
    assert load_params(write_params(tmp_path / "params.yaml", raw)).data.source == "csv"


def test_a_missing_or_broken_params_file_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("student: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_config_sections_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="frozen"):
        params.student.alpha = 0.1


def _missing_keys(model: type[BaseModel], raw: dict, prefix: str = "") -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if name not in raw:
            missing.append(prefix + name)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += _missing_keys(field.annotation, raw[name], f"{prefix}{name}.")
    return missing


def test_params_yaml_spells_out_every_key_so_no_code_default_can_change_a_result():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _missing_keys(Params, raw) == []


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize(
    "stage, params",
    [
        ("prepare", {"data"}),
        # runtime.precision changes the numbers; runtime.device only where they are computed
        ("train_teacher", {"seed", "teacher", "distributed", "runtime.precision"}),
        ("soft_labels", {"soft_labels", "runtime.precision"}),
        ("train_student", {"seed", "student", "distributed", "runtime.precision"}),
        ("evaluate", {"evaluate", "registry"}),
    ],
)
def test_each_stage_lists_exactly_the_params_it_reads(stage, params):
    assert set(dvc_stages()[stage]["params"]) == params


def test_the_baseline_reads_every_student_key_except_the_distillation_ones():
    listed = set(dvc_stages()["train_baseline"]["params"])
    expected = {"seed", "distributed", "runtime.precision"} | {f"student.{k}" for k in StudentConfig.model_fields
                                          if k not in DISTILLATION_KEYS}
    assert listed == expected


def test_every_dependency_named_in_dvc_yaml_exists_or_is_an_output():  # code deps: tests/test_code_deps.py
    stages = dvc_stages()
    outs = {o if isinstance(o, str) else next(iter(o)) for s in stages.values() for o in s.get("outs", [])}
    for name, stage in stages.items():
        for dep in dvc_deps(name, REPO / "dvc.yaml"):  # ${data.path} filled in by DVC's templating
            assert dep in outs or (REPO / dep).exists(), f"{name}: {dep}"
        module = stage["cmd"].split()[2]
        assert f"{module.replace('.', '/')}.py" in stage["deps"], f"{name} must depend on its own stage file"


def test_the_validate_command_checks_a_params_file_alone(tmp_path):
    import subprocess

    from conftest import BIN

    ok = subprocess.run([str(BIN / "distill"), "validate", str(REPO / "params.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "params.yaml: valid" in ok.stdout
    bad = write_params(tmp_path / "params.yaml", tiny_params(**{"student.alpha": 2}))
    result = subprocess.run([str(BIN / "distill"), "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and "student.alpha = 2" in result.stderr and "Traceback" not in result.stderr
