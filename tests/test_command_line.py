"""One command line for ``export``, ``redteam``, ``evaluate`` and ``demo`` (``tar_lightning.command``), driven
through the real ``tar-lightning`` entry point as a user types it: ``--config`` files merged in order, dotted
overrides, ``--print_config`` (whose output is a valid ``--config`` file), typed values, clear errors, and the 0.1
hyphenated flags kept for one release with a ``FutureWarning``."""

from __future__ import annotations

import warnings

import pytest
import yaml

from tar_lightning.cli import main


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def printed(argv, capsys) -> dict:
    code, out, err = run([*argv, "--print_config"], capsys)
    assert code == 0, err
    return yaml.safe_load(out)


def test_help_lists_every_option_with_its_type_and_default(capsys):
    code, out, _ = run(["export", "--help"], capsys)
    assert code == 0
    for option in ("--ckpt TEXT", "--out TEXT", "--overwrite BOOL", "--tokenizer", "--dtype", "--redteam",
                   "--config FILE", "--print_config"):
        assert option in out, option
    assert "(required)" in out and "(default false)" in out


def test_print_config_round_trips_and_later_layers_win(tmp_path, capsys):
    first = printed(["export", "--ckpt", "a.ckpt", "--out", "2024", "--dtype", "bfloat16"], capsys)
    assert first == {"ckpt": "a.ckpt", "out": "2024", "overwrite": False, "tokenizer": None, "dtype": "bfloat16",
                     "redteam": None}  # a text option keeps "2024" as text
    saved = tmp_path / "export.yaml"
    saved.write_text(yaml.safe_dump(first))
    assert printed(["export", "--config", str(saved)], capsys) == first
    other = tmp_path / "other.yaml"
    other.write_text("dtype: float16\noverwrite: true\n")
    both = printed(["export", "--config", str(saved), "--config", str(other)], capsys)
    assert both == {**first, "dtype": "float16", "overwrite": True}
    # a flag wins over every file wherever it stands; --key=value works too
    assert printed(["export", "--dtype=float32", "--config", str(saved), "--config", str(other)],
                   capsys)["dtype"] == "float32"


@pytest.mark.parametrize("argv,value", [(["--overwrite"], True), (["--overwrite", "false"], False),
                                        (["--overwrite", "true"], True), (["--overwrite=false"], False)])
def test_a_boolean_option_without_a_value_is_true(argv, value, capsys):
    assert printed(["export", "--ckpt", "a", "--out", "b", *argv], capsys)["overwrite"] is value


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--ckpt", "a", "--out", "b", "--overwritee"], ["unknown option --overwritee", "did you mean --overwrite"]),
        (["--ckpt", "a"], ["missing --out", "'out:' in a --config file"]),
        (["--ckpt", "a", "--out", "b", "--overwrite", "maybe"], ["overwrite must be true or false", "'maybe'"]),
        (["--ckpt", "a", "--out", "b", "--dtype"], ["--dtype needs a value"]),
        (["--ckpt", "a", "--out", "b", "stray"], ["unexpected argument 'stray'"]),
        (["--ckpt", "a", "--out", "b", "--out.x", "1"], ["--out takes a value, not sub-keys"]),
        (["--config", "/no/such/file.yaml"], ["--config /no/such/file.yaml: cannot read it"]),
    ],
)
def test_bad_command_lines_are_one_line_errors(argv, expected, capsys):
    code, out, err = run(["export", *argv], capsys)
    assert code == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and line.startswith("tar-lightning export: error:"), err
    for part in expected:
        assert part in line, (part, line)


@pytest.mark.parametrize("text,expected", [("- a\n- b\n", "expected a mapping of options"),
                                           ("ckpt: [unclosed\n", "not valid YAML")])
def test_a_bad_config_file_names_the_file(tmp_path, text, expected, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = run(["export", "--config", str(path)], capsys)
    assert code == 2 and str(path) in err and expected in err, err


def test_no_warning_for_the_current_spelling(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        printed(["export", "--ckpt", "a", "--out", "b"], capsys)


# ------------------------------------------------------------------------------------------------ demo
def test_demo_nested_options_presets_and_partial_files(tmp_path, capsys):
    minimal = printed(["demo", "--size", "minimal"], capsys)
    assert minimal["size"] == "minimal" and minimal["stage0"]["steps"] == 30  # the shipped preset
    # a dotted override wins over the preset; the rest of the section keeps the preset's values
    assert printed(["demo", "--size", "minimal", "--stage0.steps", "7"], capsys)["stage0"] == {
        **minimal["stage0"], "steps": 7}
    # a partial file merges over the shipped configuration and its preset
    partial = tmp_path / "partial.yaml"
    partial.write_text("size: minimal\nredteam: {seeds: 2}\n")
    from_file = printed(["demo", "--config", str(partial)], capsys)
    assert from_file == {**minimal, "redteam": {**minimal["redteam"], "seeds": 2}}
    # --print_config output is a file that reproduces itself, even after a preset and overrides
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(printed(["demo", "--size", "minimal", "--tar.steps", "3"], capsys)))
    again = printed(["demo", "--config", str(saved)], capsys)
    assert again["tar"]["steps"] == 3 and again == yaml.safe_load(saved.read_text())


def test_demo_errors_name_the_nested_option(capsys):
    code, _, err = run(["demo", "--stage0.stepz", "3"], capsys)
    assert code == 2 and "unknown option --stage0.stepz; did you mean --stage0.steps?" in err
    code, _, err = run(["demo", "--size", "minimal", "--stage0.steps", "many"], capsys)
    assert code == 2 and "stage0.steps must be an integer, got 'many'" in err


def test_demo_01_flags_still_work_with_a_warning(capsys):
    with pytest.warns(FutureWarning, match=r"--seeds is deprecated .* use --redteam.seeds"):
        old = printed(["demo", "--size", "minimal", "--seeds", "2", "--no-progress"], capsys)
    assert old == printed(["demo", "--size", "minimal", "--redteam.seeds", "2", "--progress", "false"], capsys)


# -------------------------------------------------------------------------------------------- evaluate
def test_evaluate_lists_take_yaml_or_commas_and_old_flags_warn(capsys):
    new = printed(["evaluate", "--model", "tiny", "--tasks", "[wmdp_bio, mmlu]", "--data_root", "d",
                   "--chat_template", "both"], capsys)
    assert new["tasks"] == ["wmdp_bio", "mmlu"] and new["variants"] == ["letter"]
    with pytest.warns(FutureWarning, match="--data-root is deprecated"):
        old = printed(["evaluate", "--model", "tiny", "--tasks", "wmdp_bio,mmlu", "--data-root", "d",
                       "--chat-template", "both"], capsys)
    assert old == new


def test_redteam_data_as_a_mapping_is_the_current_option_not_the_old_flag(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = printed(["redteam", "--model", "tiny", "--suite", "durability", "--out", "o",
                       "--data", "{forget: /x.jsonl, ood: {path: y.json, text_field: body}}"], capsys)
    assert new["data"] == {"forget": "/x.jsonl", "ood": {"path": "y.json", "text_field": "body"}}
    with pytest.warns(FutureWarning, match="--data is deprecated"):
        assert printed(["redteam", "--model", "tiny", "--suite", "durability", "--out", "o",
                        "--data", "forget=/x.jsonl", "--data", "ood={path: y.json, text_field: body}"], capsys) == new
