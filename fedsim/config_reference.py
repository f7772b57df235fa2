"""Write docs/config.md, the configuration reference, from the config dataclasses.

``python -m fedsim.config_reference --write docs/config.md`` regenerates the page;
without ``--write`` it prints it. Everything on the page comes from
``fedsim.config`` and ``fedsim.registry`` as they are now, so a new field shows up
with no change here: its type and default from the dataclass, its allowed range
from the field's ``"allowed"`` metadata, and its description from the ``#``
comment above the field or at the end of its line (comments, not docstrings,
because that is where ``config.py`` explains a field). ``tests/test_config_reference.py``
fails when the page and the dataclasses disagree.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import tokenize
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from fedsim import registry
from fedsim.config import Params, RunConfig

COMMAND = "python -m fedsim.config_reference --write docs/config.md"
EXAMPLE = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "demo.toml"
HEADER = ("key", "type", "default", "allowed", "description")
# Keys whose value is a shipped name (a registry's key) or a plug-in's import path.
SHIPPED: Mapping[str, Mapping[str, str]] = {
    "data.dataset": registry.DATASETS,
    "model.name": registry.MODELS,
    "strategy.name": registry.STRATEGIES,
}
_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", Params: "table"}
_PRAGMA = re.compile(r"(type|noqa|pragma|fmt)\b")


def field_comments(cls: type) -> dict[str, str]:
    """Return each field's ``#`` comment: the lines right above it, then those on its lines.

    A field without one maps to ``""``; tool pragmas (``# type: ignore``) are left out.
    """
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line in ``source`` -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        text = token.string.lstrip("#").strip()
        if token.type == tokenize.COMMENT and not _PRAGMA.match(text):
            comments[token.start[0]] = text
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    found: dict[str, str] = {}
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        above: list[str] = []
        line = statement.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        end = statement.end_lineno or statement.lineno
        own = [comments[n] for n in range(statement.lineno, end + 1) if n in comments]
        found[statement.target.id] = " ".join(above + own)
    return found


def sections(cls: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """Yield ``(dotted prefix, dataclass)`` for the run and every table below it, in order."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[spec.name]):
            yield from sections(typing.cast(type, hints[spec.name]), f"{prefix}{spec.name}.")


def _type(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(f"`{_toml(choice)}`" for choice in typing.get_args(hint))
    return _TYPES.get(hint, f"`{hint}`".replace("typing.", ""))


def _toml(value: Any) -> str:
    """Write ``value`` as TOML would (``true``, ``"cnn"``, ``{}``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(spec: dataclasses.Field[Any]) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def _allowed(key: str, spec: dataclasses.Field[Any], hint: Any) -> str:
    if key in SHIPPED:
        names = ", ".join(f"`{name}`" for name in SHIPPED[key])
        return f"{names}, or an import path `module:attribute`"
    if "allowed" in spec.metadata:
        return str(spec.metadata["allowed"])
    if hint is Params:
        return f"any keys: keyword arguments of the plug-in (`[{key}]`), checked by its signature"
    return {bool: "`true` or `false`", str: "any string"}.get(hint, "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "—"


def table(cls: type, prefix: str) -> list[str]:
    """Return the Markdown table of ``cls``'s own keys (not its sub-tables).

    A field without a comment that the class docstring explains is "described above".
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    doc = inspect.getdoc(cls) or ""
    rows = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            continue
        key = f"{prefix}{spec.name}"
        cells = (
            f"`{key}`",
            _type(hint),
            f"`{_toml(_default(spec))}`",
            _allowed(key, spec, hint),
            comments.get(spec.name, "") or ("described above" if f"``{spec.name}``" in doc else ""),
        )
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _prose(docstring: str) -> str:
    """Turn reStructuredText markup in a docstring into Markdown."""
    text = re.sub(r"``([^`]+)``", r"`\1`", docstring)
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)


def _title(prefix: str) -> str:
    return f"`[{prefix.rstrip('.')}]`" if prefix else "Top-level keys"


def render() -> str:
    """Return the whole page."""
    tables = list(sections())
    contents = ", ".join(
        f"[{_title(p)}](#{p.rstrip('.').replace('.', '') or 'top-level-keys'})" for p, _ in tables
    )
    parts = [
        "# Configuration reference",
        f"Generated by `{COMMAND}` from the dataclasses of `fedsim/config.py` — do not edit by "
        "hand. Tables: " + contents + ".",
        _INTRO.format(example=EXAMPLE.read_text().strip()),
    ]
    for prefix, cls in tables:
        doc = _prose(inspect.getdoc(cls) or "")
        parts += [f"## {_title(prefix)}", doc, "\n".join(table(cls, prefix))]
    return "\n\n".join(part for part in parts if part) + "\n"


_INTRO = """\
A run is one TOML file. Keys left out take the defaults below; an unknown key, a value of
the wrong type or one out of range stops the run before any work, with one line naming the
key (and "did you mean" for a misspelt one). Beyond each key, a config is checked as a
whole when it loads: cohorts no larger than `data.num_clients`, plug-ins that import and
take their `params`, and privacy options that the strategy honours.

## Example

`experiments/configs/demo.toml`, the run of `make demo`:

```toml
{example}
```

## Overriding keys

`--set KEY=VALUE` (repeatable) changes one key of the file, by its dotted name as in the
tables below. The value is read as TOML; a bare word is a string.

```bash
fedsim run experiments/configs/demo.toml --set rounds=20 --set data.alpha=0.1 --set name=skewed
fedsim run experiments/configs/demo.toml --set engine.name=threads --set client.device=auto
fedsim run my.toml --set strategy.params.mu=0.01      # a plug-in's keyword argument
```

Flower's `run_config` is flat: the same dotted names as keys (`"data.num_clients" = 10`),
under `[tool.flwr.app.config]` in `pyproject.toml`, or on the command line of
`flwr run . fedsim --run-config 'rounds=2 data.num_clients=3 model.name="mlp"'` (strings in
TOML quotes). `flwr run` overrides only the keys listed in that table; the others take the
defaults below ([deployment.md](deployment.md#7-running-flwr-run)). A plug-in's `params`
are `[strategy.params]`, `[model.params]` or `[data.params]`
([custom-strategy.md](custom-strategy.md))."""


def main(argv: list[str] | None = None) -> None:
    """Print the page, or write it to ``--write PATH``."""
    parser = argparse.ArgumentParser(prog="python -m fedsim.config_reference", description=__doc__)
    parser.add_argument("--write", metavar="PATH", help="write the page here instead of stdout")
    args = parser.parse_args(argv)
    page = render()
    if args.write:
        Path(args.write).write_text(page, encoding="utf-8")
    else:
        print(page, end="")


if __name__ == "__main__":
    main()
