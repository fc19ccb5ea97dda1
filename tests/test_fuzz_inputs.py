"""Property-based robustness of every loader: malformed configs, recipes and data records end in our own errors.

Each test draws malformed inputs with hypothesis (derandomized: the same examples on every run) and throws them
at one loader; every single one must raise a :class:`~tar_lightning.errors.TARLightningError` with a message
(never a KeyError/TypeError/AttributeError or a silent success). Each test also counts the examples it ran and
checks the count, so the number of malformed inputs tried is known (>= 200 in all).
"""

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tar_lightning import AdversaryConfig, TARConfig, TARDataModule
from tar_lightning.data.sources import as_source, load_records
from tar_lightning.errors import ConfigError, DataError, TARLightningError
from tar_lightning.evaluation.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Values of the wrong type for most fields; which ones are invalid for which field is listed per loader.
NOT_A_NUMBER = ["abc", [1, 2], {"a": 1}, True, None]
NOT_AN_INT = ["4", 2.5, [4], {"n": 4}, True, None, -3, 0]
NOT_A_STRING = [3, 2.5, [1], {"a": "b"}, True, None, ""]
NOT_A_BOOL = ["yes", 1, 0.5, [True], {"a": 1}, None]
BAD_FLOATS = [-1.0, float("nan"), float("inf"), "abc", [1.0], None, True]


def check_ours(fn, *args, **kwargs) -> TARLightningError:
    """Calls ``fn`` and requires one of our errors with a non-empty message; returns it."""
    try:
        fn(*args, **kwargs)
    except TARLightningError as err:
        assert str(err).strip(), f"empty message from {type(err).__name__}"
        return err
    except Exception as err:  # noqa: BLE001 - the point: anything else is a bug
        pytest.fail(f"{type(err).__name__} instead of our error: {err!r} (input {args!r} {kwargs!r})")
    pytest.fail(f"no error for malformed input {args!r} {kwargs!r}")


def run_counted(test, minimum: int) -> int:
    """Run a hypothesis test function that appends to its ``seen`` list; require ``minimum`` examples."""
    seen: list = []
    test(seen)
    assert len(seen) >= minimum, f"only {len(seen)} examples ran"
    print(f"{test.__name__}: {len(seen)} malformed inputs")  # the measured figure (pytest -s shows it)
    return len(seen)


# ------------------------------------------------------------------------------------------ TARConfig
VALID_TAR = {"inner_steps": 4, "tr_every": 2, "trajectories": 1, "tr_loss": "max_entropy",
             "adversaries": [{"name": "a", "data": "forget", "lr": [1e-3, 2e-3]}]}
TAR_BAD = {
    "inner_steps": NOT_AN_INT, "tr_every": NOT_AN_INT + [5, 100], "trajectories": NOT_AN_INT,
    "tr_loss": ["max-entropy", "entropy", 3, None, ["neg_ce"]],
    "entropy_positions": ["label", 1, None, []],
    "tr_weight": BAD_FLOATS, "retain_weight": BAD_FLOATS, "representation_weight": BAD_FLOATS,
    "weighting_rate": BAD_FLOATS, "weighting": ["linear", 0, None],
    "normalize_weights": NOT_A_BOOL, "retain_representation": NOT_A_BOOL, "representation_squared": NOT_A_BOOL,
    "adversaries": [[], "adamw", 3, [3], [{"lr": -1}], [{"optimizer": "adamz"}], [{"nme": "x"}],
                    [{"name": "a"}, {"name": "a"}], [{"method": "lora", "lora": {"rank": 0}}],
                    [{"lr": []}], [{"schedule": "linear_warmup", "warmup_steps": 10}], None],
    "clip_grad_norm": [0, -1.0, "abc", float("nan"), float("inf"), [1.0]],
    "snapshot_device": ["gpu", 3, [], "cuda"],
    "seed": ["0", 1.5, None, [0]],
    "tr_stream": NOT_A_STRING, "retain_stream": NOT_A_STRING,
    "dpo_beta": [0, -0.1, "abc", float("nan"), None],
    "max_nonfinite_in_a_row": NOT_AN_INT,
    "zz_unknown_key": [1, "x"], "inner_stepz": [4], "trajectory": [1],
}


