"""The `familial` command line for import, info and export, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from familial.checkpoint_io import export_member, load_family
from familial.cli import main


@pytest.mark.reference
def test_import_info_export(tiny_hf, tmp_path, capsys):
    family = tmp_path / "family"
    assert main(["import", str(tiny_hf), str(family), "--exits", "1,3,5",
                 "--names", "device=1,edge=3"]) == 0
    capsys.readouterr()
    assert main(["info", str(family), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [m["layers"] for m in info["members"]] == [2, 4, 6]
    assert info["saved_bytes"] == info["separate_bytes"] - info["family_bytes"] > 0
    assert info["family_parameters"] == sum(p.numel() for p in load_family(family).parameters())

    assert main(["export", str(family), str(tmp_path / "all"), "--all"]) == 0
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "all" / "edge", dtype=torch.float32)
    assert stock.config.num_hidden_layers == 4


def test_errors_are_reported_not_raised(tiny_hf, tmp_path, capsys):
    assert main(["import", str(tiny_hf), str(tmp_path / "f"), "--exits", "1,9"]) == 2
    assert "exit 9 is outside the trunk" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_every_command_in_the_table_is_one_function_with_its_help(capsys):
    from familial.cli import COMMANDS, Command, resolve

    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            commands = {(name,): entry}
        else:
            commands = {(name, action): command for action, command in entry.actions.items()}
            with pytest.raises(SystemExit) as done:
                main([name, "--help"])
            listed = " ".join(capsys.readouterr().out.split())
            assert done.value.code == 0 and entry.help in listed
            assert all(f"{action} {command.help}" in listed for action, command in entry.actions.items()), listed
        for words, command in commands.items():
            function = resolve(command)
            assert callable(function) and callable(function.add_arguments), command.function
            with pytest.raises(SystemExit) as done:
                main([*words, "--help"])
            out = capsys.readouterr().out
            assert done.value.code == 0 and out.startswith(f"usage: familial {' '.join(words)} "), out
            assert len(words) == 2 or command.help in " ".join(out.split()), out


def test_info_does_not_import_the_trainer(family):
    # `familial info` answers in a fraction of the time the trainer's imports take.
    check = ("import sys; from familial.cli import main; code = main(['info', sys.argv[1]]); "
             "sys.exit(code or 'familial.train.loop' in sys.modules or 'familial.commands.train' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check, str(family)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "family " in done.stdout


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("names, message", [
    ("exit-3=1", "alias 'exit-3' for exit 1 would be read as the member id 'exit-3'"),
    ("a=1,a=3", "alias 'a' is given twice (a=1 and a=3)"),
])
def test_member_names_are_checked_as_a_set(tiny_hf, tmp_path, capsys, names, message):
    argv = ["import", str(tiny_hf), str(tmp_path / "f"), "--exits", "1,3,5", "--names", names]
    try:
        code = main(argv)
    except SystemExit as error:  # argparse's own error: usage, then the message
        code = error.code
    assert code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


@pytest.fixture
def family(tmp_path):
    from familial.checkpoint_io import save_family
    from familial.config import FamilyConfig
    from familial.model import FamilyModel

    config = FamilyConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, exits=[0, 1],
                          max_position_embeddings=32)
    return save_family(FamilyModel(config), tmp_path / "family")


def test_output_paths_under_or_at_a_file_are_one_line_errors(family, tiny_hf, tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("not a directory")
    for target in (file, file / "out"):
        for argv in (["export", str(family), str(target), "--all"],
                     ["export", str(family), str(target), "--member", "0"],
                     ["import", str(tiny_hf), str(target), "--exits", "1,5"],
                     ["report", str(family), "--out", str(target)]):
            assert main(argv) == 2
            assert str(target) in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "family", "file.txt"]
    assert file.read_text() == "not a directory"


def test_family_json_that_is_a_directory_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "broken" / "family.json").mkdir(parents=True)
    for command in ("info", "verify", "generate"):
        extra = ["--prompt-ids", "1"] if command == "generate" else []
        assert main([command, str(tmp_path / "broken"), *extra]) == 2
        assert f"{tmp_path / 'broken' / 'family.json'}: cannot be read (Is a directory)" in one_line(capsys)


def test_int64_weights_are_refused_by_generate_in_one_line(family, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(family / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"].long()
    save_file(tensors, family / "model.safetensors")
    assert main(["generate", str(family), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 2
    assert "tensor 'lm_head.weight' has dtype I64, expected a floating-point dtype" in one_line(capsys)


def test_binary_train_config_names_the_file(tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_bytes(b"steps = 3\n\x80\x81\x00\xff")
    assert main(["train", str(config)]) == 2
    assert f"{config}: not a UTF-8 text file" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.toml"]


@pytest.mark.parametrize("command, extra", [("plot", "train"), ("report", "eval")])
def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch, capsys, command, extra):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "familial.eval.report", raising=False)
    argv = [str(run)] if command == "plot" else [str(run), "--out", str(tmp_path / "report")]
    assert main([command, *argv]) == 2
    assert f"needs matplotlib, which is not installed: run pip install 'familial[{extra}]'" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_counts_take_the_noun_in_the_right_number(tmp_path, capsys):
    from familial.checkpoint_io import save_family
    from familial.config import FamilyConfig
    from familial.model import FamilyModel

    one = FamilyConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, exits=[0], max_position_embeddings=32)
    assert main(["info", str(save_family(FamilyModel(one), tmp_path / "one"))]) == 0
    assert "1 trunk layer," in capsys.readouterr().out
    from familial.threads import pick_threads
    from familial.train.losses import ExitSums
    from familial.train.loop import StepResult, Trainer

    assert "x 1 layer)" in pick_threads(32, 1)[1]
    trainer = object.__new__(Trainer)
    trainer.family_config = one
    result = StepResult(ExitSums({0: 2.0}, {}), 2.0, 1.0, 10, 10, False)
    assert trainer._progress(result, 1e-3, 1.0).startswith("mean CE of 1 exit 2.000")


def test_a_taken_output_names_the_overwrite_flag(family, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep").write_text("keep")
    (tmp_path / "code.txt").write_text("x = 1\n")
    for argv in (["export", str(family), str(tmp_path / "taken"), "--all"],
                 ["data", "prepare", str(tmp_path / "code.txt"), "--tokenizer", "demo", "--out",
                  str(tmp_path / "taken")]):
        assert main(argv) == 2
        assert "pass --overwrite to replace it" in one_line(capsys)


def test_directory_inputs_name_the_glob_they_used(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("README", "LICENSE"):
        (corpus / name).write_text("the quick brown fox jumps over the lazy dog\n" * 30)
    for command in (["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")],
                    ["data", "prepare", str(corpus), "--tokenizer", "demo", "--out", str(tmp_path / "s")]):
        assert main(command) == 2
        assert (f"{corpus}: directory has no files matching --glob '*.txt' (it holds 2 files in all); "
                f"pass --glob '*' to take every file") in one_line(capsys)
        assert main([*command, "--glob", "*"]) == 0
        capsys.readouterr()
    for command in (["tokenizer", "train"], ["data", "prepare"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "(default: *.txt; '*' takes every file)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.reference
def test_import_shared_head_gives_every_member_the_dense_models_one_head(tiny_hf, tmp_path):
    assert main(["import", str(tiny_hf), str(tmp_path / "family"), "--exits", "1,3,5", "--shared-head"]) == 0
    family = load_family(tmp_path / "family").eval()
    assert family.config.shared_head
    assert [n for n in family.state_dict() if n.endswith("lm_head.weight")] == ["lm_head.weight"]
    assert family.exit_head(1) is family.exit_head(3) is family.lm_head
    ids = torch.randint(0, 97, (2, 11))
    for exit_layer in (1, 3):
        # The member is stock transformers' dense model cut after its exit's branch layer.
        reference = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
        keep = exit_layer + 1
        reference.model.layers = reference.model.layers[:keep]
        reference.config.num_hidden_layers = keep
        reference.config.layer_types = reference.config.layer_types[:keep]
        exported = AutoModelForCausalLM.from_pretrained(export_member(tmp_path / "family", tmp_path / f"m{exit_layer}",
                                                                      exit_layer), dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(family(ids)[exit_layer], reference(ids).logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
