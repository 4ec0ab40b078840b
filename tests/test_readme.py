"""The documentation's claims hold: the generated options page lists every key of the schema with
its default, every command, flag and key the README and docs/ name is real, and every relative
link points to a file that exists.

The options page is docs/hooks/options.py's (the MkDocs hook that writes it at build time),
built here without MkDocs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
from functools import cache
from pathlib import Path

from fedpeft.cli import build_parser
from fedpeft.config import FLAG_ALIASES, Config, set_key
from fedpeft.config_checks import iter_fields

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
SECTIONS = sorted({key.split(".")[0] for key, *_ in iter_fields() if "." in key})
FILE_SUFFIXES = {"md", "csv", "png", "json", "jsonl", "py", "yaml", "toml", "safetensors", "txt", "sh"}
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
COMMAND = re.compile(r"python3? (?:-m (fedpeft(?:\.\w+)*)|(sims/\w+\.py))(.*)")
KEY_MENTION = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.([a-z0-9_]+))(?![\w(])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def options_hook():
    spec = importlib.util.spec_from_file_location("docs_options_hook", DOCS / "hooks" / "options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    """The README and the documentation's own pages (not the study reports under docs/results/)."""
    return [README, *sorted(DOCS.glob("*.md"))]


def get_key(config: Config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def same_as_default(key: str, written: str) -> bool:
    """Whether ``written`` (a value as the command line takes it) is the schema's default of ``key``."""
    config = Config()
    set_key(config, key, written)
    return get_key(config, key) == get_key(Config(), key)


# (a) the generated options page ----------------------------------------------------------------

def test_options_page_lists_every_key_with_its_default_flag_and_help():
    hook = options_hook()
    page = hook.options_markdown()
    rows = {}
    for line in page.splitlines():
        match = re.match(r"\| <a id=\"([^\"]+)\"></a>`([^`]+)` \| (.*?) \| (.*?) \| (.*?) \| (.*) \|$", line)
        if match:
            anchor, key, default, flag, _values, help_ = match.groups()
            assert anchor == hook.anchor(key)
            rows[key] = (default, flag, help_)
    fields = list(iter_fields())
    assert sorted(rows) == sorted(key for key, *_ in fields), "the options page and the schema list different keys"
    flag_of = {key: flag for flag, key in FLAG_ALIASES.items()}
    for key, _, default, help_ in fields:
        written, flag, shown_help = rows[key]
        assert same_as_default(key, hook.parse_default(written)), f"options page: {key} = {written}; the schema: {default!r}"
        assert flag == (f"`--{flag_of[key]}`" if key in flag_of else ""), key
        assert shown_help == hook.escape(help_) and help_, f"options page: the help of {key}"
    for flag, key in FLAG_ALIASES.items():
        assert f"| `--{flag}` | [`{key}`](#{hook.anchor(key)}) |" in page, f"--{flag} is missing from the flags table"
    for option in ("--config", "--resume", "--debug"):  # the options that are no key
        assert f"| `{option}` |" in page, option
    ids = set(re.findall(r'<a id="([^"]+)">', page))
    assert all(target in ids for target in re.findall(r"\]\(#([^)]+)\)", page)), "an in-page link without its anchor"


# (b) commands, flags and keys named in the README and docs/ ------------------------------------

def module_file(name: str) -> Path | None:
    """The source file of fedpeft module ``name`` (fedpeft.strategies lives in strategies/)."""
    parts = name.split(".")
    if parts[0] != "fedpeft":
        return None
    base, rest = (REPO / "strategies", parts[2:]) if parts[1:2] == ["strategies"] else (REPO / "fedpeft", parts[1:])
    path = base.joinpath(*rest)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def imported_files(path: Path) -> set[Path]:
    """``path`` and every fedpeft module it imports, directly or through others."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in ast.walk(ast.parse(current.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            todo += [f for f in map(module_file, names) if f is not None]
    return seen


def argument_flags(path: Path) -> set[str]:
    """The option strings ``add_argument`` is given in ``path``."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


@cache
def sim_flags() -> frozenset[str]:
    return frozenset(s for action in build_parser()._actions for s in action.option_strings)


@cache
def command_flags(entry: str) -> frozenset[str]:
    """The flags of ``python -m fedpeft.X`` or ``python sims/X.py``: ``python -m fedpeft.sim``'s
    own parser, else every add_argument of the entry file and the fedpeft modules it imports
    (plus fedpeft.sim's flags where it parses them with fedpeft.cli)."""
    if entry == "fedpeft.sim":
        return sim_flags()
    if entry.startswith("sims/"):
        path = REPO / entry
    else:
        path = module_file(f"{entry}.__main__") or module_file(entry)
    assert path is not None and path.is_file(), f"the docs run {entry}, which does not exist"
    files = imported_files(path)
    flags = set().union(*map(argument_flags, files)) | {"-h", "--help"}
    if entry in FORWARDS:  # a benchmark script that hands the rest of its arguments to another command
        flags |= command_flags(FORWARDS[entry])
    return frozenset(flags | sim_flags() if REPO / "fedpeft" / "cli.py" in files else flags)


# sims scripts that run another command with the arguments they do not take themselves
FORWARDS = {"sims/study_wall.py": "sims/compare.py", "sims/startup.py": "fedpeft.sim"}


def placeholder(flag: str) -> bool:
    return flag[2:].isupper()  # --KEY=VALUE


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(entry, arguments) of every fedpeft command in ``text`` (a code block or an inline span)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        for match in COMMAND.finditer(line):
            rest = re.split(r"\s(?:&&|\||;)\s", match.group(3))[0]
            found.append((match.group(1) or match.group(2), shlex.split(rest, comments=True)))
    return found


def code_of(text: str) -> tuple[list[str], list[str]]:
    """The fenced code blocks of a Markdown page, and the inline code spans outside them."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return blocks, spans


def test_every_command_flag_and_key_in_the_docs_is_real():
    keys = {key for key, *_ in iter_fields()}
    every_flag = set(sim_flags())
    checked = []
    for page in pages():
        blocks, spans = code_of(page.read_text())
        for text in blocks + spans:
            for entry, args in commands(text):
                flags = command_flags(entry)
                every_flag |= flags
                for arg in args:
                    name = arg.split("=", 1)[0]
                    if arg.startswith("--") and not placeholder(name):
                        assert name in flags, f"{page.name}: `{entry}` has no flag {name}"
                    elif re.match(r"^[a-z_]+(\.[a-z0-9_]+)+=", arg):
                        assert name in keys, f"{page.name}: `{entry}` is given {arg}, and {name} is no config key"
                checked.append(entry)
        for text in blocks + spans:
            for key, last in KEY_MENTION.findall(text):
                assert last in FILE_SUFFIXES or key in keys, f"{page.name} names {key}, which is no config key"
    for page in pages():
        _, spans = code_of(page.read_text())
        for span in spans:
            flag = span.split()[0].split("=")[0]
            if flag.startswith("--") and not COMMAND.search(span) and not placeholder(flag):
                assert flag in every_flag, f"{page.name} names the flag {flag}, which no fedpeft command has"
    assert "fedpeft.sim" in checked and any(entry.startswith("sims/") for entry in checked)


def test_defaults_written_in_key_tables_are_the_schemas():
    """A hand-written table whose first columns are key and default states the schema's defaults."""
    for page in pages():
        table = None
        for line in page.read_text().splitlines():
            if line.startswith("| key | default |"):
                table = []
            elif table is not None and line.startswith("| `"):
                key, default = (cell.strip().strip("`") for cell in line.strip("|").split("|")[:2])
                assert same_as_default(key, default), f"{page.name}: {key} defaults to {default}? Not in the schema"
            elif not line.startswith("|"):
                table = None


# (c) relative links ------------------------------------------------------------------------------

def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def broken_links(page: Path, generated: set[Path]) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve()
        if not (resolved.exists() or resolved in generated):
            broken.append(target)
        elif anchor and page == README and resolved.suffix == ".md" and anchor not in github_anchors(resolved):
            broken.append(target)
    return broken


def test_every_relative_link_points_to_a_file_that_exists():
    generated = {(DOCS / options_hook().PAGE).resolve()}  # written by the hook at build time: the site's only
    linked = [README, *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]
    broken = {page.relative_to(REPO).as_posix(): links for page in linked
              if (links := broken_links(page, generated if page != README else set()))}
    assert not broken, f"relative links to nothing: {broken}"


def named_code(text: str) -> tuple[set[str], set[str]]:
    """The dotted fedpeft names (``fedpeft.x.y``) and the repository paths (``fedpeft/x.py``,
    ``sims/x.py``, ``tests/x.py``, ``strategies/x.py``) a page names in code spans."""
    spans = re.findall(r"`([^`\n]+)`", text)
    names = {m.rstrip(".") for span in spans for m in re.findall(r"\bfedpeft(?:\.[A-Za-z_]\w*)+", span)}
    paths = {m for span in spans for m in re.findall(r"\b(?:fedpeft|sims|tests|strategies)/[\w/]+\.py\b", span)}
    return names, paths


def resolves(name: str) -> bool:
    """Whether ``fedpeft.a.b.C.d`` is a module, or an attribute path inside one."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_module_object_and_file_the_docs_name_exists():
    """Modules move (fedpeft/ became subpackages); a page that names an old place misleads."""
    missing = []
    for page in pages():
        names, paths = named_code(page.read_text())
        missing += [f"{page.relative_to(REPO)}: {n}" for n in sorted(names) if not resolves(n)]
        missing += [f"{page.relative_to(REPO)}: {p}" for p in sorted(paths) if not (REPO / p).is_file()]
    assert not missing, "names and paths in the docs that do not exist:\n" + "\n".join(missing)
    assert resolves("fedpeft.launch.ray_start.SharedRay") and not resolves("fedpeft.server_app.FederatedRun")  # the check itself
