// node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { fixSeedControls } from "../../web/js/logic/widgets.mjs";
import { SETTINGS } from "../../web/js/logic/settings.mjs";

function control() {
  return { name: "control_after_generate", value: "randomize", options: { values: ["fixed", "increment", "decrement", "randomize"] } };
}

test("a new Model Merger node's seed control starts fixed; other packs' nodes are left alone", () => {
  const c = control();
  const node = { type: "ModelMergerCrossArchMerge", widgets: [{ name: "seed", value: 0, linkedWidgets: [c] }, c] };
  assert.equal(fixSeedControls(node), 1);
  assert.equal(c.value, "fixed");
  const k = control();
  assert.equal(fixSeedControls({ type: "KSampler", widgets: [{ name: "seed", linkedWidgets: [k] }, k] }), 0);
  assert.equal(k.value, "randomize");
  assert.equal(fixSeedControls(null), 0);
});

test("settings: the mode sorts above the seconds it refers to (frontend: sortOrder, highest first)", () => {
  const order = [...SETTINGS].sort((a, b) => (b.sortOrder ?? 0) - (a.sortOrder ?? 0)).map((s) => s.id);
  assert.deepEqual(order, ["ModelMerger.Notify.Mode", "ModelMerger.Notify.MinSeconds"]);
  assert.ok((SETTINGS[0].sortOrder ?? 0) > (SETTINGS[1].sortOrder ?? 0));
});
