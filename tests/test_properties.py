"""Hostile input, property-based: configs, client replies, checkpoints and device CSVs.

Whatever a user types or a client sends, fedsim answers with a valid result or one
line naming the problem, never a traceback, and a bad reply never reaches the model.
Hypothesis draws the inputs. The ``ci`` profile (the default) is derandomized and
bounded so that this file takes well under a minute; ``HYPOTHESIS_PROFILE=nightly``
draws many more examples with a random seed (docs/reliability.md).
"""

import contextlib
import dataclasses
import io
import math
import os
import string
import typing
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tomli_w
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsim import keys
from fedsim.arrays import arrays_of, to_array_record
from fedsim.checkpoint import CheckpointError, RunCheckpoint
from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.config import ConfigError, RunConfig, load_config, parse_config
from fedsim.engine import InlineGrid
from fedsim.engine.devices import CsvProfiles
from fedsim.engine.execute import error_reply, run_client_app
from fedsim.loop import RoundReport, run_rounds
from fedsim.results import CHECKPOINT_FILE, CONFIG_FILE, check_resumable
from fedsim.strategies import BVRLSGD, SARAH, SCAFFOLD, FedAvg, LocalSGD, MinibatchSGD
from fedsim.strategies.aggregation import InvalidReplyError, WeightedMean
from fedsim.strategies.central_dp import CentralDP

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=_SLOW
)
settings.register_profile("nightly", max_examples=1000, deadline=None, suppress_health_check=_SLOW)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _examples(ci: int) -> Callable:
    """Run ``ci`` examples under the ci profile; the loaded profile's count otherwise."""
    if settings().max_examples >= 1000:  # nightly (or a larger profile): keep its count
        return settings()
    return settings(max_examples=ci)


# --------------------------------------------------------------------------- configs


def _schema(cls: type = RunConfig, prefix: str = "") -> dict[str, type]:
    """Every dotted config key with its type hint (tables as their dataclass)."""
    hints = typing.get_type_hints(cls)
    found = {}
    for field in dataclasses.fields(cls):
        key, hint = f"{prefix}{field.name}", hints[field.name]
        found[key] = hint
        if dataclasses.is_dataclass(hint):
            found.update(_schema(typing.cast(type, hint), f"{key}."))
    return found


SCHEMA = _schema()
TABLES = {key for key, hint in SCHEMA.items() if dataclasses.is_dataclass(hint)}
LEAVES = sorted(set(SCHEMA) - TABLES)
# Import paths are drawn from this list only: random text must never name a real
# module, whose import would run it (``antigravity`` opens a browser).
IMPORT_PATHS = [
    "nowhere:thing", "os:getcwd", "math:pi", ":", "a:", ":b", "fedsim.strategies:FedAvg",
    "fedsim.models:nothing", "fedsim.strategies:SCAFFOLD", "torch.nn:Linear",
]  # fmt: skip
SHIPPED_NAMES = [
    "fedavg", "scaffold", "bvr-l-sgd", "sarah", "gs-wgan", "cnn", "mlp", "digits", "pydocs",
    "least-squares", "synthetic", "iid", "natural", "qsplit", "inline", "threads", "cpu",
    "cuda:0", "auto", "poisson", "fixed", "rdp", "prv", "mse", "cross-entropy",
]  # fmt: skip
JUNK_KEYS = st.text(string.ascii_letters + string.digits + "_-. [/]", min_size=1, max_size=12)

# Text without ':' (no import path) and without control characters (see the xfail below).
safe_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=":"), max_size=12
)
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, -1, 10, 100, 1000, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e-5, 2.0, -0.5, math.inf, math.nan]),
    safe_text,
    st.sampled_from(SHIPPED_NAMES + IMPORT_PATHS),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(["a", "x", "hidden", "lr"]) | JUNK_KEYS, children, max_size=3
        ),  # fmt: skip
    ),
    max_leaves=6,
)


@st.composite
def config_documents(draw: st.DrawFn) -> dict:
    """A nested TOML table of real keys (mostly) and junk ones, with values of any type."""
    document: dict = {}
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(LEAVES) | st.sampled_from(sorted(TABLES)) | JUNK_KEYS)
        value = draw(toml_values)
        *parents, leaf = key.split(".")
        table = document
        for part in parents:
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                break
            table = child
        else:
            table[leaf] = value
    return document


