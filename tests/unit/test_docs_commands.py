"""Every command shown in README.md and docs/*.md names things that exist.

Why: the front page and the docs pages are mostly commands to copy, and a renamed option, a moved
script or a deleted result file breaks them silently; nothing else runs them. This reads every fenced
code block, keeps the lines that are commands of this project, and checks each name they use against
the code itself (the argparse parsers, the recipe lookup, the config schema, the tree), so a docs
command that no longer works fails here, with every failure listed at once as ``file:line``.

The rules, kept few and explicit:

1. Only fenced blocks whose info string is empty, ``bash``, ``sh``, ``shell`` or ``console`` are read
   (``python``, ``yaml`` and ``text`` blocks are not shell commands).
2. A line ending in ``\\`` continues on the next, as does a quote left open (``python -c "...``);
   ``#`` starts a comment; ``&&``, ``||``, ``;`` and ``|`` separate commands; leading ``VAR=value``
   words are skipped to find the command word (rule 8 still reads them); the word after ``>``,
   ``>>`` or ``<`` is a redirect target and not checked.
3. A command is checked only when its first word, by its last path part (``.venv/bin/opdlm`` is
   ``opdlm``), is ``opdlm``, ``python``, ``python3``, ``torchrun``, ``bash``, ``sh`` or ``sbatch``;
   any other line (``pip``, ``printf``, printed output, a tree) is not a command of this project.
4. ``opdlm [--debug] SUB ...`` (also ``python -m nemo_opdlm[.cli] SUB`` and ``python -m
   nemo_opdlm.plan`` for ``opdlm plan``): SUB is a subcommand of ``nemo_opdlm.cli.COMMANDS``, and each
   ``-o`` / ``--option`` (the part before ``=``) is an option string, spelled in full, of the parser
   SUB's handler builds, captured in-process (see :func:`subcommand_parser`). ``opdlm lm-eval``'s
   parser is lm-eval's (options of any of its subcommands count, since lm-eval implies ``run``);
   without lm-eval installed only the subcommand's name is checked.
5. The recipe (the word after ``--recipe``, or the first argument of ``opdlm plan`` and
   ``tools/launch.py``) is found by ``nemo_opdlm.recipes.lookup.find``, unless it is a ``.yaml`` /
   ``.yml`` file (then rule 8 applies to it).
6. A ``section.key=value`` word of ``opdlm train``, ``opdlm plan`` or ``tools/launch.py`` names a key
   of ``nemo_opdlm.config.config_keys()`` or a section above one.
7. ``python SCRIPT``, ``torchrun [its options] SCRIPT`` and ``bash|sh|sbatch [its options] SCRIPT``:
   a relative SCRIPT exists; each option after a ``.py`` SCRIPT is an option string of one of its
   ``add_argument`` calls (read with ``ast``, no import: several scripts import torch at the top);
   each option after a ``.sh`` SCRIPT appears in its text or in that of a repository ``.py`` script it
   names. ``python -m nemo_opdlm.runtime.torchrun`` is ``torchrun``; ``python -m MODULE`` with a
   module of this repository must be importable; other modules (pytest, venv, sglang) are not ours.
8. In a checked command, every word (or the value after ``=`` in one) that starts with
   ``nemo_opdlm/``, ``tools/``, ``slurm/``, ``benchmarks/``, ``docs/``, ``tests/`` or ``recipes/``
   and holds no shell pattern (``$ * ? { } < >``) is a file or folder of the tree.
"""

from __future__ import annotations

import argparse
import ast
import functools
import glob
import importlib.util
import os
import re
import shlex
from typing import Optional
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
COMMAND_WORDS = {"opdlm", "python", "python3", "torchrun", "bash", "sh", "sbatch"}
REPO_DIRS = ("nemo_opdlm/", "tools/", "slurm/", "benchmarks/", "docs/", "tests/", "recipes/")
SHELL_PATTERN = re.compile(r"[$*?{}<>]")
OPTION = re.compile(r"^--?[A-Za-z][\w-]*")
CONFIG_OVERRIDE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)=")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
MODULE_ALIASES = {
    "nemo_opdlm": ["opdlm"],
    "nemo_opdlm.cli": ["opdlm"],
    "nemo_opdlm.plan": ["opdlm", "plan"],
}
"""``python -m`` modules that are the ``opdlm`` command (or one of its subcommands) under another name."""
OUR_MODULES = ("nemo_opdlm", "tools", "benchmarks", "tests")


def doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


