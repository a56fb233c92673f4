// node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { DEFAULTS, normalizeSettings, shouldNotify, toastFor } from "../../web/js/logic/toast.mjs";

test("defaults: long runs only, 30 s", () => {
  assert.deepEqual(normalizeSettings({}), { mode: "long runs only", minSeconds: 30 });
  assert.deepEqual(normalizeSettings({ mode: "bogus", minSeconds: "x" }), { ...DEFAULTS });
  assert.deepEqual(normalizeSettings({ mode: "always", minSeconds: "5" }), { mode: "always", minSeconds: 5 });
  assert.equal(normalizeSettings({ minSeconds: -1 }).minSeconds, 30);
});

test("long runs only: threshold is inclusive, short runs are quiet", () => {
  const s = { mode: "long runs only", minSeconds: 30 };
  assert.equal(shouldNotify({ status: "done", seconds: 29.9 }, s), false);
  assert.equal(shouldNotify({ status: "done", seconds: 30 }, s), true);
  assert.equal(shouldNotify({ status: "failed", seconds: 45 }, s), true);
  assert.equal(shouldNotify({ status: "failed", seconds: 2 }, s), false);
  assert.equal(shouldNotify({ status: "cancelled", seconds: 100 }, s), false);
  assert.equal(shouldNotify({ status: "done" }, s), false);
  assert.equal(shouldNotify({ status: "done", seconds: 5 }, { mode: "long runs only", minSeconds: 0 }), true);
});

test("always and off", () => {
  assert.equal(shouldNotify({ status: "done", seconds: 0.1 }, { mode: "always" }), true);
  assert.equal(shouldNotify({ status: "cancelled", seconds: 0.1 }, { mode: "always" }), true);
  assert.equal(shouldNotify({ status: "done", seconds: 1000 }, { mode: "off" }), false);
  assert.equal(shouldNotify(null, { mode: "always" }), false);
});

test("toast content per status", () => {
  const done = toastFor({ status: "done", title: "T", seconds: 75, output: "checkpoints/m_00001_.safetensors" });
  assert.equal(done.severity, "success");
  assert.match(done.detail, /Saved checkpoints\/m_00001_\.safetensors \(1 min 15 s\)/);
  assert.match(toastFor({ status: "done", seconds: 3 }).detail, /Loaded into the graph \(3\.0 s\)/);
  const failed = toastFor({ status: "failed", message: "models[1] (b.safetensors): file not found" });
  assert.equal(failed.severity, "error");
  assert.match(failed.detail, /\(b\.safetensors\): file not found/);
  assert.ok(toastFor({ status: "failed", message: "x".repeat(1000) }).detail.length < 500);
  assert.equal(toastFor({ status: "cancelled" }).severity, "info");
  assert.equal(toastFor({ ok: true }).summary, "Merge finished");
});