set_strings = (
    st.builds(
        "{}={}".format,
        st.sampled_from(LEAVES) | JUNK_KEYS | st.just(""),
        st.sampled_from(
            [
                "1",
                "0",
                "-1",
                "true",
                "1.5",
                "nan",
                "inf",
                '"x"',
                "[1, 2]",
                "{a = 1}",
                "[/x]",
                "[bold]",
                "'",
                '"',
                "2000-01-01",
                "fedavg",
                "nowhere:thing",
            ]
        )
        | safe_text,  # fmt: skip
    )
    | safe_text
)


def _names_a_key(message: str, document: dict) -> bool:
    """Whether ``message`` names a key: a config key, or a dotted key of ``document``."""
    return any(key in message for key in [*SCHEMA, *_dotted(document)])


def _dotted(table: dict, prefix: str = "") -> list[str]:
    keys_ = []
    for key, value in table.items():
        keys_.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys_.extend(_dotted(value, f"{prefix}{key}."))
    return keys_


def _valid_or_one_line_error(
    parse: Callable[[], RunConfig], document: dict, file: Path | None = None
) -> None:
    try:
        config = parse()
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message, message
        in_file = file is not None and message.startswith(f"{file}: invalid TOML")
        assert _names_a_key(message, document) or message.startswith("--set ") or in_file, message
    else:
        assert isinstance(config, RunConfig)


@_examples(80)
@given(document=config_documents())
def test_any_config_document_parses_or_fails_in_one_line_naming_a_key(document: dict) -> None:
    _valid_or_one_line_error(lambda: parse_config(document), document)


@_examples(40)
@given(document=config_documents(), overrides=st.lists(set_strings, max_size=3))
def test_any_toml_file_and_set_strings_load_or_fail_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, document: dict, overrides: list[str]
) -> None:
    path = tmp_path_factory.mktemp("config") / "run.toml"
    try:
        path.write_text(tomli_w.dumps(document))  # NaN and inf are TOML too
    except (TypeError, ValueError):  # a value TOML cannot write (none expected)
        return
    keys_ = {o.partition("=")[0] for o in overrides}
    _valid_or_one_line_error(
        lambda: load_config(path, overrides), {**document, **dict.fromkeys(keys_)}
    )


@_examples(25)
@given(
    text=st.text(max_size=80)
    | st.binary(max_size=80).map(lambda b: b.decode("latin-1"))
    | st.sampled_from(
        ["[", "rounds = ", "a.b = 1\na = 2", "[data]\n[data]", "x = 1979-05-27T00:32"]
    )
)
def test_a_file_that_is_not_toml_is_one_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("config") / "run.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _valid_or_one_line_error(lambda: load_config(path), {}, path)


def _cli(*argv: str) -> tuple[int, str]:
    """Run ``fedsim`` with ``argv``; the run itself is a stub: return the exit code and stderr."""
    stderr = io.StringIO()
    with (
        mock.patch("fedsim.runner.run_experiment", side_effect=_Stop),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            code = main(list(argv))
        except _Stop:
            code = -1  # the config was valid: the stub stopped before training
    return code, stderr.getvalue()


class _Stop(BaseException):  # past the CLI's "run failed" handler
    """Raised by the stub of ``run_experiment``."""


@_examples(20)
@given(document=config_documents(), overrides=st.lists(set_strings, max_size=2))
def test_the_cli_prints_a_config_error_in_one_line_and_exits_2(
    tmp_path_factory: pytest.TempPathFactory, document: dict, overrides: list[str]
) -> None:
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "run.toml"
    path.write_text(tomli_w.dumps({**document, "output_dir": str(folder)}))
    code, stderr = _cli("run", str(path), *[a for o in overrides for a in ("--set", o)])
    if code == -1:
        return  # valid: it got as far as the run
    assert code == EXIT_BAD_INPUT, stderr
    assert stderr.startswith("fedsim: config error: "), stderr
    assert stderr.count("\n") == 1, stderr  # one line, ended


def test_rich_markup_in_a_config_error_is_printed_as_written() -> None:
    # Regression: the CLI passed the error to rich as markup; '[/x]' raised MarkupError.
    code, stderr = _cli("run", "experiments/configs/demo.toml", "--set", "rounds=[/x]")
    assert code == EXIT_BAD_INPUT
    assert (
        stderr == "fedsim: config error: rounds = '[/x]' has the wrong type; expected an integer\n"
    )


def test_the_cli_prints_a_key_with_a_line_break_in_one_line() -> None:
    code, stderr = _cli("run", "experiments/configs/demo.toml", "--set", "a\nb=1")
    assert code == EXIT_BAD_INPUT
    assert stderr.startswith("fedsim: config error: unknown key 'a\\nb'")
    assert stderr.count("\n") == 1


def test_a_config_error_about_a_key_with_a_line_break_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"a\nb": 1})
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- replies