# --- reading the blocks ----------------------------------------------------------------------------

def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every line inside a shell fenced block (rules 1 and 2: ``\\``
    continuations joined; an open quote is joined later, by :func:`commands`)."""
    out: list[tuple[int, str]] = []
    fence: Optional[str] = None
    keep = False
    pending: Optional[tuple[int, str]] = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, keep = match.group(1), match.group(2).lower() in SHELL_BLOCKS
            continue
        if stripped.startswith(fence) and stripped.strip("`~") == "":
            if pending:
                out.append(pending)
            fence, pending = None, None
            continue
        if not keep:
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + "\n" + line)
        else:
            pending = (number, line)
        if not pending[1].rstrip().endswith("\\"):
            out.append(pending)
            pending = None
        else:
            pending = (pending[0], pending[1].rstrip()[:-1])
    return out


def words(line: str) -> list[str]:
    """The shell words of ``line`` (comments dropped, ``&&`` etc. as words of their own)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def command_word(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def commands(lines: list[tuple[int, str]]) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """The simple commands of ``lines`` whose first word is a command word (rule 3), each as (line
    number, words without redirects; leading ``VAR=value`` words kept for rule 8), and the lines
    that could not be read."""
    out: list[tuple[int, list[str]]] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        number, line = lines[i]
        first = [w for w in line.split() if not ENV_ASSIGNMENT.match(w)][:1]
        if not first or command_word(first[0]) not in COMMAND_WORDS:
            i += 1
            continue
        while True:  # a quote left open continues on the next lines (python -c "...)
            try:
                parsed = words(line)
                break
            except ValueError:
                i += 1
                if i >= len(lines):
                    problems.append(f"{number}: unbalanced quotes from here to the end of the block")
                    parsed = []
                    break
                line += "\n" + lines[i][1]
        i += 1
        current: list[str] = []
        for word in parsed + [";"]:
            if word in SEPARATORS:
                for j in range(len(current) - 1, -1, -1):  # redirect targets are not arguments
                    if current[j] in REDIRECTS:
                        del current[j:j + 2]
                head = [w for w in current if not ENV_ASSIGNMENT.match(w)][:1]
                if head and command_word(head[0]) in COMMAND_WORDS:
                    out.append((number, current))
                current = []
            else:
                current.append(word)
    return out, problems


# --- what exists -------------------------------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


@functools.lru_cache(maxsize=None)
def subcommand_parser(name: str) -> Optional[argparse.ArgumentParser]:
    """The parser ``opdlm NAME``'s handler builds, or None when it builds none.

    The handlers build their parsers inline (``nemo_opdlm.cli.COMMANDS``), so the handler is run with
    argparse's parse methods replaced by a trap that raises with the parser before anything is
    parsed or run: what is checked is exactly the parser the command uses, with no subprocess."""
    from nemo_opdlm.cli import COMMANDS

    def trap(self, *args, **kwargs):
        raise _Captured(self)

    patches = {m: trap for m in ("parse_args", "parse_known_args", "parse_intermixed_args",
                                 "parse_known_intermixed_args") if hasattr(argparse.ArgumentParser, m)}
    with mock.patch.multiple(argparse.ArgumentParser, **patches):
        try:
            COMMANDS[name][1]([])
        except _Captured as got:
            return got.parser
        except (Exception, SystemExit):  # a handler that fails before parsing (lm-eval absent) has none
            return None
    return None


def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands' parsers."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= parser_options(sub)
    return found


@functools.lru_cache(maxsize=None)
def script_options(path: str) -> frozenset[str]:
    """The option strings of every ``add_argument`` call in a Python script, read without importing it."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    found.add(arg.value)
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def shell_script_text(path: str) -> str:
    """A shell script's text and that of every repository ``.py`` script it names (its options may be
    those of the Python script it runs, as ``benchmarks/gpu_check.sh`` runs ``gpu_check.py``)."""
    text = open(path, encoding="utf-8").read()
    for name in sorted(set(re.findall(r"[\w./-]+\.py\b", text))):
        candidate = os.path.join(ROOT, name)
        if os.path.isfile(candidate):
            text += "\n" + open(candidate, encoding="utf-8").read()
    return text


@functools.lru_cache(maxsize=None)
def config_keys() -> frozenset[str]:
    from nemo_opdlm.config import config_keys as keys

    found = set()
    for key in keys():
        parts = key.split(".")
        found |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def recipe_problem(spec: str) -> Optional[str]:
    from nemo_opdlm.recipes.lookup import find

    try:
        find(spec)
    except Exception as err:  # ConfigError naming the closest recipes, or an import error
        return str(err).splitlines()[0]
    return None


def option_name(word: str) -> Optional[str]:
    match = OPTION.match(word)
    return match.group(0) if match and not re.match(r"^-\d", word) else None


# --- the checks --------------------------------------------------------------------------------------

def check_paths(cmd: list[str]) -> list[str]:
    """Rule 8."""
    problems = []
    for word in cmd:
        for token in {word, word.split("=", 1)[-1]}:
            if token.startswith(REPO_DIRS) and not SHELL_PATTERN.search(token):
                if not os.path.exists(os.path.join(ROOT, token)):
                    problems.append(f"{token} does not exist in the tree")
    return problems


def check_recipe_and_keys(args: list[str], first_is_recipe: bool) -> list[str]:
    """Rules 5 and 6 over the arguments of opdlm train / plan or tools/launch.py."""
    problems = []
    recipes = [args[i + 1] for i, w in enumerate(args[:-1]) if w == "--recipe"]
    recipes += [w.split("=", 1)[1] for w in args if w.startswith("--recipe=")]
    if first_is_recipe and args and not args[0].startswith("-") and "=" not in args[0]:
        recipes.append(args[0])
    for spec in recipes:
        if not spec.endswith((".yaml", ".yml")) and not SHELL_PATTERN.search(spec):
            why = recipe_problem(spec)
            if why:
                problems.append(f"recipe {spec!r} is not found: {why}")
    for word in args:
        match = CONFIG_OVERRIDE.match(word)
        if match and match.group(1) not in config_keys():
            problems.append(f"{match.group(1)} is not a config key (nemo_opdlm.config.config_keys)")
    return problems


def check_opdlm(args: list[str]) -> list[str]:
    """Rules 4 to 6 for ``opdlm ARGS``."""
    from nemo_opdlm.cli import COMMANDS

    if args[:1] == ["--debug"]:
        args = args[1:]
    if not args or args[0] in ("--version", "-h", "--help"):
        return []
    sub, rest = args[0], args[1:]
    if sub not in COMMANDS:
        return [f"opdlm {sub}: no such subcommand (nemo_opdlm.cli.COMMANDS: {', '.join(COMMANDS)})"]
    problems = []
    parser = subcommand_parser(sub)
    if parser is not None:
        accepted = parser_options(parser)
        for word in rest:
            name = option_name(word)
            if name and name not in accepted:
                problems.append(f"opdlm {sub} has no option {name}")
    if sub in ("train", "plan"):
        problems += check_recipe_and_keys(rest, first_is_recipe=sub == "plan")
    return problems


def check_script(script: str, args: list[str]) -> list[str]:
    """Rule 7 for a script path and its arguments."""
    if script.startswith("/") or SHELL_PATTERN.search(script):
        return []
    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        return [f"{script} does not exist in the tree"]
    problems = []
    if script.endswith(".py"):
        accepted = script_options(path)
        for word in args:
            name = option_name(word)
            if name and name not in accepted:
                problems.append(f"{script} has no option {name}")
        if os.path.normpath(script) == os.path.join("tools", "launch.py"):
            problems += check_recipe_and_keys(args, first_is_recipe=True)
    elif script.endswith(".sh"):
        text = shell_script_text(path)
        for word in args:
            name = option_name(word)
            if name and not re.search(re.escape(name) + r"(?![\w-])", text):
                problems.append(f"{script} does not mention option {name}")
    return problems


def check_launcher(args: list[str]) -> list[str]:
    """torchrun's (or sbatch's) own options, then a script or ``-m MODULE`` with its arguments."""
    for i, word in enumerate(args):
        if word == "-m" and i + 1 < len(args):
            return check_module(args[i + 1], args[i + 2:])
        if not word.startswith("-") and word.endswith((".py", ".sh")):
            return check_script(word, args[i + 1:])
    return []


def check_module(module: str, args: list[str]) -> list[str]:
    if module in MODULE_ALIASES:
        alias = MODULE_ALIASES[module]
        return check_opdlm(alias[1:] + args)
    if module == "nemo_opdlm.runtime.torchrun":
        return check_launcher(args)
    if module.split(".")[0] in OUR_MODULES:
        try:
            found = importlib.util.find_spec(module)
        except ImportError:
            found = None
        return [] if found else [f"python -m {module}: no such module"]
    return []


def check_command(cmd: list[str]) -> list[str]:
    """Rules 4 to 8 for one simple command whose first word is a command word."""
    problems = check_paths(cmd)  # leading assignments included: RECIPE=recipes/x.yaml names a file too
    while cmd and ENV_ASSIGNMENT.match(cmd[0]):
        cmd = cmd[1:]
    word, args = command_word(cmd[0]), cmd[1:]
    if word == "opdlm":
        problems += check_opdlm(args)
    elif word in ("python", "python3"):
        flags = [i for i, w in enumerate(args) if not w.startswith("-") or w in ("-m", "-c")]
        if flags:
            i = flags[0]
            if args[i] == "-m" and i + 1 < len(args):
                problems += check_module(args[i + 1], args[i + 2:])
            elif args[i] != "-c":
                problems += check_script(args[i], args[i + 1:])
    elif word in ("torchrun", "bash", "sh", "sbatch"):
        problems += check_launcher(args)
    return problems


def check_markdown(text: str, source: str) -> list[str]:
    """Every problem of ``text``'s commands, as ``source:line: what``."""
    found, unreadable = commands(shell_lines(text))
    problems = [f"{source}:{p}" for p in unreadable]
    for number, cmd in found:
        problems += [f"{source}:{number}: {p}" for p in check_command(cmd)]
    return list(dict.fromkeys(problems))  # a missing script is also a missing path: said once


