"""Every shipped strategy x every privacy option: it runs and reports its ε, or it is refused.

No combination may run without the protection it asks for. A refusal is
``load_config``'s one line, before any work; a combination that runs reports
the ε of its option in ``metrics.jsonl`` and ``summary.json``. The table in
``docs/privacy.md`` is checked against what happens.
"""

import json
import re
from pathlib import Path

import pytest

from fedsim.algorithm import PRIVACY_OPTIONS
from fedsim.clients import make_client_app
from fedsim.config import ConfigError, load_config
from fedsim.experiment import build_task, client_mods
from fedsim.registry import STRATEGIES
from fedsim.runner import run_experiment
from fedsim.strategies import SCAFFOLD, FedAvg
from tests.conftest import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]
#: The ε each option reports: (metrics.jsonl column, summary.json key).
EPSILON_OF = {
    "client.dp_sgd": ("train_dp-epsilon", "dp_epsilon"),
    "privacy.local_dp": ("train_ldp-epsilon", "ldp_epsilon"),
    "privacy.central_dp": ("privacy_epsilon", "epsilon"),
}
TINY = [
    "rounds=2", "data.num_clients=8", "strategy.clients_per_round=4", "model.name=logreg",
    "client.local_epochs=1", "strategy.stage_rounds=2", "progress=false", "plot=false",
    "checkpoint_every=0",
]  # fmt: skip


def _documented() -> dict[tuple[str, str], bool]:
    """The support table of docs/privacy.md: (strategy, option) -> supported."""
    text = (REPO / "docs" / "privacy.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| strategy |"))
    options = [cell.strip(" `") for cell in header.strip("|").split("|")[1:]]
    table = {}
    for line in text.splitlines():
        match = re.match(r"\| `([a-z-]+)` \|(.*)\|$", line)
        if match and match.group(1) in STRATEGIES:
            cells = [cell.strip() for cell in match.group(2).split("|")]
            for option, cell in zip(options, cells, strict=True):
                table[(match.group(1), option)] = cell.startswith("yes")
    return table


def test_the_docs_table_covers_every_combination() -> None:
    assert set(_documented()) == {(s, o) for s in STRATEGIES for o in PRIVACY_OPTIONS}


@pytest.mark.parametrize("option", list(PRIVACY_OPTIONS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_privacy_option_is_honoured_with_its_epsilon_or_refused_up_front(
    strategy: str, option: str, tmp_path: Path
) -> None:
    sets = [*TINY, f"strategy.name={strategy}", f"{option}=true", f"output_dir={tmp_path}"]
    try:
        config = load_config(DEMO_CONFIG, sets)
    except ConfigError as refusal:
        assert not _documented()[(strategy, option)], f"refused but documented: {refusal}"
        message = str(refusal)
        assert "\n" not in message and message.startswith(f"{option} = true is refused")
        assert not (tmp_path / "demo").exists()  # before any work
        return
    assert _documented()[(strategy, option)], "runs but documented as refused"
    summary = run_experiment(config)
    column, key = EPSILON_OF[option]
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").open()][1:]
    assert rows and all(row[column] > 0 for row in rows), rows
    assert summary[key] == rows[-1][column] > 0


def test_a_mod_refuses_at_start_up_a_message_type_it_is_not_written_for() -> None:
    config = load_config(DEMO_CONFIG, [*TINY, "privacy.local_dp=true"])
    task = build_task(config)
    make_client_app(task, client_mods(config), algorithms=[FedAvg])  # train and evaluate only
    with pytest.raises(ValueError, match=r"local privatization mod handles .* train\.scaffold"):
        make_client_app(task, client_mods(config), algorithms=[SCAFFOLD])
