// node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  parseBlocks, formatBlocks, formatValue, setBlock, presetText, presetShown, sliderValues, pickArch, findPreset,
  NONE, CUSTOM,
} from "../../web/js/logic/blocks.mjs";

const SD1 = {
  id: "sd1", label: "SD1.5",
  blocks: ["BASE", ...[...Array(12).keys()].map((i) => `IN${String(i).padStart(2, "0")}`), "M00",
    ...[...Array(12).keys()].map((i) => `OUT${String(i).padStart(2, "0")}`)],
};
const SDXL = {
  id: "sdxl_base", label: "SDXL",
  blocks: ["BASE", ...[...Array(9).keys()].map((i) => `IN0${i}`), "M00", ...[...Array(9).keys()].map((i) => `OUT0${i}`), "VAE"],
};
const PRESETS = {
  FLAT_50: { doc: "0.5", values: { sd1: SD1.blocks.map(() => 0.5), sdxl_base: SDXL.blocks.map(() => 0.5) } },
  IN_ONLY: {
    doc: "in",
    values: {
      sd1: SD1.blocks.map((b) => (b.startsWith("IN") ? 1 : 0)),
      sdxl_base: SDXL.blocks.map((b) => (b.startsWith("IN") ? 1 : 0)),
    },
  },
};

test("the block counts are the CLI's", () => {
  assert.equal(SD1.blocks.length, 26);
  assert.equal(SDXL.blocks.length, 21);
});

test("empty, preset, list and pairs parse like the CLI", () => {
  assert.deepEqual(parseBlocks("  ", SD1, PRESETS), { kind: "empty", values: {}, preset: null });
  const p = parseBlocks("in_only", SDXL, PRESETS);
  assert.equal(p.kind, "preset");
  assert.equal(p.preset, "IN_ONLY");
  assert.equal(p.values.IN03, 1);
  assert.equal(p.values.OUT03, 0);
  const list = parseBlocks(SD1.blocks.map((_, i) => i / 100).join(", "), SD1, PRESETS);
  assert.equal(list.kind, "list");
  assert.equal(list.values.OUT11, 0.25);
  const pairs = parseBlocks("*=0.5, OUT=1, BASE:0, IN02-IN04=0.2, in03=0.3", SD1, PRESETS);
  assert.equal(pairs.kind, "pairs");
  assert.equal(pairs.values.M00, 0.5);
  assert.equal(pairs.values.OUT07, 1);
  assert.equal(pairs.values.BASE, 0);
  assert.equal(pairs.values.IN02, 0.2);
  assert.equal(pairs.values.IN03, 0.3); // a single block wins over a range
  assert.equal(pairs.values.IN05, 0.5);
  assert.deepEqual(parseBlocks("IN00=1,OUT=0.5", SDXL, PRESETS).values,
    { IN00: 1, OUT00: 0.5, OUT01: 0.5, OUT02: 0.5, OUT03: 0.5, OUT04: 0.5, OUT05: 0.5, OUT06: 0.5, OUT07: 0.5, OUT08: 0.5 });
  assert.equal(parseBlocks("1e-1," + SDXL.blocks.slice(1).map(() => "+.5").join(","), SDXL, PRESETS).values.BASE, 0.1);
});

test("text the CLI refuses does not parse", () => {
  for (const bad of ["NOPE", "_doc", "0.5", "IN00=x", "IN00=", "IN00=1,0.5", "IN12=1", "IN09=1", "OUT05-OUT02=1",
    "IN00=inf", "IN00=nan", SD1.blocks.map(() => "1").join(",")]) {
    assert.equal(parseBlocks(bad, SDXL, PRESETS), null, bad);
  }
  assert.equal(parseBlocks("VAE=1", SD1, PRESETS), null); // SD1's block map has no VAE block
  assert.equal(parseBlocks("IN11=1", SD1, PRESETS).values.IN11, 1);
  assert.equal(parseBlocks(SD1.blocks.map(() => "1").join(","), SD1, PRESETS).kind, "list");
});

test("values are written as one value per block, or as pairs when some are left out", () => {
  const all = Object.fromEntries(SDXL.blocks.map((b, i) => [b, i / 3]));
  const text = formatBlocks(all, SDXL);
  assert.equal(text.split(",").length, 21);
  assert.equal(text.split(",")[1], "0.333333");
  assert.deepEqual(Object.values(parseBlocks(text, SDXL, PRESETS).values).map((v) => +v.toFixed(6)),
    SDXL.blocks.map((_, i) => +(i / 3).toFixed(6)));
  assert.equal(formatBlocks({ OUT01: 0.5, IN00: 1 }, SDXL), "IN00=1,OUT01=0.5"); // block order
  assert.equal(formatBlocks({}, SDXL), "");
  assert.equal(formatValue(-0), "0");
  assert.equal(formatValue(0.1 + 0.2), "0.3");
});

test("a slider move keeps the other blocks of the text", () => {
  assert.equal(setBlock("", SDXL, PRESETS, "IN04", 0.3), "IN04=0.3");
  assert.equal(setBlock("IN04=0.3", SDXL, PRESETS, "OUT00", 1), "IN04=0.3,OUT00=1");
  const fromPreset = setBlock("FLAT_50", SD1, PRESETS, "M00", 0.9).split(",");
  assert.equal(fromPreset.length, 26);
  assert.equal(fromPreset[13], "0.9");
  assert.equal(fromPreset[0], "0.5");
  // text that does not parse: the sliders' positions are written
  const current = SDXL.blocks.map(() => 0.25);
  const fixed = setBlock("IN99=oops", SDXL, PRESETS, "VAE", 0, current).split(",");
  assert.equal(fixed.length, 21);
  assert.equal(fixed[20], "0");
  assert.equal(fixed[0], "0.25");
});

test("presets: the dropdown writes the name, and shows what the text is", () => {
  assert.equal(presetText("IN_ONLY", PRESETS), "IN_ONLY");
  assert.equal(presetText(NONE, PRESETS), "");
  assert.equal(presetText(CUSTOM, PRESETS), null);
  assert.equal(findPreset("flat_50", PRESETS), "FLAT_50");
  assert.equal(presetShown("flat_50", SD1, PRESETS), "FLAT_50");
  assert.equal(presetShown("", SD1, PRESETS), NONE);
  assert.equal(presetShown("IN00=1", SD1, PRESETS), CUSTOM);
  assert.equal(presetShown("garbage=", SD1, PRESETS), CUSTOM);
});

test("sliders follow text that parses, fall back to the global value, and are left alone otherwise", () => {
  const v = sliderValues("IN00=0.2", SDXL, PRESETS, 0.75);
  assert.equal(v.length, 21);
  assert.equal(v[1], 0.2);
  assert.equal(v[0], 0.75);
  assert.deepEqual(sliderValues("", SD1, PRESETS, 1), SD1.blocks.map(() => 1));
  assert.equal(sliderValues("IN00=", SD1, PRESETS, 1), null);
});

test("the architecture shown follows the text when only one fits", () => {
  const archs = [SD1, SDXL];
  assert.equal(pickArch("", archs, "sdxl_base").id, "sdxl_base");
  assert.equal(pickArch("GRAD_V", archs, "sdxl_base").id, "sdxl_base");
  assert.equal(pickArch(SD1.blocks.map(() => "1").join(","), archs, "sdxl_base").id, "sd1");
  assert.equal(pickArch("OUT11=1", archs, "sdxl_base").id, "sd1");
  assert.equal(pickArch("VAE=1", archs, "sd1").id, "sdxl_base");
  assert.equal(pickArch("junk=", archs, "sd1").id, "sd1");
});
