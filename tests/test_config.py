"""runtime/config.py: every FASTVLLM_* variable declared once, typed, read at call time."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastvllm.runtime import config, cpu_share, instances, system
from fastvllm.runtime.errors import UsageError
from fastvllm.weights import store


def test_declarations_are_complete_and_unique() -> None:
    names = [v.name for v in config.ALL]
    assert len(names) == len(set(names))
    for v in config.ALL:
        assert v.name.startswith("FASTVLLM_"), v.name
        assert v.help and v.type_doc and v.default_doc, v.name
        assert isinstance(v.scope, config.Scope)
    with pytest.raises(ValueError, match="declared twice"):
        config._declare(config.Var[str]("FASTVLLM_HOME", str, str, "t", "d", "h"))


def test_unset_and_empty_give_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTVLLM_SERVER_NICE", raising=False)
    assert config.SERVER_NICE.get() == 10
    assert not config.SERVER_NICE.is_set()
    monkeypatch.setenv("FASTVLLM_SERVER_NICE", "  ")
    assert config.SERVER_NICE.get() == 10
    assert not config.SERVER_NICE.is_set()
    monkeypatch.setenv("FASTVLLM_SERVER_NICE", "3")
    assert config.SERVER_NICE.get() == 3
    assert config.SERVER_NICE.is_set()


def test_values_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTVLLM_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("FASTVLLM_WEIGHTS_STORE", str(tmp_path / "w"))
    assert system.fastvllm_home() == tmp_path / "h"
    assert instances.instances_dir() == tmp_path / "r"
    assert store.store_dir() == tmp_path / "w"
    monkeypatch.delenv("FASTVLLM_WEIGHTS_STORE")
    assert store.store_dir() != tmp_path / "w"


@pytest.mark.parametrize(
    ("var", "raw", "want"),
    [
        (config.PIN, "register", config.PinMode.REGISTER),
        (config.PIN, " Torch ", config.PinMode.TORCH),
        (config.CPU_ONEDNN, "1", True),
        (config.CPU_ONEDNN, "no", False),
        (config.CRIU, "/opt/criu", Path("/opt/criu")),
        (config.TEST_PORT, "20000", 20000),
        (config.IMAGE_ID, "abc\n", "abc"),
    ],
)
def test_values_parse_to_their_type(
    monkeypatch: pytest.MonkeyPatch, var: config.Var[object], raw: str, want: object
) -> None:
    monkeypatch.setenv(var.name, raw)
    assert var.get() == want


@pytest.mark.parametrize(
    ("var", "raw", "says"),
    [
        (config.SERVER_NICE, "20", "is not a nice value from 0 to 19"),
        (config.SERVER_NICE, "ten", "is not a nice value from 0 to 19"),
        (config.PIN, "cuda", "is not one of: torch, register"),
        (config.CPU_ONEDNN, "maybe", "is not 1 or 0"),
        (config.TEST_PORT, "80", "is not a port from 1024 to 65535"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: config.Var[object], raw: str, says: str
) -> None:
    monkeypatch.setenv(var.name, raw)
    with pytest.raises(UsageError) as e:
        var.get()
    line = e.value.one_line()
    assert f"{var.name}={raw!r} {says}" in line
    assert "\n" not in line and "unset it" in line
    assert e.value.exit_code == 2


def test_cpu_share_reads_its_setting_through_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.SERVER_NICE.name == cpu_share.ENV
    monkeypatch.setenv(cpu_share.ENV, "7")
    assert cpu_share.server_nice() == 7


def test_the_table_lists_every_variable_once() -> None:
    table = config.markdown_table().splitlines()
    assert table[0].startswith("| variable |")
    rows = table[2:]
    assert len(rows) == len(config.ALL)
    for v in config.ALL:
        assert sum(f"`{v.name}`" in r for r in rows) == 1
    assert all(r.count(" | ") == 4 for r in rows), "a cell holds an unescaped '|'"
