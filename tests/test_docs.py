"""Every command the README and docs/ show parses: its program exists and takes the flags shown.

A renamed or removed flag otherwise lives on in the docs until a reader pastes the command and
it fails. Commands come from ```bash blocks (parsed in full: flags, their values' types and
choices, required arguments) and from inline `code` in the text that starts like a command of
ours (`seqrec ...`, `python ...`, `torchrun ...`; only whether each flag exists, since prose
names flags without their values). Each program's parser is the one its entry point builds,
taken at its first parse so that nothing runs.

Placeholders stand for any value: <angle brackets>, UPPER_CASE words (PATH/ml-1m, N, RUN_DIR...)
and `...`; [optional groups] count as given and `a|b|c` as each alternative in turn.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = {"seqrec", "python", "python3", "torchrun"}  # inline `code` starting so is a command
NOT_OURS = {"pip", "pip3", "cd", "wait", "git", "export", "source", "echo", "cat", "ls", "mkdir", "cp", "mv",
            "rm", "curl", "wget", "unzip", "iconv", "nvidia-smi", "tail", "head", "kill", "sleep", "time"}
LAUNCHERS = {"train_distributed.sh", "launch/multinode.sh", "launch/slurm.sbatch"}  # DATASET TRAIN_DIR [main.py flags]
TRAIN = "seqrec train"  # the parser of main.py, train_distributed.sh and the launchers too
# Commands that hand flags they do not define to `seqrec train` (see their --help):
# tune its unknown flags, ablation.py what follows `--`.
UNKNOWN_TO_TRAIN = {"seqrec tune"}
AFTER_DASHES_TO_TRAIN = {"python launch/ablation.py"}
SEPARATORS = {"&&", "||", ";", "&", "|"}
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|[A-Z][A-Z0-9_]*(\W.*)?|.*\.\.\.")


class DocProblem(Exception):
    """A shown command that would not run as shown; the message says why."""


@dataclass(frozen=True)
class Shown:
    """One command as a doc shows it."""
    doc: Path
    line: int
    text: str
    inline: bool
    index: int = 0  # the n-th inline command of its line

    @property
    def id(self) -> str:
        where = f"{self.doc.relative_to(REPO)}:{self.line}"
        return f"{where}.{self.index}" if self.inline else where


# ------------------------------------------------------------------ finding the commands


def fenced_commands(doc: Path, lines: list[str]) -> list[Shown]:
    """The command lines of the doc's shell blocks, continuation lines (`\\`) joined."""
    found, language, pending, start = [], None, "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            language = line.strip()[3:].strip().lower() if language is None else None
            continue
        if language not in SHELL_BLOCKS:
            continue
        text = line.strip()
        if language == "console" and not pending:  # a prompt line; the rest is output
            if not text.startswith("$ "):
                continue
            text = text[2:]
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        if (pending + text).strip() and not (pending + text).startswith("#"):  # not a comment line
            found.append(Shown(doc, start, (pending + text).strip(), inline=False))
        pending = ""
    return found