# --- the tests ----------------------------------------------------------------------------------------

def test_every_docs_command_names_what_exists():
    problems = []
    for path in doc_files():
        problems += check_markdown(open(path, encoding="utf-8").read(), os.path.relpath(path, ROOT))
    assert not problems, "commands in the docs that do not match the code:\n  " + "\n  ".join(problems)


def test_the_docs_hold_commands_to_check():
    """Guards the reader itself: if the fences or the command words stopped matching, the test above
    would pass on nothing."""
    found = []
    for path in doc_files():
        found += commands(shell_lines(open(path, encoding="utf-8").read()))[0]
    firsts = {command_word(cmd[0]) for _, cmd in found}
    assert len(found) >= 20 and {"opdlm", "python", "torchrun"} <= firsts, (len(found), firsts)


def test_made_up_names_are_caught():
    """The checker must be able to fail: each line below names one thing that does not exist, and
    the real commands beside them pass."""
    text = "\n".join([
        "```bash",
        "opdlm train --recipe tiny:tiny_self_tp1_pp1_2g --no-such-option train.steps=2",   # 2
        "opdlm no-such-command",                                                           # 3
        "opdlm plan no_such_recipe_tp1_pp1_1g",                                            # 4
        "opdlm train --recipe tiny_self_tp1_pp1_2g train.no_such_key=1",                   # 5
        "python tools/no_such_tool.py --out x",                                            # 6
        "torchrun --nproc_per_node=2 tools/export_hf.py --ckpt a --out b --no-such-flag",  # 7
        "python benchmarks/packing_bench.py --out benchmarks/results/no_such.json",         # 8
        "bash slurm/convert_8b.sh --no-such-flag",                                         # 9
        "opdlm eval --task gsm8k --data x.jsonl --hf m \\",                                # 10
        "    --no-such-eval-flag",
        "python -m nemo_opdlm.no_such_module",                                             # 12
        "opdlm train --recipe tiny:tiny_self_tp1_pp1_2g train.steps=2 && opdlm demo --quick",
        "torchrun --nproc_per_node=2 tools/import_hf.py --hf-dir a --out b --tp 2",
        "python -m nemo_opdlm.runtime.torchrun --nproc_per_node=2 -m nemo_opdlm.cli train --recipe tiny_self_tp1_pp1_2g",  # noqa: E501
        "some output line --with-a-made-up-option",
        "RECIPE=recipes/no_such_recipe.yaml sbatch slurm/convert_8b.sh",                    # 17
        "```",
    ])
    problems = check_markdown(text, "made_up.md")
    expected = {
        2: "--no-such-option", 3: "no-such-command", 4: "no_such_recipe_tp1_pp1_1g", 5: "train.no_such_key",
        6: "tools/no_such_tool.py", 7: "--no-such-flag", 8: "benchmarks/results/no_such.json",
        9: "--no-such-flag", 10: "--no-such-eval-flag", 12: "nemo_opdlm.no_such_module",
        17: "recipes/no_such_recipe.yaml",
    }
    for line, name in expected.items():
        assert any(p.startswith(f"made_up.md:{line}: ") and name in p for p in problems), (line, name, problems)
    assert len(problems) == len(expected), problems