NUM_NODES = 4
MODEL = {
    "w": np.array([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]], np.float32),
    "b": np.zeros(2, np.float32),
}
ACTIONS = ["train", "train.anchor", "train.estimate", "train.local", "train.gradient",
           "train.scaffold", "evaluate"]  # fmt: skip
EVERYONE = {"fraction_train": 1.0, "min_train_nodes": NUM_NODES, "fraction_evaluate": 1.0,
            "min_evaluate_nodes": NUM_NODES, "min_available_nodes": NUM_NODES}  # fmt: skip
GRADIENT = {"lr": 0.1, "batch_size": 1, "local_steps": 1, **EVERYONE}
STRATEGIES: dict[str, Callable[[], object]] = {
    "fedavg": lambda: FedAvg(**EVERYONE),
    "bvr-l-sgd": lambda: BVRLSGD(stage_rounds=2, **GRADIENT),
    "sarah": lambda: SARAH(stage_rounds=2, **GRADIENT),
    "minibatch-sgd": lambda: MinibatchSGD(**GRADIENT),
    "local-sgd": lambda: LocalSGD(**GRADIENT),
    "scaffold": lambda: SCAFFOLD(**GRADIENT),
    "central-dp": lambda: CentralDP(
        FedAvg(**EVERYONE),
        noise_multiplier=0.5,
        clip_norm=1.0,
        expected_cohort_size=NUM_NODES,
        sampling="fixed",
    ),  # fmt: skip
}
Answer = Callable[[Message, int], RecordDict | None]
MODES = st.sampled_from(["engine", "no-finite-check", "flower"])


def _good_content(message: Message, node: int) -> RecordDict:
    """A correct reply: each array record sent, moved by the node's index; metrics."""
    content = RecordDict(
        {keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: node + 1, keys.TRAIN_LOSS: 0.5})}
    )
    if message.metadata.message_type == "evaluate":
        return content
    for name in (keys.ARRAYS, keys.CONTROL):
        if isinstance(record := message.content.get(name), ArrayRecord):
            moved = {k: v + np.float32(0.25 * (node + 1)) for k, v in arrays_of(record).items()}
            content[name] = to_array_record(moved)
    return content


def _app(answer: Answer) -> ClientApp:
    """A ClientApp for every strategy's actions: ``answer`` replies, or a correct reply."""
    app = ClientApp()

    def handle(message: Message, context: Context) -> Message:
        node = int(context.node_config["partition-id"])
        content = answer(message, node)
        return Message(content if content is not None else _good_content(message, node),
                       reply_to=message)  # fmt: skip

    for action in ACTIONS:
        kind, _, name = action.partition(".")
        getattr(app, kind)(name or "default")(handle)
    return app


def _run(strategy_name: str, answer: Answer, *, rounds: int = 2) -> tuple[dict, list[RoundReport]]:
    reports: list[RoundReport] = []

    class Keep:
        def on_round(self, report: RoundReport) -> None:
            reports.append(report)

    with InlineGrid(_app(answer), num_nodes=NUM_NODES) as grid:
        final = run_rounds(
            strategy=STRATEGIES[strategy_name](),  # type: ignore[arg-type]
            grid=grid,
            initial_arrays=to_array_record(MODEL),
            num_rounds=rounds,
            train_config=ConfigRecord({keys.SEED: 0}),
            observers=[Keep()],
        )
    return arrays_of(final), reports[1:]


def _assert_model_intact(model: dict[str, np.ndarray]) -> None:
    assert list(model) == list(MODEL)
    for name, value in model.items():
        assert value.shape == MODEL[name].shape and value.dtype == MODEL[name].dtype, name
        assert np.isfinite(value).all(), (name, value)


# Arrays of any dtype, shape and values, including those the model's entries have.
DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int64, np.uint8, np.uint64, np.bool_,
          np.complex64, np.dtype(">f4"), np.dtype("<U3"), np.dtype("datetime64[s]")]  # fmt: skip
