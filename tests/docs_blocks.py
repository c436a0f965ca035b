"""The command blocks of the project's Markdown files: found, split into commands, turned into their
``--help`` / dry-run form where they cannot run here, and run as a ``bash -e`` script.

``test_docs_commands.py`` says how each block runs; ``docs_fixture.py`` builds the files its
placeholders point at.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def markdown_files() -> list[Path]:
    """Every .md of the repository outside hidden folders (.venv, .git, caches) and build metadata."""
    found = []
    for path in REPO.rglob("*.md"):
        parts = path.relative_to(REPO).parts
        if any(p.startswith(".") or p.endswith(".egg-info") or p in ("demo_out", "node_modules") for p in parts):
            continue
        found.append(path)
    return sorted(found)


@dataclass(frozen=True)
class Block:
    """One fenced block: ``kind`` is shell, console (a ``$ `` transcript) or python."""

    file: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    kind: str
    text: str  # dedented body

    @property
    def commands(self) -> list[str]:
        """Logical commands: continuation lines joined; blank and comment-only lines dropped."""
        if self.kind == "python":
            return [self.text]
        out, current = [], None
        for raw in self.text.splitlines():
            line = raw.strip()
            if current is not None:
                current += " " + line
            elif self.kind == "console":
                if not line.startswith("$ "):
                    continue
                current = line[2:]
            elif not line or line.startswith("#"):
                continue
            else:
                current = line
            if current.endswith("\\"):
                current = current[:-1].rstrip()
            else:
                out.append(current)
                current = None
        return out

    @property
    def key(self) -> str:
        """The first command line, comment and extra spaces removed: what the classification keys on."""
        for raw in self.text.splitlines():
            line = raw.strip()
            if self.kind == "console":
                if line.startswith("$ "):
                    return normalize(line[2:].rstrip("\\"))
            elif line and not line.startswith("#"):
                return line if self.kind == "python" else normalize(line.rstrip("\\"))
        return ""

    @property
    def doc_output(self) -> str:
        """A console block's printed output (the lines after its command)."""
        return "\n".join(ln for ln in self.text.splitlines() if not ln.startswith("$ "))


def normalize(command: str) -> str:
    """A command without its trailing comment, whitespace collapsed (quoting kept)."""
    out, quote = [], None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            break
        out.append(ch)
    return " ".join("".join(out).split())