@st.composite
def bad_tar_dicts(draw):
    data = copy.deepcopy(VALID_TAR)
    key = draw(st.sampled_from(sorted(TAR_BAD)))
    data[key] = draw(st.sampled_from(TAR_BAD[key]))
    if draw(st.booleans()):  # a second, independent mutation
        other = draw(st.sampled_from(sorted(TAR_BAD)))
        data[other] = draw(st.sampled_from(TAR_BAD[other]))
    return data


def test_malformed_tar_configs_raise_config_errors():
    @settings(max_examples=60, **SETTINGS)
    @given(bad_tar_dicts())
    def check(seen, data):
        seen.append(data)
        err = check_ours(TARConfig.from_dict, data)
        assert isinstance(err, ConfigError)
        assert "TARConfig" in str(err) or "adversar" in str(err)

    assert TARConfig.from_dict(copy.deepcopy(VALID_TAR)).inner_steps == 4  # the base is valid
    run_counted(check, 50)


# ------------------------------------------------------------------------------------------ AdversaryConfig
ADV_BAD = {
    "name": NOT_A_STRING, "data": NOT_A_STRING, "method": ["qlora", 1, None],
    "optimizer": ["adamz", "sgd2", 3, None], "optimizer_kwargs": ["x", [1], {"betaz": 1}],
    "lr": [0, -1e-3, [], ["a"], "abc", None, [1e-3, -1.0], float("nan")],
    "weight_decay": [-0.1, "x", None, float("inf")],
    "schedule": ["cosine", 3, None], "warmup_steps": [-1, 2.5, "3", None],
    "schedule_kwargs": ["x", {"nonsense": 1}], "switch": ["x", 3, {"fraction": 2.0}, {"beta": [1]},
                                                            {"retain_stream": ""}, {"beta": [6, 3], "fraction": 0.5}],
    "probability": [0, -1, "x", None, float("nan")], "steps": [0, -5, "10", 2.5],
    "batch_size": [0, -1, "8", 1.5], "lora": ["x", {"rank": 0}, {"alpha": -1}, {"dropout": 1.0},
                                               {"targets": "some"}, {"targets": []}, {"quantize_base": "nf8"},
                                               {"rnk": 4}],
    "zz_unknown": [1], "learning_rate": [1e-3],
}


@st.composite
def bad_adversary_dicts(draw):
    data = {"name": "a", "lr": 1e-3}
    key = draw(st.sampled_from(sorted(ADV_BAD)))
    data[key] = draw(st.sampled_from(ADV_BAD[key]))
    if key in ("lora",) and draw(st.booleans()):
        data["method"] = "lora"
    return data


def test_malformed_adversary_configs_raise_config_errors():
    @settings(max_examples=40, **SETTINGS)
    @given(bad_adversary_dicts())
    def check(seen, data):
        seen.append(data)
        err = check_ours(lambda d: AdversaryConfig.from_dict(d, where="adv").validate(), data)
        assert isinstance(err, ConfigError)

    run_counted(check, 35)


# ------------------------------------------------------------------------------------------ data sources
SOURCE_BAD = {
    "path": ["", 3, None, [], "synthetic:nonexistent", "knowledge:nosplit"],
    "text_field": [3, [1], {"a": 1}], "prompt_field": ["prompt"], "messages_field": [3, []],
    "filter": ["x", [1], {"": 1}, {3: 1}], "select": ["abc", "0:200%", "1:2:3", 5, "x%:"],
    "limit": [0, -1, "10", 2.5, True], "min_chars": [-1, "3", 1.5, None],
    "synthetic": ["x", {"size": 3}, [1]], "knowledge": ["x", {"n_forget": 3}],
    "label_span": ["a", ["a"], [1, 2], ["a", ""]], "zz_unknown": [1], "pth": ["x"],
}