any_array = st.one_of(
    hnp.arrays(
        st.sampled_from(DTYPES),
        st.sampled_from([(2, 3), (2,), (3, 2), (0,), (2, 0), (), (1, 2, 3)])
        | hnp.array_shapes(max_dims=3, max_side=4),
    ),
    hnp.arrays(np.float32, st.sampled_from([(2, 3), (2,)]), elements=st.floats(width=32)),
    hnp.arrays(
        np.float64,
        st.sampled_from([(2, 3), (2,)]),
        elements=st.sampled_from([1e300, -1e39, 3.5e38, math.nan, -math.inf, 1.0]),
    ),  # fmt: skip
    st.just(np.zeros(10_000, np.float32)),  # huge next to the model: a wrong shape
    st.just(np.zeros((2, 3), "V4")),  # raw bytes
    st.just(np.zeros((2, 3), [("x", "<f4")])),  # records
)


@st.composite
def lying_arrays(draw: st.DrawFn) -> Array:
    """An ``Array`` whose metadata lies about its bytes, or whose bytes are no ``.npy``."""
    honest = Array(draw(any_array.filter(lambda a: a.dtype.kind not in "UV")))
    return Array(
        dtype=draw(st.sampled_from([honest.dtype, "float32", "int8", "junk", "[('x', '<f4')]"])),
        shape=draw(st.sampled_from([tuple(honest.shape), (2, 3), (2,), (7,), ()])),
        stype=draw(st.sampled_from([honest.stype, "numpy.ndarray", "torch.Tensor", ""])),
        data=draw(st.sampled_from([honest.data, honest.data[:12], b"", b"\x93NUMPY\x01\x00\x00",
                                   b"\x93NUMPY" + bytes(range(40))])),
    )  # fmt: skip


array_records = st.dictionaries(
    st.sampled_from(["w", "b", "junk"]), any_array.map(Array) | lying_arrays(), max_size=3
).map(ArrayRecord)
metric_values_ = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**64, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
    st.lists(st.integers(-5, 5), max_size=3),
)
metric_records = st.dictionaries(
    st.sampled_from([keys.NUM_EXAMPLES, keys.TRAIN_LOSS, "x"]), metric_values_, max_size=3
).map(MetricRecord)
config_records = st.dictionaries(
    st.sampled_from([keys.NUM_EXAMPLES, "x"]),
    st.text(max_size=4) | st.integers() | st.booleans() | st.binary(max_size=4),
    max_size=2,
).map(ConfigRecord)
any_record = array_records | metric_records | config_records
any_content = st.dictionaries(
    st.sampled_from([keys.ARRAYS, keys.METRICS, keys.CONTROL, keys.CONFIG, "junk"]),
    any_record,
    max_size=4,
).map(RecordDict)


@st.composite
def broken_arrays(draw: st.DrawFn) -> Callable[[RecordDict], None]:
    """One change to a correct reply's ``arrays`` that no strategy may aggregate."""
    kind = draw(st.sampled_from(["drop", "retype", "nan", "inf", "shape", "missing", "extra",
                                 "dtype", "range", "lie", "empty"]))  # fmt: skip
    entry = draw(st.sampled_from(["w", "b"]))
    other = draw(any_record.filter(lambda r: not isinstance(r, ArrayRecord)))
    lie = draw(lying_arrays())

    def spoil(content: RecordDict) -> None:
        if kind == "drop":
            del content[keys.ARRAYS]
            return
        if kind == "retype":
            content[keys.ARRAYS] = other
            return
        values = dict(arrays_of(content[keys.ARRAYS]))
        value = values[entry].copy()
        if kind in ("nan", "inf"):
            value.flat[0] = np.nan if kind == "nan" else -np.inf
            values[entry] = value
        elif kind == "shape":
            values[entry] = value.reshape(-1)[:-1]
        elif kind == "missing":
            del values[entry]
        elif kind == "extra":
            values["extra"] = value
        elif kind == "dtype":  # not a number type
            values[entry] = value.astype(np.complex64) + 1j
        elif kind == "range":  # finite, but infinite in the model's float32
            values[entry] = value.astype(np.float64) + 1e300
        elif kind == "empty":
            values[entry] = np.zeros((0,), np.float32)
        record = to_array_record(values)
        if kind == "lie":
            record = ArrayRecord(dict(record.items()))
            record[entry] = lie
            if _reads_as(lie, value):
                record[entry] = Array(
                    dtype="junk", shape=value.shape, stype=lie.stype, data=lie.data
                )
        content[keys.ARRAYS] = record

    return spoil


