// node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { parseRows, serializeRows, addRow, removeRow, setRow } from "../../web/js/logic/rows.mjs";

test("rows round-trip through the models JSON the server reads", () => {
  const rows = [{ ckpt: "a.safetensors", weight: 1, on: true }, { ckpt: "b.safetensors", weight: 0.5, on: false }];
  const text = serializeRows(rows);
  assert.deepEqual(JSON.parse(text), rows);
  assert.deepEqual(parseRows(text), rows);
  assert.deepEqual(parseRows(""), []);
  assert.deepEqual(parseRows("{not json"), []);
  assert.deepEqual(parseRows('[{"ckpt": "x", "weight": "2"}]'), [{ ckpt: "x", weight: 2, on: true }]);
});

test("add, remove and edit rows without changing the input rows", () => {
  const names = ["a.safetensors", "b.safetensors", "c.safetensors"];
  let rows = addRow([], names);
  rows = addRow(rows, names);
  assert.deepEqual(rows.map((r) => r.ckpt), ["a.safetensors", "b.safetensors"]);
  const edited = setRow(rows, 1, "weight", "0.25");
  assert.equal(edited[1].weight, 0.25);
  assert.equal(rows[1].weight, 1);
  assert.deepEqual(removeRow(edited, 0).map((r) => r.ckpt), ["b.safetensors"]);
  assert.equal(addRow([], []).at(-1).ckpt, "");
});