@st.composite
def bad_sources(draw):
    data = {"path": "synthetic:retain", "synthetic": {"n": 8, "seed": 0}}
    key = draw(st.sampled_from(sorted(SOURCE_BAD)))
    data[key] = draw(st.sampled_from(SOURCE_BAD[key]))
    return data


DATAMODULE_BAD = {
    "streams": [{}, [], "x", None, {"retain": 3}, {"retain": {"pth": "x"}}],
    "seq_len": [1, 0, "64", 2.5, None], "batch_size": [0, "4", -2, None],
    "stream_batch_sizes": [{"nostream": 2}, {"retain": 0}, "x"],
    "seed": ["0", 1.5, None], "pad_to": ["short", 3], "num_workers": [-1, "2"],
    "stream_steps": ["x", {"retain": -1}, [1]], "steps_per_epoch": [0, "3", -1],
    "val_streams": ["x", [1], {"v": 3}],
}


@st.composite
def bad_datamodule_specs(draw):
    kwargs = {"streams": {"retain": {"path": "synthetic:retain", "synthetic": {"n": 8, "seed": 0}}}}
    key = draw(st.sampled_from(sorted(DATAMODULE_BAD)))
    kwargs[key] = draw(st.sampled_from(DATAMODULE_BAD[key]))
    return kwargs


def test_malformed_data_sources_and_datamodule_specs_raise_our_errors():
    @settings(max_examples=35, **SETTINGS)
    @given(bad_sources())
    def check_source(seen, data):
        seen.append(data)
        check_ours(lambda d: load_records(as_source(d, "stream 'x'")), data)

    @settings(max_examples=30, **SETTINGS)
    @given(bad_datamodule_specs())
    def check_datamodule(seen, kwargs):
        seen.append(kwargs)
        check_ours(lambda kw: TARDataModule(**kw), kwargs)

    run_counted(check_source, 30)
    run_counted(check_datamodule, 25)


# ------------------------------------------------------------------------------------------ data files
GOOD_ROWS = st.lists(st.text(alphabet="abcdefgh XYZ", min_size=1, max_size=20), min_size=1, max_size=6)
BAD_JSON_LINES = [
    '{"text": "unterminated}', '{"text": "a",}', "[1, 2, 3]", '"just a string"', "42", '{"text": 5}',
    '{"text": ["a", "b"]}', '{"text": {"nested": 1}}', "{text: 'single quotes'}", "{", '{"text": "a"} trailing',
    "null", '{"text": true}',
]


@st.composite
def malformed_jsonl(draw):
    rows = draw(GOOD_ROWS)
    bad = draw(st.sampled_from(BAD_JSON_LINES))
    at = draw(st.integers(0, len(rows)))
    lines = [json.dumps({"text": r}) for r in rows]
    lines.insert(at, bad)
    blank = draw(st.booleans())  # a blank line before the bad one: line numbers count it
    if blank:
        lines.insert(0, "")
    return lines, at + 1 + int(blank)


def test_malformed_jsonl_records_name_file_and_line():
    @settings(max_examples=40, **SETTINGS)
    @given(malformed_jsonl(), st.sampled_from(["jsonl", "json"]))
    def check(seen, case, suffix):
        lines, line = case
        seen.append(lines)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"data.{suffix}"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            err = check_ours(load_records, {"path": str(path), "text_field": "text"})
        assert isinstance(err, DataError)
        assert str(path) in str(err)
        assert f"line {line}:" in str(err), (str(err), lines)

    run_counted(check, 35)


BAD_CSV = ['"unterminated quote,1', '\x00\x01\x02', "a,b,c,d,e,f"]