def _reads_as(array: Array, value: np.ndarray) -> bool:
    """Whether a lying ``Array`` happens to read as a valid entry of ``value``'s place."""
    try:
        read = arrays_of(ArrayRecord({"x": array}))["x"]
    except Exception:  # noqa: BLE001 - unreadable: broken, as wanted
        return False
    return read.shape == value.shape and read.dtype.kind in "biuf" and np.isfinite(read).all()


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@_examples(8)
@given(broken=st.lists(st.booleans(), min_size=NUM_NODES, max_size=NUM_NODES),
       spoils=st.lists(broken_arrays(), min_size=NUM_NODES, max_size=NUM_NODES),
       mode=MODES)  # fmt: skip
def test_a_reply_with_broken_arrays_is_skipped_as_if_its_client_had_failed(
    strategy_name: str, broken: list[bool], spoils: list, mode: str
) -> None:
    def hostile(message: Message, node: int) -> RecordDict | None:
        if not broken[node] or message.metadata.message_type == "evaluate":
            return None
        content = _good_content(message, node)
        if keys.ARRAYS in content:
            spoils[node](content)
        return content

    def failing(message: Message, node: int) -> RecordDict | None:
        if broken[node] and message.metadata.message_type != "evaluate":
            raise RuntimeError("stands in for a skipped reply")
        return None

    with mock.patch("fedsim.engine.inline.run_client_app", _checking(mode)):
        model, reports = _run(strategy_name, hostile)
    expected, _ = _run(strategy_name, failing)
    _assert_model_intact(model)
    for name in MODEL:  # the very model of a run whose broken clients had failed
        np.testing.assert_array_equal(model[name], expected[name], err_msg=name)


def _checking(mode: str) -> Callable:
    """How replies reach the strategy: fedsim's engine with or without its finite check, or
    as Flower's runtimes pass them on, unchecked (``"flower"``)."""

    def run(app: ClientApp, message: Message, context: Context, **_: object) -> Message:
        if mode != "flower":
            return run_client_app(app, message, context, check_finite_arrays=mode == "engine")
        try:
            return app(message, context)
        except Exception as exc:  # noqa: BLE001 - as Flower's runtime turns it into a reply
            return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc))

    return run


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@_examples(12)
@given(replies=st.lists(st.none() | any_content, min_size=NUM_NODES, max_size=NUM_NODES),
       mode=MODES)  # fmt: skip
def test_any_reply_leaves_a_finite_model_of_the_original_shapes(
    strategy_name: str, replies: list[RecordDict | None], mode: str
) -> None:
    def hostile(message: Message, node: int) -> RecordDict | None:
        return replies[node]

    with mock.patch("fedsim.engine.inline.run_client_app", _checking(mode)):
        model, reports = _run(strategy_name, hostile)
    _assert_model_intact(model)
    assert all(report.replies >= report.failures for report in reports)


# Plain regressions for the bugs the properties found.


def test_an_array_whose_bytes_are_no_array_becomes_an_error_reply() -> None:
    # It raised out of run_client_app, through the engine, and ended the run.
    def answer(message: Message, node: int) -> RecordDict | None:
        if node == 0 and message.metadata.message_type == "train":
            lie = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"junk")
            return RecordDict({keys.ARRAYS: ArrayRecord({"w": lie, "b": Array(MODEL["b"])}),
                               keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1})})  # fmt: skip
        return None

    model, reports = _run("fedavg", answer, rounds=1)
    assert reports[0].failures == 1
    _assert_model_intact(model)


