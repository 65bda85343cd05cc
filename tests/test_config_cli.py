"""Nested dataclass configs: YAML files, dotted flags, precedence, unknown keys, --print-config."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from legolm.cli.args import _DEST, OnOffAction, add_config_args, resolve_config
from legolm.cli.main import build_parser, main
from legolm.config import config_from_dict, dump_yaml
from legolm.errors import ConfigError
from legolm.train.config import TrainConfig


def _parse(args: list[str], base: dict | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_args(parser, TrainConfig, {"--overwrite": "run.overwrite"})
    return resolve_config(TrainConfig, parser.parse_args(args), base)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("legolm: error:"), err
    return err[0]


def test_defaults_then_yaml_then_flags(tmp_path: Path) -> None:
    low = tmp_path / "low.yaml"
    low.write_text("optim:\n  lr: 3e-4\n  weight_decay: 0.05\nmodel:\n  n_embd: 96\nbatch_size: 4\n")
    high = tmp_path / "high.yaml"
    high.write_text("optim:\n  lr: 1.0e-4\n")
    cfg = _parse(["--config", str(low), "--config", str(high), "--optim.lr", "5e-4", "--model.layers", "llama",
                  "llama", "--run.out_dir", "runs/x", "--overwrite", "--no-run.progress", "--optim.fused", "auto"])
    assert cfg.optim.lr == 5e-4  # flag beats both files
    assert cfg.optim.weight_decay == 0.05 and cfg.model.n_embd == 96 and cfg.batch_size == 4  # from the YAML
    assert cfg.optim.beta2 == 0.95 and cfg.window == 128  # untouched defaults
    assert cfg.model.layers == ["llama", "llama"] and cfg.run.out_dir == "runs/x"
    assert cfg.run.overwrite is True and cfg.run.progress is False and cfg.optim.fused is None
    assert _parse(["--config", str(low), "--config", str(high)]).optim.lr == 1e-4  # later file wins
    # "3e-4" is a string to YAML 1.1; a float field still reads it as 0.0003
    assert isinstance(_parse(["--config", str(low)]).optim.lr, float)


def test_base_layer_sits_between_defaults_and_files(tmp_path: Path) -> None:
    base = {"optim": {"lr": 0.02, "eps": 1e-6}, "data": {"source": "tinystories"}}
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.01}\n")
    cfg = _parse(["--config", str(f)], base)
    assert cfg.optim.lr == 0.01 and cfg.optim.eps == 1e-6 and cfg.data.source == "tinystories"


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--print-config", "--optim.lr", "0.004", "--model.layers", "gpt2", "gpt2",
                 "--eval.patience", "3", "--sample.prompt", "Hello there"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["optim"]["lr"] == 0.004 and data["model"]["layers"] == ["gpt2", "gpt2"]
    f = tmp_path / "printed.yaml"
    f.write_text(text)
    assert _parse(["--config", str(f)]) == config_from_dict(TrainConfig, data)
    assert dump_yaml(config_from_dict(TrainConfig, data)) == text
    default = dataclasses.asdict(TrainConfig())
    assert set(data) == set(default) and set(data["run"]) == set(default["run"])


@pytest.mark.parametrize(("yaml_text", "fragments"), [
    ("optim:\n  lrr: 0.1\n", ["unknown config key optim.lrr", "did you mean optim.lr", "valid keys of optim",
                               "weight_decay"]),
    ("windoww: 3\n", ["unknown config key windoww", "valid keys are", "batch_size", "optim"]),
    ("optim: 0.1\n", ["optim is a section"]),
    ("optim:\n  lr: fast\n", ["optim.lr", "expected float", "fast"]),
    ("batch_size: 2.5\n", ["batch_size", "expected int"]),
    ("run:\n  precision: fp8\n", ["run.precision", "one of auto|fp32|bf16-mixed"]),
    ("- a list\n", ["must hold a mapping"]),
    ("optim: [unclosed\n", ["not valid YAML"]),
])
def test_bad_yaml_is_one_line_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str,
                                             fragments: list[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    assert main(["pretrain", "--config", str(f), "--print-config"]) == 2
    line = _one_error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--optim.lrr", "1"], ["unknown config key optim.lrr", "did you mean optim.lr", "valid keys of optim"]),
    (["--optimm.lr", "1"], ["unknown flag --optimm.lr", "did you mean --optim.lr", "valid sections"]),
    (["--optim.l", "1"], ["unknown config key optim.l"]),  # no prefix abbreviations
    (["--optim.lr", "abc"], ["--optim.lr", "expected float", "abc"]),
    (["--run.precision", "fp8"], ["--run.precision", "expected one of"]),
    (["--config", "/nonexistent/x.yaml"], ["cannot read config file /nonexistent/x.yaml"]),
])
def test_bad_flags_are_one_line(capsys: pytest.CaptureFixture[str], flags: list[str], fragments: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        code = main(["pretrain", "--print-config", *flags])
        raise SystemExit(code)
    assert exc.value.code == 2
    line = _one_error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line


def test_config_from_dict_checks_nested_types() -> None:
    with pytest.raises(ConfigError, match=r"model.layers\[1\]: expected str"):
        config_from_dict(TrainConfig, {"model": {"layers": ["pythia", ["x"]]}})
    with pytest.raises(ConfigError, match="expected int or null"):
        config_from_dict(TrainConfig, {"max_steps": "many"})
    cfg = config_from_dict(TrainConfig, {"max_steps": None, "epochs": 2, "run": {"compile": "yes"}})
    assert cfg.max_steps is None and cfg.epochs == 2 and cfg.run.compile is True


@pytest.mark.parametrize(("flags", "fused"), [
    ([], None), (["--optim.fused"], True), (["--no-optim.fused"], False), (["--optim.fused", "auto"], None),
    (["--optim.fused=auto"], None), (["--no-optim.fused", "--optim.fused"], True),
])
def test_an_auto_setting_is_on_off_or_auto(flags: list[str], fused: bool | None) -> None:
    assert _parse(flags).optim.fused is fused


def test_an_auto_setting_reads_auto_from_yaml(tmp_path: Path) -> None:
    for text, fused in (("auto", None), ("null", None), ("true", True), ("false", False)):
        f = tmp_path / "c.yaml"
        f.write_text(f"optim: {{fused: {text}}}\n")
        assert _parse(["--config", str(f)]).optim.fused is fused


@pytest.mark.parametrize("flags", [
    ["--optim.fused", "none"], ["--optim.fused", "true"], ["--optim.fused", "false"], ["--no-optim.fused", "auto"],
    ["--no-optim.fused=auto"], ["--no-run.progress=false"], ["--run.progress", "false"], ["--overwrite=yes"],
])
def test_on_off_flags_take_no_true_false_values(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--print-config", *flags])
    assert exc.value.code == 2
    _one_error_line(capsys)


def _on_off_offenders(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """Flags of ``parser`` (and its subcommands) that switch something on or off in another style than
    ``--x / --no-x`` (plus ``auto`` for settings with an automatic choice)."""
    from legolm.cli.args import OnOffAction

    commands = {"--help", "--print-config", "--state-sizes"}  # actions, not settings
    bad = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                bad += _on_off_offenders(sub, f"{prog} {name}")
        elif isinstance(action, OnOffAction):
            on = [s for s in action.option_strings if not s.startswith("--no-")]
            if sorted(action.option_strings) != sorted(on + ["--no-" + s[2:] for s in on]):
                bad.append(f"{prog} {action.option_strings}")
        elif action.nargs == 0 and not set(action.option_strings) & commands:
            bad.append(f"{prog} {action.option_strings} ({type(action).__name__})")
        elif "bool" in getattr(action.type, "__name__", ""):
            bad.append(f"{prog} {action.option_strings} takes a true/false value")
    return bad


def test_every_on_off_flag_has_one_style() -> None:
    from legolm.cli.main import build_parser

    assert _on_off_offenders(build_parser(), "legolm") == []


def test_generate_keeps_its_flat_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out and "--top-p" in out


def test_a_yaml_section_keeps_the_commands_own_defaults_for_keys_it_does_not_set() -> None:
    from legolm.config import config_from_dict
    from legolm.recipes.finetune import FinetuneConfig

    default = FinetuneConfig()
    cfg = config_from_dict(FinetuneConfig, {"data": {"source": "tinystories"}, "lora": {"r": 4}})
    assert cfg.data.source == "tinystories" and cfg.data.tokenizer == default.data.tokenizer == "model"
    assert cfg.lora.r == 4 and cfg.lora.target_modules == default.lora.target_modules == ["all-linear"]
    assert cfg.run.out_dir == default.run.out_dir == "runs/finetune"


def _helps(parser: argparse.ArgumentParser, name: str = "legolm") -> list[tuple[str, str, str]]:
    """(command, option, help text without argparse's default suffix) of every option of every command."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                out += _helps(sub, f"{name} {sub_name}")
        elif action.help and action.help != argparse.SUPPRESS:
            text = re.sub(r"\s*\(default: %\(default\)s\)$", "", action.help).strip()
            out.append((name, (action.option_strings or [action.dest])[0], text))
    return out


def test_no_help_text_is_cut_mid_sentence() -> None:
    """A setting's help is its whole docstring entry (continuation lines included): every sentence-style help ends
    as a sentence does."""
    helps = _helps(build_parser())
    assert len(helps) > 300
    cut = [(cmd, opt, text[-50:]) for cmd, opt, text in helps
           if text[:1].isupper() and not text.endswith((".", ")", "?", "!", ":", "`"))]
    assert not cut, cut


# -- one flag style, one alias mechanism ------------------------------------------------------------------
def _commands(parser: argparse.ArgumentParser,
              words: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command's parser (``("eval", "ppl")`` -> its parser), leaves only."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {words: parser}
    return {k: v for name, sub in subs[0].choices.items() for k, v in _commands(sub, (*words, name)).items()}


def _aliases(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.Action]]:
    """(alias, the key's own flag, action) of a command: the option strings that are not the key's own names."""
    out = []
    for action in parser._actions:
        if not action.dest.startswith(_DEST):
            continue
        key = action.dest[len(_DEST):]
        own = {"--" + key, "--" + key.replace("_", "-")}
        own |= {"--no-" + flag[2:] for flag in own}
        out += [(flag, "--" + key.replace("_", "-"), action) for flag in action.option_strings
                if flag not in own and not flag.startswith("--no-")]
    return out


def test_every_command_has_one_flag_style() -> None:
    """Each command's options are the keys of its config (dotted when nested) and aliases of them, plus the
    ``--config`` / ``--print-config`` pair; no command keeps flags of another kind."""
    commands = _commands(build_parser())
    assert set(commands) == {("generate",), ("export",), ("analyze", "rank"), ("finetune",), ("eval", "ppl"),
                             ("pretrain",), ("lego",), ("lct",), ("experiment",), ("serve",)}
    for words, parser in commands.items():
        other = {s for a in parser._actions if not a.dest.startswith(_DEST) for s in a.option_strings}
        assert other <= {"-h", "--help", "--config", "--print-config", "--state-sizes"}, (words, other)
        assert not parser.allow_abbrev, words


def test_aliases_are_declared_once_and_only_where_expected() -> None:
    found = {(" ".join(words), alias, own) for words, parser in _commands(build_parser()).items()
             for alias, own, _ in _aliases(parser)}
    resume = {("--overwrite", "--run.overwrite"), ("--resume", "--run.resume")}
    assert found == {
        *(("pretrain", *a) for a in resume), *(("lego", *a) for a in resume),
        *(("finetune", *a) for a in resume), ("finetune", "--data", "--data.source"),
        ("lct", "--overwrite", "--run.overwrite"),
        ("experiment", "--overwrite", "--run.overwrite"), ("experiment", "--lr", "--optim.lr"),
        ("experiment", "--data", "--data.source"),
        ("eval ppl", "--data", "--data.source"), ("eval ppl", "--tokenizer", "--data.tokenizer"),
    }


def test_an_alias_must_name_a_key() -> None:
    with pytest.raises(ValueError, match=r"--lr -> optim\.lrr"):
        add_config_args(argparse.ArgumentParser(), TrainConfig, {"--lr": "optim.lrr"})


def test_each_alias_and_its_dotted_flag_give_the_same_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Through every command's parser: the alias and the key's own flag (and their --no- forms) resolve to the
    same config, which differs from the default one (the flag took effect)."""
    monkeypatch.chdir(tmp_path)  # --resume looks for the run's saved config.yaml

    def printed(words: tuple[str, ...], *flags: str) -> str:
        assert main([*words, *flags, "--print-config"]) == 0
        return capsys.readouterr().out

    checked = 0
    for words, parser in _commands(build_parser()).items():
        for alias, own, action in _aliases(parser):
            if isinstance(action, OnOffAction):
                forms = [([alias], [own]), (["--no-" + alias[2:]], ["--no-" + own[2:]])]
            else:
                value = {"float": "0.125", "int": "7"}.get(getattr(action.type, "__name__", ""), "some-text")
                forms = [([alias, value], [own, value])]
            for short, dotted in forms:
                assert printed(words, *short) == printed(words, *dotted), (words, short)
            assert printed(words, *forms[0][0]) != printed(words), (words, alias)
            checked += 1
    assert checked == 13