@st.composite
def malformed_files(draw):
    kind = draw(st.sampled_from(["csv_quote", "binary", "json_array_type", "json_syntax", "empty", "json_scalar"]))
    rows = draw(GOOD_ROWS)
    if kind == "csv_quote":
        body = "text,n\n" + "".join(f"{r},1\n" for r in rows) + '"never closed,2\n'
        return "csv", body.encode()
    if kind == "binary":
        return draw(st.sampled_from(["jsonl", "json", "csv", "txt"])), b"\xff\xfe\x00garbage" + bytes(range(128, 140))
    if kind == "json_array_type":
        items = [{"text": r} for r in rows]
        items.insert(draw(st.integers(0, len(items))), {"text": draw(st.sampled_from([3, [1], {"a": 1}, True]))})
        return "json", json.dumps(items).encode()
    if kind == "json_syntax":
        text = json.dumps([{"text": r} for r in rows], indent=1)
        cut = draw(st.integers(1, len(text) - 1))
        return "json", ("[" + text[1:cut]).encode()  # truncated array
    if kind == "json_scalar":
        return "json", draw(st.sampled_from([b"42", b'"text"', b"null", b"true"]))
    return draw(st.sampled_from(["jsonl", "json", "csv", "txt"])), draw(st.sampled_from([b"", b"\n\n", b"   \n"]))


def test_malformed_data_files_raise_data_errors_naming_the_file():
    @settings(max_examples=40, **SETTINGS)
    @given(malformed_files())
    def check(seen, case):
        suffix, body = case
        seen.append(case)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"data.{suffix}"
            path.write_bytes(body)
            err = check_ours(load_records, {"path": str(path), "text_field": "text"})
        assert isinstance(err, DataError), err
        assert str(path) in str(err)

    run_counted(check, 35)


# ------------------------------------------------------------------------------------------ suites and demo
def _paths(node, prefix=()):
    """Every (path, value) in a nested dict/list, mappings included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(root, path, value):
    node = root
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _wrong_type(value):
    """Values of a type that the original value's field cannot take."""
    if isinstance(value, bool):
        return ["maybe", [value], {"x": 1}]
    if isinstance(value, (int, float)):  # not [value]: several numeric fields accept a list (lr, seeds)
        return ["not-a-number", {"x": value}]
    if isinstance(value, str):
        return [[value, 3], {"x": value}]
    if isinstance(value, list):  # not a number: a list of learning rates may be a single one
        return [{"x": 1}, "text"] if not all(isinstance(v, (int, float)) for v in value) else [{"x": 1}]
    if isinstance(value, dict):  # not a string: a data regime may be given as a bare path
        return [[1, 2], 3.5]
    return []


def _field_name(path: tuple) -> str:
    """The name an error about the value at ``path`` must mention: its key, or for a list item the list's key
    (``("attacks", 3, "lr")`` -> ``lr``; ``("seeds", 1)`` -> ``seeds``)."""
    return str(next(k for k in reversed(path) if isinstance(k, str)))


@st.composite
def mutated_yaml(draw, base: dict, skip=()):
    """A malformed variant of ``base``: an unknown key, a value of the wrong type, or broken YAML text."""
    data = copy.deepcopy(base)
    kind = draw(st.sampled_from(["unknown_key", "wrong_type", "wrong_type", "broken_yaml", "not_a_mapping"]))
    nodes = [(p, v) for p, v in _paths(data) if not any(str(s) in map(str, p) for s in skip)]
    if kind == "unknown_key":
        path, node = draw(st.sampled_from([(p, v) for p, v in nodes if isinstance(v, dict)]))
        key = "zz_" + draw(st.text(alphabet="abcxyz", min_size=1, max_size=6))
        node[key] = draw(st.sampled_from([1, 2.5, [1]]))
        return yaml.safe_dump(data), (key, path)
    if kind == "wrong_type":
        path, value = draw(st.sampled_from([(p, v) for p, v in nodes if p and _wrong_type(v)]))
        _set(data, path, draw(st.sampled_from(_wrong_type(value))))
        return yaml.safe_dump(data), (_field_name(path), path)
    if kind == "not_a_mapping":
        return draw(st.sampled_from(["- a\n- b\n", "42\n", "just text\n"])), (None, ())
    text = yaml.safe_dump(data).splitlines()
    at = draw(st.integers(0, len(text)))
    text.insert(at, draw(st.sampled_from(["key: [unclosed", "  - : : {", "bad: 'quote", "\t: x", "a: b: c:"])))
    return "\n".join(text) + "\n", (None, ())


