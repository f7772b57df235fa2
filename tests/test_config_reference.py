"""docs/config.md is the generator's current output, names every config key, and parses."""

import dataclasses
import inspect
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from fedsim import config
from fedsim.config_reference import COMMAND, HEADER, field_comments, render

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a cell's own '|' is written '\|'


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key below ``cls``, walked here apart from the generator's own walk."""
    keys = []
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        key = f"{prefix}{spec.name}"
        if dataclasses.is_dataclass(hints[spec.name]):
            keys += [f"[{key}]", *_leaf_keys(hints[spec.name], f"{key}.")]
        else:
            keys.append(key)
    return keys


def test_the_page_is_current() -> None:
    assert PAGE.read_text(encoding="utf-8") == render(), (
        f"docs/config.md is stale; regenerate it: .venv/bin/{COMMAND}"
    )


def test_every_field_of_every_config_dataclass_is_on_the_page() -> None:
    text = PAGE.read_text(encoding="utf-8")
    keys = _leaf_keys(config.RunConfig)
    missing = [k for k in keys if (f"## `{k}`" if k.startswith("[") else f"| `{k}` |") not in text]
    assert not missing, f"not in docs/config.md: {missing}"
    tables = {c for _, c in inspect.getmembers(config, dataclasses.is_dataclass)}
    reached = {config.RunConfig} | {_table_class(k) for k in keys if k.startswith("[")}
    assert tables <= reached, f"config dataclasses not reachable from RunConfig: {tables - reached}"


def _table_class(key: str) -> type:
    cls: type = config.RunConfig
    for part in key.strip("[]").split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def test_the_page_parses() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert text.count("```") % 2 == 0, "an unclosed code fence"
    assert "```python" not in text  # tests/test_docs.py would run it
    for block in re.findall(r"^```toml\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        tomllib.loads(block)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    rows = [line for line in prose.splitlines() if line.startswith("|")]
    header = "| " + " | ".join(HEADER) + " |"
    sub_tables = [k for k in _leaf_keys(config.RunConfig) if k.startswith("[")]
    assert rows.count(header) == 1 + len(sub_tables)  # the top-level keys' table, then one each
    for row in rows:
        cells = _CELL_SPLIT.split(row)[1:-1]
        assert len(cells) == len(HEADER), f"{len(cells)} cells: {row}"
        assert all(cell.strip() for cell in cells), f"an empty cell: {row}"


@dataclass(frozen=True)
class _Commented:
    plain: int = 1
    # Above, on
    # two lines.
    above: int = 2
    inline: bool = False  # at the end of the line
    ignored: str = "x"  # type: ignore[assignment]

    both: float = dataclasses.field(  # opening line
        default=0.5,  # inside
    )


def test_field_comments_come_from_above_and_the_end_of_the_line() -> None:
    assert field_comments(_Commented) == {
        "plain": "",
        "above": "Above, on two lines.",
        "inline": "at the end of the line",
        "ignored": "",
        "both": "opening line inside",
    }
