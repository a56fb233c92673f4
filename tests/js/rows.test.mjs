// node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  parseRows, serializeRows, addRow, addLoraRow, removeRow, setRow, split, isLoraRow, clampStrength,
} from "../../web/js/logic/rows.mjs";

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

test("LoRA rows round-trip beside model rows; old model-only values read as before", () => {
  const rows = [
    { ckpt: "a.safetensors", weight: 1, on: true },
    { lora: "style.safetensors", strength_model: 0.8, strength_clip: -0.5, on: false },
  ];
  const text = serializeRows(rows);
  assert.deepEqual(JSON.parse(text), rows);
  assert.deepEqual(parseRows(text), rows);
  // defaults: strengths 1, on; a LoRA row with a ckpt is a model row (the server refuses it, naming the row)
  assert.deepEqual(parseRows('[{"lora": "x.safetensors"}]'), [{ lora: "x.safetensors", strength_model: 1, strength_clip: 1, on: true }]);
  assert.deepEqual(parseRows('[{"lora": "x", "strength_model": "0.5", "strength_clip": "junk"}]')[0],
    { lora: "x", strength_model: 0.5, strength_clip: 1, on: true });
  assert.equal(isLoraRow({ ckpt: "a", lora: "b" }), false);
  assert.deepEqual(parseRows('[{"weight": 1}, 3, null, {"lora": 5}]'), []);
  const old = '[{"ckpt": "a.safetensors", "weight": 1.0, "on": true}, {"ckpt": "b.safetensors", "weight": 0.5, "on": false}]';
  assert.equal(serializeRows(parseRows(old)), JSON.stringify(JSON.parse(old)));
});

test("add LoRA rows at the end, models before them; split numbers each kind from 1", () => {
  const names = ["a.safetensors", "b.safetensors"];
  const loras = ["l1.safetensors", "l2.safetensors"];
  let rows = addRow([], names);
  rows = addLoraRow(rows, loras);
  rows = addLoraRow(rows, loras);
  rows = addRow(rows, names); // goes before the LoRA rows
  assert.deepEqual(rows.map((r) => r.ckpt ?? r.lora), ["a.safetensors", "b.safetensors", "l1.safetensors", "l2.safetensors"]);
  assert.deepEqual(rows[2], { lora: "l1.safetensors", strength_model: 1, strength_clip: 1, on: true });
  const { models, loras: lr } = split(rows);
  assert.deepEqual(models.map(([, i]) => i), [0, 1]);
  assert.deepEqual(lr.map(([r, i]) => [r.lora, i]), [["l1.safetensors", 2], ["l2.safetensors", 3]]);
  const edited = setRow(rows, 3, "strength_clip", "-0.25");
  assert.equal(edited[3].strength_clip, -0.25);
  assert.equal(rows[3].strength_clip, 1);
  assert.deepEqual(removeRow(edited, 2).map((r) => r.ckpt ?? r.lora), ["a.safetensors", "b.safetensors", "l2.safetensors"]);
  assert.equal(addLoraRow([], []).at(-1).lora, "");
  assert.equal(addLoraRow(addLoraRow([], ["x"]), ["x"]).at(-1).lora, "x"); // all used: the first again
  assert.deepEqual([clampStrength("2.5"), clampStrength(-500), clampStrength(1e9), clampStrength("nope")], [2.5, -100, 100, 1]);
});