SUITE_BASE = yaml.safe_load((REPO / "recipes" / "redteam" / "durability.yaml").read_text())
# Free-form fields: descriptions and comments take any text; they are not malformed whatever their value.
SUITE_FREE = ("description", "comment")


def test_malformed_suites_raise_config_errors():
    @settings(max_examples=40, **SETTINGS)
    @given(mutated_yaml(SUITE_BASE, skip=SUITE_FREE))
    def check(seen, case):
        text, (key, path) = case
        seen.append(text)
        with tempfile.TemporaryDirectory() as tmp:
            path_file = Path(tmp) / "suite.yaml"
            path_file.write_text(text)
            err = check_ours(load_suite, path_file)
        assert isinstance(err, ConfigError), err
        assert str(path_file) in str(err), str(err)  # every suite error names the file ...
        if key is not None:  # ... and, for a bad key or value, the key (not only the file)
            assert key in str(err), (key, str(err), path)

    run_counted(check, 35)


def test_malformed_demo_configs_raise_config_errors():
    from tar_lightning.demo import DEFAULT_CONFIG, load_demo_config

    base = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    base.pop("sizes", None)

    @settings(max_examples=30, **SETTINGS)
    @given(mutated_yaml(base, skip=("comment",)))
    def check(seen, case):
        text, (key, path) = case
        seen.append(text)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "demo.yaml"
            file.write_text(text)
            err = check_ours(load_demo_config, file)
        assert isinstance(err, ConfigError), err
        if key is not None:
            assert key in str(err), (key, str(err), path)

    run_counted(check, 25)


def test_the_generators_produce_malformed_input_only():
    """The unmutated bases load (so every failure above is due to the mutation)."""
    from tar_lightning.demo import DEFAULT_CONFIG, load_demo_config

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "suite.yaml"
        file.write_text(yaml.safe_dump(SUITE_BASE))
        assert load_suite(file).name == "durability"
        base = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
        base.pop("sizes", None)
        demo = Path(tmp) / "demo.yaml"
        demo.write_text(yaml.safe_dump(base))
        assert load_demo_config(demo).seed == 0
    assert not math.isnan(TARConfig.from_dict(copy.deepcopy(VALID_TAR)).tr_weight)


# ------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("old,new,expected", [
    ("inner_steps: 4 ", "inner_stepz: 4 ", "inner_stepz"),  # unknown key in TARConfig
    ("seq_len: 64 ", "seq_lenn: 64 ", "seq_lenn"),  # unknown key in the data module
    ("tr_every: 2 ", "tr_every: 9 ", "tr_every"),  # impossible combination: tr_every > inner_steps
    ("inner_steps: 4 ", "inner_steps: four ", "inner_steps"),  # wrong type
])
def test_bad_recipe_through_the_cli_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, old, new, expected):
    from tar_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["tar-lightning"])  # as from the shell (pytest's own arguments aside)
    text = (REPO / "recipes" / "tiny" / "tar.yaml").read_text()
    assert old in text
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text.replace(old, new, 1))
    try:
        code = main(["fit", "--config", str(recipe), "--trainer.max_steps", "1"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no usage dump, no traceback
    assert err.startswith("tar-lightning: error:") and expected in err, err