def inline_commands(doc: Path, lines: list[str]) -> list[Shown]:
    """The `code` spans outside code blocks whose first word (after VAR=value) is one of ours.
    A span may run over lines of its paragraph (`python main.py --inference_only` then
    `--state_dict_path ...` on the next), not over a blank line."""
    prose, fenced = [], False
    for line in lines:
        fence = line.lstrip().startswith("```")
        fenced ^= fence
        prose.append("" if fence or fenced else line)
    text, found, per_line = "\n".join(prose), [], {}
    for match in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)*)`", text):
        span = " ".join(match.group(1).split())
        if looks_like_a_command(span):
            number = text.count("\n", 0, match.start()) + 1
            per_line[number] = per_line.get(number, -1) + 1
            found.append(Shown(doc, number, span, inline=True, index=per_line[number]))
    return found


def looks_like_a_command(span: str) -> bool:
    words = [w for w in span.split() if not is_assignment(w)]
    return len(words) >= 2 and words[0] in COMMAND_WORDS


def shown_commands() -> list[Shown]:
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        found += fenced_commands(doc, lines) + inline_commands(doc, lines)
    return found


# ------------------------------------------------------------------ from a command line to words


def is_assignment(word: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word) is not None


def is_placeholder(value) -> bool:
    return isinstance(value, str) and PLACEHOLDER.fullmatch(value) is not None


def simple_commands(tokens: list[str]) -> list[list[str]]:
    """The commands of a line split at &&, ||, ;, & and |, each without its VAR=value prefix,
    redirections and the brackets of optional groups."""
    commands, current = [], []
    for token in [*tokens, ";"]:
        if token in SEPARATORS:
            words = cleaned(current)
            if words:
                commands.append(words)
            current = []
        else:
            current.append(token)
    return commands


def cleaned(tokens: list[str]) -> list[str]:
    words, skip_next = [], False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in (">", ">>", "<", "2>", "&>"):
            skip_next = True  # the redirection's target
        elif re.match(r"\d*[<>]", token):
            continue
        elif not words and is_assignment(token):
            continue
        elif token.strip("[]"):
            words.append(token.lstrip("[").rstrip("]"))
    return words


def alternatives(words: list[str]) -> list[list[str]]:
    """One variant per alternative of each `a|b|c` word (the other such words at their first)."""
    choices = [word.split("|") if "|" in word else [word] for word in words]
    first = [options[0] for options in choices]
    variants = [first]
    for i, options in enumerate(choices):
        variants += [first[:i] + [option] + first[i + 1:] for option in options[1:]]
    return variants


# ------------------------------------------------------------------ which parser checks which words


def programs(words: list[str]) -> list[tuple[str, list[str]]]:
    """(program, its arguments) for each parser the command line reaches; [] for a program that
    is not this project's. Raises DocProblem for a missing script or an unknown program."""
    head, args = words[0], words[1:]
    if head == "seqrec":
        return [(f"seqrec {args[0]}", args[1:])] if args else []
    if head in ("python", "python3"):
        return python_programs(args)
    if head == "torchrun":
        return torchrun_programs(args)
    if head in ("sbatch", "bash", "sh"):  # the script is the first word that is not an option (--nodes=2)
        at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        if at is None:
            raise DocProblem(f"{head} without a script")
        head, args = args[at], args[at + 1:]
    return script_programs(head, args)


def python_programs(args: list[str]) -> list[tuple[str, list[str]]]:
    if not args:
        return []
    if args[0] == "-m":
        module = args[1]
        if module == "seqrec.cli":
            return programs(["seqrec", *args[2:]])
        return [(f"python -m {module}", args[2:])] if module.split(".")[0] == "seqrec" else []
    return [(f"python {args[0]}", args[1:])]


def torchrun_programs(args: list[str]) -> list[tuple[str, list[str]]]:
    """torchrun's own flags up to the script (the first .py word), then the script's."""
    at = next((i for i, a in enumerate(args) if a.endswith(".py") and not a.startswith("-")), None)
    if at is None:
        return [("torchrun", [*args, "SCRIPT.py"])]
    return [("torchrun", args[:at + 1]), (f"python {args[at]}", args[at + 1:])]


def script_programs(head: str, args: list[str]) -> list[tuple[str, list[str]]]:
    path = head.removeprefix("./")
    if head in NOT_OURS:
        return []
    if "/" not in head and path not in LAUNCHERS:
        raise DocProblem(f"unknown program {head!r}: tests/test_docs.py does not know how to check it")
    if not (REPO / path).is_file():
        raise DocProblem(f"no file {path} in the repository")
    return [(TRAIN, args[2:])] if path in LAUNCHERS else []


class _Captured(BaseException):
    """Carries the parser out of an entry point (BaseException: no `except Exception` stops it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def captured_parser(entry, program: str) -> argparse.ArgumentParser:
    """The parser entry(argv) builds, taken when it starts parsing, so the command never runs."""
    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            entry([])
        except _Captured as got:
            return got.parser
    raise DocProblem(f"{program}: not a command (it parses no flags)")


@functools.cache
def parser_for(program: str) -> argparse.ArgumentParser:
    return lenient(captured_parser(entry_point(program), program))


def entry_point(program: str):
    """The function that `program` runs with its arguments."""
    if program == "torchrun":
        from torch.distributed.run import get_args_parser
        return lambda argv: get_args_parser().parse_args(argv)
    if program.startswith("seqrec "):
        from seqrec.cli import console
        return lambda argv: console([program.split()[1], *argv])
    if program.startswith("python -m "):
        try:
            return importlib.import_module(program.removeprefix("python -m ")).main
        except ModuleNotFoundError as err:
            raise DocProblem(f"{program}: no module {err.name}") from None
    return load_script(program.removeprefix("python "))


def load_script(relative: str):
    """A script's main(), loaded as a module without running its `__main__` block."""
    path = REPO / relative
    if not path.is_file():
        raise DocProblem(f"no file {relative} in the repository")
    name = "_doc_" + re.sub(r"\W", "_", relative)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main


def lenient(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser, with placeholders accepted as any value, no abbreviated flags (a doc spells
    each flag out) and errors raised instead of printed."""
    for action in parser._actions:
        if callable(action.type):
            action.type = placeholder_or(action.type)
        if action.choices is not None:
            action.choices = ChoicesOrPlaceholder(action.choices)
    parser.allow_abbrev = False

    def refuse(message):
        raise DocProblem(f"{parser.prog}: {message}")

    parser.error = refuse
    return parser


def placeholder_or(convert):
    def convert_unless_placeholder(value):
        return value if is_placeholder(value) else convert(value)

    convert_unless_placeholder.__name__ = getattr(convert, "__name__", repr(convert))  # argparse's messages name it
    return convert_unless_placeholder


class ChoicesOrPlaceholder(tuple):
    def __contains__(self, value) -> bool:
        return is_placeholder(value) or tuple.__contains__(self, value)


# ------------------------------------------------------------------ checking


def check_flags(program: str, args: list[str], inline: bool) -> None:
    """Raise DocProblem unless the program takes these arguments: all of them parsed for a
    block's command, only the flag names for an inline mention."""
    args = [a for a in args if a not in ("-h", "--help")]
    if program in AFTER_DASHES_TO_TRAIN and "--" in args:
        at = args.index("--")
        check_flags(TRAIN, args[at + 1:], inline)
        args = args[:at]
    parser = parser_for(program)
    unknown = unknown_flags(parser, args) if inline else parser.parse_known_args(args)[1]
    if unknown and program in UNKNOWN_TO_TRAIN:
        check_flags(TRAIN, unknown, inline)  # with their values, placeholders among them
    elif any(not is_placeholder(a) for a in unknown):  # `...` left over is no argument
        raise DocProblem(f"{program}: unknown argument(s) {' '.join(unknown)}")


def unknown_flags(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    flags = [a.split("=")[0] for a in args if a.startswith("-") and a != "--" and not re.match(r"-\d", a)]
    return [f for f in flags if f not in parser._option_string_actions]


def problems(shown: Shown) -> list[str]:
    """What is wrong with a shown command, one line each; [] when it would parse."""
    try:
        tokens = shlex.split(shown.text, comments=True)
    except ValueError as err:
        return [f"not a shell command line: {err}"]
    found = []
    for words in simple_commands(tokens):
        for variant in alternatives(words):
            try:
                for program, args in programs(variant):
                    check_flags(program, args, shown.inline)
            except DocProblem as err:
                found.append(str(err))
    return list(dict.fromkeys(found))


SHOWN = shown_commands()


@pytest.mark.parametrize("shown", SHOWN, ids=[s.id for s in SHOWN])
def test_documented_command_parses(shown):
    found = problems(shown)
    assert not found, f"{shown.id}: `{shown.text}`: " + "; ".join(found)


# ------------------------------------------------------------------ the checker itself


def verdict(text: str, inline: bool = False) -> list[str]:
    return problems(Shown(REPO / "README.md", 0, text, inline))


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds the quick start, continued lines and inline commands (a checker that
    found nothing would pass)."""
    texts = {(s.doc.name, s.text, s.inline) for s in SHOWN}
    assert ("README.md", "seqrec recommend --checkpoint runs/demo/best.pt --user 1 -k 5      "
            "# top-5 items for demo user 1", False) in texts
    assert any(s.doc.name == "RESULTS.md" and s.text.startswith("OMP_NUM_THREADS=1 python main.py")
               and "--eval_every 20" in s.text for s in SHOWN)  # joined across its `\` line
    assert any(s.inline and s.text.startswith("seqrec ") for s in SHOWN)
    assert len(SHOWN) > 40


@pytest.mark.parametrize("text", [
    "seqrec train --dataset=ml-1m --no_time --num_heads 1",
    "OMP_NUM_THREADS=1 python main.py --data_path PATH/ratings.dat --train_dir runs/x &",
    "seqrec recommend --checkpoint RUN --user 1 -k N --exclude_items FILE",
    "seqrec tune --config base.yaml --space space.yaml --trials N [--pruner median|hyperband|none] --lr 0.01",
    "torchrun --standalone --nproc_per_node=4 main.py --multi_gpu > log.txt 2>&1",
    "python launch/ablation.py --rows sasrec --seeds 42 -- --maxlen 10",
    "pip install . && seqrec export --checkpoint runs/demo --out model.pt2 --format onnx",
    "./train_distributed.sh ml-1m runs/x --lr 0.002",
    "PYTHONPATH=. python -m seqrec.tools.bench --quick --amp bf16",
])
def test_commands_that_parse_pass(text):
    assert verdict(text) == []


@pytest.mark.parametrize("text, message", [
    ("seqrec train --hidden_unit 32", "unknown argument(s) --hidden_unit"),
    ("seqrec train --num_epoch 3", "unknown argument(s) --num_epoch"),  # an abbreviation of --num_epochs
    ("seqrec recommend --user 1", "the following arguments are required: --checkpoint"),
    ("seqrec tune --trials 3 --pruner never", "argument --pruner: invalid choice: 'never'"),
    ("seqrec tune --pruner median|sometimes", "argument --pruner: invalid choice: 'sometimes'"),
    ("seqrec tune --trials 3 --no_such_train_flag", "seqrec train: unknown argument(s) --no_such_train_flag"),
    ("seqrec export --checkpoint x --out y --k ten", "argument --k: invalid int value: 'ten'"),
    ("seqrec serve --port 1", "seqrec serve: not a command"),
    ("python -m seqrec.bench --quick", "python -m seqrec.bench: no module seqrec.bench"),
    ("torchrun --nproc_per_node=2 --restarts=3 main.py", "torchrun: unknown argument(s) --restarts=3"),
    ("torchrun --nproc_per_node=2 main.py --no_such_flag", "unknown argument(s) --no_such_flag"),
    ("python launch/ablation.py --rows x -- --no_such_flag", "unknown argument(s) --no_such_flag"),
    ("./launch/nothing.sh a b", "no file launch/nothing.sh"),
    ("seqrc train", "unknown program 'seqrc'"),
])
def test_commands_that_would_fail_are_reported(text, message):
    found = verdict(text)
    assert any(message in line for line in found), found


def test_inline_mentions_check_flag_names_only():
    """Prose names a flag without its value (`torchrun --max-restarts`) or a command without its
    required flags (`seqrec recommend`); a misspelt flag still fails."""
    assert verdict("torchrun --max-restarts", inline=True) == []
    assert verdict("seqrec bench --paired", inline=True) == []
    assert verdict("seqrec recommend --all_users --out recs.csv", inline=True) == []
    assert verdict("seqrec bench --pairs", inline=True) == ["seqrec bench: unknown argument(s) --pairs"]