@pytest.mark.parametrize(
    ("values", "weight", "message"),
    [
        ({"w": np.array(["a", "b"])}, 1, "not a number type"),
        ({"w": np.ones(2, np.complex64)}, 1, "not a number type"),
        ({"w": np.full(2, 1e300)}, 1, "beyond float32's range"),
        ({"w": np.full(2, 3e38, np.float32)}, 1e300, "too large"),
        ({"w": np.ones(2, np.float32)}, 10**400, "finite number"),
    ],
)
def test_weighted_mean_refuses_what_its_float32_mean_cannot_hold(values, weight, message) -> None:
    # Strings raised ValueError, complex warned and dropped the imaginary part, 1e300 and
    # a weight of 1e300 became inf in the float32 mean, an int weight of 10**400 raised.
    mean = WeightedMean({"w": (2,)}, dtypes={"w": np.dtype(np.float32)})
    mean.add({"w": np.ones(2, np.float32)}, 1)
    with pytest.raises(InvalidReplyError, match=message):
        mean.add(values, weight)
    assert mean.mean()["w"].tolist() == [1.0, 1.0]


def test_weighted_mean_reads_other_byte_orders_and_unsigned_integers() -> None:
    mean = WeightedMean({"w": (2,)}, dtypes={"w": np.dtype(np.float32)})
    mean.add({"w": np.array([1.0, 3.0], ">f4")}, 1)  # torch refused a big-endian view
    mean.add({"w": np.array([3, 5], np.uint64)}, 1)  # torch has no aminmax for uint64
    assert mean.mean()["w"].tolist() == [2.0, 4.0] and mean.mean()["w"].dtype == np.float32


def test_fedavg_keeps_the_models_dtype_whatever_the_first_reply_sent() -> None:
    # The mean took the first reply's dtype: an int8 reply made the float32 model int8.
    def answer(message: Message, node: int) -> RecordDict | None:
        if node == 0 and message.metadata.message_type == "train":
            ints = {name: np.ones(v.shape, np.int8) for name, v in MODEL.items()}
            return RecordDict({keys.ARRAYS: to_array_record(ints),
                               keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1})})  # fmt: skip
        return None

    with mock.patch("fedsim.engine.inline.run_client_app", _checking("flower")):
        model, _ = _run("fedavg", answer, rounds=1)
    _assert_model_intact(model)


def test_fedavg_skips_a_reply_whose_metrics_differ_from_an_empty_first_set() -> None:
    # WeightedMean took an empty first set of metrics for "no shapes fixed yet": the next
    # reply's metrics passed check() and add_checked() raised out of aggregate_train.
    def answer(message: Message, node: int) -> RecordDict | None:
        if node == 0 and message.metadata.message_type == "train":
            content = _good_content(message, node)
            content[keys.METRICS] = MetricRecord({keys.NUM_EXAMPLES: 1})  # no train_loss
            return content
        return None

    model, reports = _run("fedavg", answer, rounds=1)
    _assert_model_intact(model)
    assert "train_train_loss" not in reports[0].as_row()  # node 0's metrics came first


