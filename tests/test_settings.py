"""Every params key, whatever JSON it is given, is accepted or refused in one line (ParamsError, CheckpointError), never
another exception: every JSON type, both ends of every range (read from the rules themselves), JSON nested too
deeply, sizes above their bound naming the memory they would need, through params.json, --set and checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import checkpoints
import errors
import hubconf
import predict
import settings
import train
from test_predict import TRAINING_PARAMS, write_checkpoint

EXPERIMENT = settings.EXPERIMENT_CONFIGS
SETTINGS = settings.experiment_settings(EXPERIMENT)
BASE = {"dataset": "synthetic", "data_dir": "", "num_classes": 5, "crop_size": 64}  # batch_size 1 is fine at 64²


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


JSON_TYPES = {"string": "4", "integer": 4, "number": 2.5, "bool": True, "null": None, "list": [4],
              "object": {"a": 4}, "nested": [[[4]]], "deep": nested(settings.MAX_JSON_DEPTH + 1)}
PYTHON_TYPES = {"string": str, "integer": int, "number": float, "bool": bool, "null": type(None)}


def params_error(values: dict, overrides: dict | None = None) -> str | None:
    """Params' one-line refusal, or None if accepted; any other exception fails the test."""
    try:
        settings.Params(values, EXPERIMENT, "params.json", overrides)
    except errors.ParamsError as exc:
        assert "\n" not in str(exc), str(exc)
        return str(exc)
    return None


@pytest.mark.parametrize("kind", JSON_TYPES)
@pytest.mark.parametrize("key", SETTINGS)
def test_every_key_given_every_json_type_is_accepted_or_refused_in_one_line(key, kind):
    value = JSON_TYPES[kind]
    for source, error in (("params.json", params_error({**BASE, key: value})),
                          ("--set", params_error(BASE, {key: value}))):
        types = SETTINGS[key].types
        fits = kind in PYTHON_TYPES and PYTHON_TYPES[kind] in types or kind == "integer" and float in types or (
            kind in ("list", "nested") and list in types or kind == "object" and dict in types)
        if not fits:
            assert error is not None and error.startswith(f"{source}: {key!r} is "), (source, error)


def range_cases() -> list[tuple[str, object, bool]]:
    """(key, value, allowed) at both ends of every bounded range: each bound, and just beyond it; list items too."""
    cases = []
    for key, setting in SETTINGS.items():
        rules, integer = setting.rules, int in setting.types and float not in setting.types
        if "items" in rules:
            integer = False
        step = 1 if integer else 1e-6
        for rule, outside in (("at_least", -step), ("at_most", step), ("above", 0), ("below", 0)):
            if rule not in rules:
                continue
            bound = rules[rule]
            inside = bound if rule in ("at_least", "at_most") else bound + (step if rule == "above" else -step)
            for value, allowed in ((inside, True), (bound + outside, False)):
                if "items" in rules:
                    length = 2 if rules.get("length") == 2 else BASE["num_classes"] if rules.get("length") else 1
                    value = [value] * length
                cases.append((key, value, allowed))
    return cases


@pytest.mark.parametrize("key,value,allowed", range_cases())
def test_both_ends_of_every_range(key, value, allowed):
    error = params_error({**BASE, key: value})
    assert (error is None) == allowed, error


def test_every_range_and_every_size_is_bounded():
    keys = {case[0] for case in range_cases()}
    numeric = {k for k, s in SETTINGS.items() if {int, float} & {*s.types, *s.rules.get("items", ())}}
    assert keys == numeric  # every number has a range: no negative worker count, no NaN, no infinity
    counts = {"num_epochs", "num_iterations", "warmup_iterations", "val_every_epochs", "save_summary_steps"}  # time
    unbounded = {k for k, s in SETTINGS.items() if int in s.types and float not in s.types and "at_most" not in s.rules}
    assert unbounded == counts  # every other integer is a size, a seed or a class count, with an upper bound


@pytest.mark.parametrize("key,value,memory", [("eval_pad_size", 100000, "120 GB per padded float image"),
                                              ("synthetic_train_images", 10**12, "GB for the sampler"),
                                              ("synthetic_val_images", 10**12, "GB for the sampler"),
                                              ("num_workers", 100000, "100000 processes"),
                                              ("batch_size", 10**6, "GB per batch"),
                                              ("num_logged_images", 10**6, "GB at 2048×1024")])
def test_a_size_that_would_exhaust_memory_is_refused_naming_it(key, value, memory):
    error = params_error({**BASE, key: value})
    assert error.startswith(f"params.json: {key!r} is {value}; expected ") and "<= " in error and memory in error


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, "[" * 600 + "]" * 600, "[" * 33 + "]" * 33])
def test_deeply_nested_json_is_one_line_in_params_json_and_set(tmp_path, text, capsys):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(BASE)[:-1] + ', "scale_range": ' + text + "}")
    with pytest.raises(errors.ParamsError, match=rf"^{path}: lists or objects nested deeper than 32 levels$"):
        settings.Params.load(path, EXPERIMENT)
    with pytest.raises(errors.ParamsError, match=r"^--set scale_range: lists or objects nested deeper than 32"):
        settings.parse_overrides([f"scale_range={text}"])
    path.write_text(json.dumps(BASE))
    assert train.main(["--model_dir", str(tmp_path), "--set", f"scale_range={text}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set scale_range: lists or objects nested") and err.count("\n") == 1


def test_a_wrong_type_for_a_key_with_a_cross_field_rule_is_one_line(tmp_path, capsys):
    (tmp_path / "params.json").write_text(json.dumps(BASE))
    for value in ('abc', '"4"', "[4]", '{"a": 4}'):
        assert train.main(["--model_dir", str(tmp_path), "--set", f"batch_size={value}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --set: 'batch_size' is ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("value", ["4", [4], nested(settings.MAX_JSON_DEPTH + 1)])
def test_a_checkpoint_with_a_wrong_type_is_one_line_in_predict_and_torch_hub(tmp_path, capsys, value):
    path = tmp_path / "best.pth.tar"
    write_checkpoint(path, params={**TRAINING_PARAMS, "batch_size": value})
    (tmp_path / "in").mkdir()
    assert predict.main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--restore_file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {path}: params: 'batch_size' is ") and err.count("\n") == 1
    with pytest.raises(checkpoints.CheckpointError, match=rf"^checkpoint {path}: params: 'batch_size' is "):
        hubconf.gcn(str(path))
    assert torch.load(path, weights_only=True)["params"]["batch_size"] == value  # nothing was rewritten


def test_json_depth_counts_without_recursion():
    assert [settings.json_depth(v) for v in (3, "x", [], {"a": [1]}, [[], [[]]])] == [0, 0, 1, 2, 3]
    assert settings.json_depth(nested(10**5)) == settings.MAX_JSON_DEPTH + 1  # counted up to the limit only
