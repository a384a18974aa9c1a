"""The README against the code: every `nanoseek` and benchmark command it quotes parses with that
command's own flags, the code layout names files that exist (and every module that is a file of its
own), each benchmark table names the command behind it, the Python API example runs as written; and
the command line's errors are one line with exit status 2 (an unknown command, a flag argparse
refuses, a missing optional package, a demo longer than the model's context)."""

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import cli
from nanoseek.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def one_line(err: str, start: str) -> str:
    assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- one-line errors, exit status 2 --------------------------------------------------------------------
def test_an_unknown_command_is_one_line_with_status_2(capsys):
    assert main(["trian"]) == 2  # was argparse's usage block and SystemExit
    err = one_line(capsys.readouterr().err, "nanoseek: unknown command 'trian'")
    assert "train" in err and "nanoseek --help" in err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--tokens", "x"], "nanoseek demo: error: argument --tokens: invalid int value: 'x'"),
    (["demo", "--preset", "huge"], "nanoseek demo: error: argument --preset: invalid choice: 'huge'"),
    (["demo", "--bogus"], "nanoseek demo: error: unrecognized arguments: --bogus"),
    (["params"], "nanoseek params: error: the following arguments are required: model"),
])
def test_flags_argparse_refuses_are_one_line_with_status_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = one_line(capsys.readouterr().err, message)  # was the usage block (two lines or more), then this
    assert err.rstrip().endswith(f"see nanoseek {argv[0]} --help")


def test_help_still_prints_the_usage_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: nanoseek demo")


def test_a_missing_optional_package_at_run_time_names_the_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `nanoseek serve` imports it when it runs
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2  # was a ModuleNotFoundError traceback
    assert one_line(capsys.readouterr().err, "nanoseek serve") == \
        "nanoseek serve needs the package 'uvicorn': pip install 'nanoseek[serve]'\n"


def test_pillow_missing_for_an_image_names_the_vision_extra(monkeypatch, capsys):
    fake = types.ModuleType("fake_generate")
    fake.add_arguments = lambda parser: None

    def run(args):
        raise ModuleNotFoundError("No module named 'PIL'", name="PIL")  # as `import PIL` fails without Pillow

    fake.run = run
    monkeypatch.setitem(sys.modules, "fake_generate", fake)
    monkeypatch.setitem(cli.COMMANDS, "generate", ("fake_generate", "generate"))
    assert main(["generate"]) == 2
    assert capsys.readouterr().err == "nanoseek generate needs the package 'Pillow': pip install 'nanoseek[vision]'\n"


def test_other_missing_modules_at_run_time_are_not_hidden(monkeypatch):
    fake = types.ModuleType("fake_demo")
    fake.add_arguments = lambda parser: None

    def run(args):
        raise ModuleNotFoundError("No module named 'nanoseek.gone'", name="nanoseek.gone")  # a bug, not an install

    fake.run = run
    monkeypatch.setitem(sys.modules, "fake_demo", fake)
    monkeypatch.setitem(cli.COMMANDS, "demo", ("fake_demo", "demo"))
    with pytest.raises(ModuleNotFoundError):
        main(["demo"])


def test_demo_refuses_a_continuation_past_the_context(capsys):
    context = nanoseek.get_preset("test").max_position_embeddings
    assert main(["demo", "--preset", "test", "--tokens", str(context - 7), "--device", "cpu"]) == 2  # ran on
    assert one_line(capsys.readouterr().err, "nanoseek demo:") == (
        f"nanoseek demo: --tokens must be at most {context - 8} (test's context of {context} less the "
        f"8-token prompt), got {context - 7}\n")


def test_demo_help_says_what_each_flag_does():
    parser = argparse.ArgumentParser()
    importlib.import_module("nanoseek.demo").add_arguments(parser)
    assert all(action.help for action in parser._actions)


