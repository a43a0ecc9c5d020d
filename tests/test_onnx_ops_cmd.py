"""`jacli ops` and the operator table of docs/onnx.md, both read from the rule registry;
the registry's version ranges and per-input entries."""
from __future__ import annotations

import pytest

import json
from pathlib import Path


from jacli.backends.onnx.rules import __main__ as rules_main  # noqa: E402
from jacli.backends.onnx.rules import catalog, lookup, registry  # noqa: E402
from conftest import run_jacli  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "onnx.md"


def test_docs_table_is_generated_from_the_registry():
    text = DOC.read_text()
    assert rules_main.replace_table(text, catalog.markdown()) == text, (
        "docs/onnx.md is stale: run python -m jacli.backends.onnx.rules --write docs/onnx.md")


def test_ops_json_lists_every_entry_with_modes_and_inputs():
    r = run_jacli("ops", "--json")
    assert r.code == 0, r.stderr
    rows = json.loads(r.stdout)["operators"]
    by_op = {}
    for row in rows:
        by_op.setdefault(row["op"], []).append(row)
    assert {e.op for e in registry.entries()} == set(by_op)
    conv = by_op["Conv"][0]
    assert conv["kind"] == "rule" and conv["family"] == "conv" and conv["since"] == 1 and conv["until"] is None
    assert {"X", "B"} <= set(conv["vjp"]) and {"X", "B"} <= set(conv["jvp"])
    assert by_op["BatchNormalization"][0]["outputs"] == ["Y"]  # running statistics: no derivative
    assert by_op["Shape"][0]["kind"] == "zero" and by_op["Floor"][0]["kind"] == "piecewise"
    assert by_op["Gather"][0]["vjp"] == ["data"]  # integer inputs are not listed
    for row in rows:
        if row["kind"] == "rule":
            assert row["vjp"] or row["jvp"], row


def test_ops_terminal_table():
    r = run_jacli("ops")
    assert r.code == 0 and "Conv" in r.out and "MatMul" in r.out and "piecewise" in r.out


def test_operator_version_resolution(monkeypatch):
    assert registry.operator_version("ReduceSum", 17) == 13
    assert registry.operator_version("ReduceSum", 12) == 11
    assert registry.operator_version("NoSuchOp", 17) == 17
    old = registry.Entry("FakeOp", since=1, until=12, vjp=lambda b, n, gs: {}, module="test")
    new = registry.Entry("FakeOp", since=13, vjp=lambda b, n, gs: {}, module="test")
    monkeypatch.setitem(registry._ENTRIES, "FakeOp", [old, new])
    monkeypatch.setattr(registry, "operator_version", lambda op, opset: opset)
    assert lookup("FakeOp", 11) == [old] and lookup("FakeOp", 12) == [old] and lookup("FakeOp", 20) == [new]
    assert lookup("FakeOp", 20, domain="com.example") == []
    # ReduceSum's real entry serves both the attribute (11) and the input (13) form
    monkeypatch.undo()
    assert lookup("ReduceSum", 11) and lookup("ReduceSum", 18)


def test_legacy_table_assignment_registers_an_entry(monkeypatch):
    monkeypatch.setattr(registry, "_ENTRIES", {})
    fn = lambda b, n, gs: {0: gs[0]}  # noqa: E731
    registry.VJP_RULES["Foo"] = fn
    assert "Foo" in registry.VJP_RULES and "Foo" not in registry.JVP_RULES
    assert registry.VJP_RULES["Foo"] is fn and list(registry.VJP_RULES) == ["Foo"]
    (e,) = registry.entries()
    assert (e.op, e.since, e.until, e.inputs, e.vjp, e.jvp) == ("Foo", 1, None, None, fn, None)
    with pytest.raises(ValueError, match="already has a VJP rule"):  # a second entry would never be used
        registry.VJP_RULES["Foo"] = lambda b, n, gs: {}


def test_markdown_rows_match_json_rows():
    md = catalog.markdown()
    for row in catalog.rows():
        if row["kind"] == "rule":
            assert f"| {row['op']} |" in md
        else:
            assert row["op"] in md