# --------------------------------------------------------------- checkpoints and CSVs


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, bytes]:
    """A run folder with a real checkpoint (FedAvg state, a grid's node states)."""
    folder = tmp_path_factory.mktemp("runs")
    config = load_config("experiments/configs/demo.toml", [f"output_dir={folder}", "name=r"])
    config.run_dir.mkdir(parents=True)
    (config.run_dir / CONFIG_FILE).write_text(__import__("json").dumps(dataclasses.asdict(config)))
    (config.run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    record = to_array_record({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    grid_state = {"contexts": {1: RecordDict({"x": to_array_record({"c": np.ones(3)})})}}

    class Grid:
        def state_dict(self) -> dict:
            return grid_state

        def load_state_dict(self, state: dict) -> None:
            pass

    RunCheckpoint(config.run_dir / CHECKPOINT_FILE).save(1, record, None, Grid())
    return config, (config.run_dir / CHECKPOINT_FILE).read_bytes()


@st.composite
def damaged(draw: st.DrawFn, whole: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "garbage", "splice"]))
    if kind == "truncate":
        return whole[: draw(st.integers(0, len(whole) - 1))]
    if kind == "flip":
        data = bytearray(whole)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    start = draw(st.integers(0, len(whole) - 1))
    return whole[:start] + draw(st.binary(min_size=1, max_size=64)) + whole[start:]


def test_a_damaged_checkpoint_is_one_line_naming_it(saved_run: tuple[RunConfig, bytes]) -> None:
    config, whole = saved_run
    path = config.run_dir / CHECKPOINT_FILE
    assert check_resumable(config) == 1  # the undamaged file resumes

    @_examples(60)
    @given(data=damaged(whole))
    def damaged_file(data: bytes) -> None:
        path.write_bytes(data)
        try:
            saved = RunCheckpoint(path).load()
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:  # a flip in the arrays' bytes, say: still a checkpoint
            assert saved is not None
        try:
            check_resumable(config)
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(config.run_dir) in str(exc)

    try:
        damaged_file()
    finally:
        path.write_bytes(whole)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([1, 2], "holds list"),
        ({"round": 1}, "not a checkpoint's"),
        ({"round": "1", "arrays": ArrayRecord(), "strategy": None, "grid": None}, "round is '1'"),
        ({"round": -1, "arrays": ArrayRecord(), "strategy": None, "grid": None}, "round is -1"),
        ({"round": 1, "arrays": {}, "strategy": None, "grid": None}, "arrays are a dict"),
        ({"round": 1, "arrays": ArrayRecord(), "strategy": [], "grid": None}, "strategy state"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_a_checkpoint_error(
    tmp_path: Path, state: object, message: str
) -> None:
    # It raised TypeError from Saved(**state), or later comparing a str round with an int.
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message):
        RunCheckpoint(path).load()


@pytest.mark.parametrize("damage", ["truncate", "config"])
def test_resume_from_a_damaged_run_prints_one_line_and_exits_2(
    tmp_path: Path, saved_run: tuple[RunConfig, bytes], damage: str
) -> None:
    # A truncated checkpoint raised UnpicklingError (or RuntimeError), a damaged config.json
    # JSONDecodeError: the CLI printed their tracebacks.
    config, whole = saved_run
    run_dir = tmp_path / config.name
    run_dir.mkdir()
    for name in (CONFIG_FILE, "metrics.jsonl"):
        (run_dir / name).write_bytes((config.run_dir / name).read_bytes())
    (run_dir / CHECKPOINT_FILE).write_bytes(
        whole[: len(whole) // 2] if damage == "truncate" else whole
    )
    if damage == "config":
        (run_dir / CONFIG_FILE).write_text('{"name": "r", ')
    code, stderr = _cli("run", "experiments/configs/demo.toml", "--set", f"output_dir={tmp_path}",
                        "--set", "name=r", "--resume")  # fmt: skip
    assert code == EXIT_BAD_INPUT
    assert stderr.startswith(f"fedsim: config error: cannot resume {run_dir}/: ")
    assert stderr.count("\n") == 1


HEADER = "partition_id,speed,availability,bandwidth_mbps"
csv_cells = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "2",
            "0.5",
            "1.0",
            "-1",
            "nan",
            "inf",
            "1e400",
            "",
            " 3 ",
            "²",
            "٣",
            "[/x]",
            '"',
            '"1,2"',
            "x\x00",
            "9" * 30,
        ]
    ),  # fmt: skip
    st.text(max_size=6),
)


@st.composite
def device_csvs(draw: st.DrawFn) -> bytes:
    headers = [HEADER, HEADER + ",extra", "speed,partition_id", "", HEADER.upper()]
    header = draw(st.sampled_from(headers) | st.text(max_size=30))
    rows = draw(st.lists(st.lists(csv_cells, min_size=0, max_size=6).map(",".join), max_size=5))
    text = "\n".join([header, *rows]) + draw(st.sampled_from(["", "\n", "\r\n"]))
    data = text.encode("utf-8", errors="surrogatepass")
    return draw(
        st.sampled_from([data, b"\xef\xbb\xbf" + data, data + b"\xff\xfe", data[:-1] or data])
    )


@_examples(80)
@given(data=device_csvs())
def test_a_device_csv_gives_profiles_or_one_value_error_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("devices") / "devices.csv"
    path.write_bytes(data)
    try:
        profiles = CsvProfiles(path)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
    else:
        assert len(profiles) >= 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"partition_id,speed,availability,bandwidth_mbps\n0,1,1,1\xff\n", "not UTF-8"),
        ("partition_id,speed,availability,bandwidth_mbps\n²,1,1,1\n".encode(), "not an integer"),
        (
            b'partition_id,speed,availability,bandwidth_mbps\n0,1,1,"' + b"9" * 200_000 + b'"\n',
            "field larger than field limit",
        ),  # fmt: skip
    ],
)
def test_device_csv_regressions(tmp_path: Path, data: bytes, message: str) -> None:
    # UnicodeDecodeError and int('²') named no file; csv.Error is no ValueError.
    path = tmp_path / "devices.csv"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as error:
        CsvProfiles(path)
    assert str(path) in str(error.value)