# ---- README commands parse with the flags the code has -------------------------------------------------
def readme_nanoseek_commands() -> list[list[str]]:
    """argv (without `nanoseek`) of every command in the README's bash blocks and of each inline
    `nanoseek ...` without placeholders; scripts/run.sh's arguments are `nanoseek train`'s."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "|" in words:
                words = words[words.index("|") + 1:]
            if words[:2] == ["bash", "scripts/run.sh"]:
                commands.append(["train", *words[2:]])
            elif words[:1] == ["nanoseek"]:
                commands.append(words[1:])
    for inline in re.findall(r"`(nanoseek [^`<\[]*)`", README):
        if "..." in inline:
            continue  # elided
        words = shlex.split(inline)
        if len(words) > 2 and words[1] in cli.COMMANDS:  # a bare `nanoseek serve` names the command
            commands.append(words[1:])
    return commands


def test_the_readme_quotes_commands_of_every_kind():
    names = {argv[0] for argv in readme_nanoseek_commands()}
    assert {"train", "sft", "tokenizer", "generate", "serve", "chat", "train-vlm", "eval-vlm", "params"} <= names


@pytest.mark.parametrize("argv", readme_nanoseek_commands(), ids=" ".join)
def test_each_readme_command_parses(argv):
    module_name, _ = cli.COMMANDS[argv[0]]
    parser = argparse.ArgumentParser(prog=f"nanoseek {argv[0]}", exit_on_error=False)
    importlib.import_module(module_name).add_arguments(parser)
    parser.parse_args(argv[1:])  # an unknown or misspelt flag raises


class Parsed(Exception):
    pass


# quoted for the record, not to rerun: README says the variant lived in a temporary switch
NOT_RERUNNABLE = {"benchmarks/serve_ab.py --clients 1 --pairs 4 --threads 2"}


def readme_benchmark_commands() -> list[tuple[str, list[str]]]:
    found = []
    for script, flags in re.findall(r"`python\s+(benchmarks/\w+\.py)([^`]*)`", README):
        text = " ".join(f"{script}{flags}".split())
        if text not in NOT_RERUNNABLE:
            found.append((script, shlex.split(" ".join(flags.split()))))
    return found


def test_the_readme_quotes_every_benchmark():
    scripts = {script for script, _ in readme_benchmark_commands()}
    assert scripts == {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")}


@pytest.mark.parametrize("script, flags", readme_benchmark_commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_each_readme_benchmark_command_parses(script, flags, monkeypatch):
    check_benchmark_flags(script, flags, monkeypatch)


def check_benchmark_flags(script: str, flags: list[str], monkeypatch) -> None:
    """The script's own parser accepts the flags; the run stops right after parsing."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parsed = original(self, args, namespace)
        raise Parsed(parsed)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # benchmarks/train.py sets it: undone after the test
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # serve_ab.py imports serve.py beside it
    monkeypatch.setattr(sys, "argv", [script, *flags])
    spec = importlib.util.spec_from_file_location(f"bench_docs_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Parsed):
        module.main()


# ---- scripts/gpu_check.sh ---------------------------------------------------------------------------------
def gpu_check_command(marker: str) -> list[str]:
    script = (ROOT / "scripts" / "gpu_check.sh").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if marker in line)
    return shlex.split(line.split(marker, 1)[1].split(">", 1)[0])


def test_the_gpu_checks_training_run_goes_to_a_fresh_folder_each_time():
    """A second run of the script on the same machine trained into the first one's --out, which
    `nanoseek train` refuses (it already holds a run's checkpoints)."""
    flags = gpu_check_command("nanoseek.cli train")
    out = flags[flags.index("--out") + 1]
    assert out.startswith("$"), out
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert re.search(rf"^{re.escape(out[1:])}=\$\(mktemp -d\)", script, re.M)
    parser = argparse.ArgumentParser(exit_on_error=False)
    importlib.import_module("nanoseek.train.pretrain").add_arguments(parser)
    parser.parse_args(flags)


def test_the_gpu_checks_decode_benchmark_flags_exist(monkeypatch):
    check_benchmark_flags("benchmarks/decode.py", gpu_check_command("benchmarks/decode.py"), monkeypatch)


# ---- the code layout ------------------------------------------------------------------------------------
def layout_block() -> str:
    section = README.split("## How the code is laid out", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def test_the_layout_names_files_that_exist_and_every_module_file():
    listed, folder = set(), None
    for line in layout_block().splitlines():
        name = line.split()[0] if line.strip() else ""
        if not re.fullmatch(r"[\w.]+/?", name):
            continue  # a continuation line
        depth = (len(line) - len(line.lstrip())) // 2
        if depth > 2:
            continue  # a description's continuation
        if depth == 0:
            path = Path(name)
        elif depth == 1:
            path = Path("nanoseek") / name
            folder = path if name.endswith("/") else None
        else:
            path = folder / name
        assert (ROOT / path).exists(), path
        listed.add(path.as_posix().rstrip("/"))
    for sub in ("nanoseek", "nanoseek/model"):  # the folders listed file by file
        for file in (ROOT / sub).glob("*.py"):
            if file.name != "__init__.py":
                assert f"{sub}/{file.name}" in listed, f"{sub}/{file.name} is not in the README's layout"
    for sub in ("train", "inference", "serve"):
        assert f"nanoseek/{sub}" in listed
    for top in ("tests", "benchmarks", "scripts"):
        assert top in listed


# ---- every benchmark table names its command -------------------------------------------------------------
def test_every_figure_table_names_the_command_behind_it():
    text = README.split("## Command line", 1)[1]
    lines, previous_end, tables = text.splitlines(), 0, 0
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            header = lines[start]
            if not header.startswith("| command |"):  # the table of subcommands
                before = " ".join(lines[previous_end:start] + [header])
                assert "python benchmarks/" in before, f"no benchmark command for the table {header[:80]!r}"
                tables += 1
            previous_end = i
        i += 1
    assert tables >= 10


# ---- the Python API example runs as written ---------------------------------------------------------------
def test_the_python_api_example_runs(tmp_path):
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    folder = tmp_path / "model"
    nanoseek.save(nanoseek.build_model(nanoseek.get_preset("test"), seed=0), folder)
    code = code.replace('"path/to/folder"', repr(str(folder))).replace('"out/"', repr(str(tmp_path / "out")))
    scope = {"ids": torch.tensor([[1, 2, 3, 4, 5]])}
    exec(code, scope)
    assert scope["logits"].shape == (1, 5, scope["config"].vocab_size)
    assert [m.shape for m in scope["mtp_logits"]] == [(1, 4, scope["config"].vocab_size)]  # module 1: (B, T-1, V)
    assert (tmp_path / "out" / "config.json").exists()