def extract(path: Path, root: Path = REPO) -> list[Block]:
    """The command blocks of one Markdown file: bash/sh/console/python fences, and text fences that are
    ``$ `` transcripts (the command they show is a command too)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m["fence"], m["lang"].lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = [ln[len(m["indent"]):] if ln.startswith(m["indent"]) else ln.lstrip() for ln in lines[i + 1:j]]
        text = "\n".join(body)
        i = j + 1
        first = next((ln for ln in body if ln.strip()), "")
        if lang in SHELL_LANGS:
            kind = "console" if lang == "console" or first.startswith("$ ") else "shell"
        elif lang in PYTHON_LANGS:
            kind = "python"
        elif lang in ("text", "") and first.startswith("$ "):
            kind = "console"
        else:
            continue
        block = Block(str(path.relative_to(root)), start + 1, kind, text)
        if block.commands and block.commands[0].strip():
            blocks.append(block)
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in markdown_files() for b in extract(path)]


# --help and dry-run forms ------------------------------------------------------------------------------

PYTHONS = ("python", "python3", ".venv/bin/python")
# datagen run options a plan does not take (what to redo, not what the run is)
RUN_ONLY = {"--new-run", "--retry-failed", "--verify", "--wait-for-resources", "--no-progress"}

BASH_PRELUDE = r"""
set -eo pipefail
# _help 'FLAGS' CMD...: CMD (a --help) succeeds and its output lists every flag the docs passed
_help() {
  local flags=$1; shift
  local out f
  if ! out=$("$@" 2>&1); then printf '%s\n' "$out"; echo "DOCS: failed: $*" >&2; return 1; fi
  for f in $flags; do
    if ! grep -qE -- "(^|[^[:alnum:]_-])${f}([^[:alnum:]_-]|$)" <<<"$out"; then
      printf '%s\n' "$out"; echo "DOCS: the docs pass $f, which '$*' does not list" >&2; return 1
    fi
  done
}
# _train_dry CONFIG [KEY=VALUE...]: the trainer's config with the overrides loads (its dry run)
_train_dry() {
  python -c 'import sys; from training.trainer.config import load_train_config as load
print("config ok:", sys.argv[1], "->", load(sys.argv[1], sys.argv[2:]).output_dir)' "$@"
}
"""


def _flags(tokens: list[str]) -> list[str]:
    return sorted({t.split("=")[0] for t in tokens if t.startswith("--") and len(t) > 2 and t != "--help"})


def _help_line(command: list[str], flags: list[str]) -> str:
    return shlex.join(["_help", " ".join(flags), *command])


def _python_help(tokens: list[str]) -> list[str]:
    """``python -m MOD ARGS`` / ``python SCRIPT ARGS``: ARGS plus --help (flags checked), and a dry run
    where the program has one (pytest --collect-only, the trainer's config, datagen plan)."""
    py, rest = tokens[0], tokens[1:]
    if rest[:2] == ["-m", "pytest"]:
        return [shlex.join([py, *rest, "--collect-only", "-q"])]
    head = [py, *rest[:2]] if rest[:1] == ["-m"] else [py, rest[0]]
    args = rest[len(head) - 1:]
    module = head[2] if rest[:1] == ["-m"] else None
    if module in ("datagen", "shards") and args and not args[0].startswith("-"):
        head, args = [*head, args[0]], args[1:]  # the subcommand has its own --help
    lines = [_help_line([*head, *args, "--help"], _flags(args))]
    if module == "training.train":
        lines.append(shlex.join(["_train_dry", *_train_overrides(args)]))
    if head[2:] == ["datagen", "run"]:
        plan = [t for t in args if t not in RUN_ONLY]
        lines.append(shlex.join(["python", "-m", "datagen", "plan", *plan]))
    return lines


def _train_overrides(args: list[str]) -> list[str]:
    """--config, --override and --resume of a training.train command line, as _train_dry's arguments."""
    config, overrides, it = None, [], iter(args)
    for t in it:
        if t == "--config":
            config = next(it)
        elif t == "--override":
            overrides.append(next(it))
        elif t == "--resume":
            overrides.append(f"checkpoint.resume={json.dumps(next(it))}")
    return [config or "", *overrides]


def help_form(command: str) -> list[str]:
    """Bash lines standing for ``command`` where it cannot run here: its --help (every flag the docs pass
    must be listed) and, where the program has one, its dry run. ValueError for an unknown program."""
    tokens = shlex.split(command, comments=True)
    while tokens and _ENV.match(tokens[0]):
        tokens.pop(0)
    if tokens[-1:] == ["&"]:  # a background helper (a tunnel, a dashboard): its form runs in the foreground
        tokens.pop()
    if not tokens:
        return [command]
    prog = tokens[0]
    if prog in ("export", "cd", "mkdir", "source"):
        return [command]
    if prog == "ssh":  # -G: check the options and print the configuration, never connect
        return [shlex.join(["ssh", "-G", *tokens[1:]]) + " > /dev/null"]
    if prog == "make":
        return [shlex.join(["make", "-n", *tokens[1:]])]
    if prog in PYTHONS:
        return _python_help(tokens)
    if prog in ("accelerate", "torchrun"):
        launcher = ["accelerate", "launch"] if prog == "accelerate" else ["torchrun"]
        cut = tokens.index("-m")
        return [_help_line([*launcher, "--help"], _flags(tokens[len(launcher):cut])),
                *_python_help(["python", *tokens[cut:]])]
    if prog == "ray":
        sub = tokens[1:3] if tokens[1] == "job" else tokens[1:2]
        cut = tokens.index("--") if "--" in tokens else len(tokens)
        lines = [_help_line(["ray", *sub, "--help"], _flags(tokens[1 + len(sub):cut]))]
        return lines + (help_form(shlex.join(tokens[cut + 1:])) if cut < len(tokens) else [])
    raise ValueError(f"no --help form for {prog!r} in {command!r}: teach docs_fixture.help_form")


# running a block ----------------------------------------------------------------------------------------

def block_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a block: the venv first on PATH, offline hub, any other host unreachable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "PYTEST_"))}
    env.update({
        "PATH": f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
        "PYTHONHASHSEED": "0",
        # a request to any other host fails at once on a closed local port instead of leaving the machine
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    env.update(extra)
    return env


def run_script(script: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """Run ``bash -e`` on the script in ``cwd``: its exit code, combined output and CPU seconds (of the
    processes it waited for: on a loaded machine the honest measure of its cost). On time-out the whole
    process group it started is killed."""
    path = cwd / "_docs_block.sh"
    path.write_text(BASH_PRELUDE + script)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(["bash", str(path)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out, proc.returncode = out + f"\nDOCS: timed out after {timeout:.0f} s", 124
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc.returncode, out, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
