// Model Merger: the per-block strength editor of Train Difference (alpha_blocks) and Cross-Arch Merge
// (scale_blocks). Plain ES module, no browser APIs, tested with node --test. The node's STRING input holds the text
// the CLI reads (merger_core/merge/blockweights.py parse_blocks): a preset name, one value per block, or NAME=value
// pairs. This module reads that text into per-block values and writes values back as text; the block names and the
// presets' values come from the server, inside the input's spec (key SPEC_KEY).

export const SPEC_KEY = "model_merger_blocks";
/** Node type -> the STRING input the editor edits and the node's global value it falls back to. */
export const BLOCK_INPUTS = {
  ModelMergerTrainDifference: { input: "alpha_blocks", global: "alpha" },
  ModelMergerCrossArchMerge: { input: "scale_blocks", global: "scale" },
};
export const NONE = "(none)";
export const CUSTOM = "(custom)";
export const ARCH_PROPERTY = "model_merger_block_arch";

const GROUPS = ["BASE", "VAE", "IN", "M", "OUT"];
const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
const IDENT = /^[A-Za-z_][A-Za-z0-9_]*$/;

function group(block) {
  const m = /^(IN|M|OUT)\d+$/.exec(block);
  return m ? m[1] : block;
}

function num(text) {
  const t = String(text).trim();
  if (!NUMBER.test(t)) return null;
  const v = Number(t);
  return Number.isFinite(v) ? v : null;
}

/** The preset named `name` (case-insensitive, like the CLI), or null. */
export function findPreset(name, presets) {
  if (typeof name !== "string" || name.startsWith("_")) return null;
  const key = Object.keys(presets || {}).find((k) => k === name.toUpperCase());
  return key ?? null;
}

function expand(name, blocks) {
  const n = name.trim().toUpperCase();
  if (n === "*") return [...blocks];
  if (blocks.includes(n)) return [n];
  if (GROUPS.includes(n)) {
    const got = blocks.filter((b) => group(b) === n);
    if (got.length) return got;
  }
  const m = /^([A-Z]+\d+)\s*-\s*([A-Z]+\d+)$/.exec(n);
  if (m && blocks.includes(m[1]) && blocks.includes(m[2])) {
    const i = blocks.indexOf(m[1]);
    const j = blocks.indexOf(m[2]);
    if (i <= j) return blocks.slice(i, j + 1);
  }
  return null;
}

/**
 * The per-block values a text gives for an architecture, as the CLI reads it: `{kind, values, preset}` where
 * `values` maps block name -> value for the blocks the text sets (the others keep the node's global value) and
 * `kind` is "empty", "preset", "list" or "pairs"; null when the CLI would refuse the text for this architecture.
 */
export function parseBlocks(text, arch, presets) {
  const blocks = arch.blocks;
  const t = typeof text === "string" ? text.trim() : "";
  if (!t) return { kind: "empty", values: {}, preset: null };
  if (IDENT.test(t)) {
    const name = findPreset(t, presets);
    if (!name) return null;
    const list = presets[name].values?.[arch.id];
    if (!Array.isArray(list) || list.length !== blocks.length) return null;
    return { kind: "preset", values: Object.fromEntries(blocks.map((b, i) => [b, list[i]])), preset: name };
  }
  const parts = t.split(",").map((p) => p.trim()).filter(Boolean);
  if (parts.some((p) => p.includes("=") || p.includes(":"))) {
    const pairs = [];
    for (const p of parts) {
      const q = p.replace(":", "=");
      const at = q.indexOf("=");
      if (at < 0) return null;
      const v = num(q.slice(at + 1));
      if (v === null) return null;
      pairs.push([q.slice(0, at).trim(), v]);
    }
    const values = {};
    const star = pairs.filter(([k]) => k === "*");
    if (star.length) for (const b of blocks) values[b] = star[star.length - 1][1];
    for (const [k, v] of pairs) {
      if (k === "*" || blocks.includes(k.toUpperCase())) continue;
      const got = expand(k, blocks);
      if (!got) return null;
      for (const b of got) values[b] = v;
    }
    for (const [k, v] of pairs) if (blocks.includes(k.toUpperCase())) values[k.toUpperCase()] = v;
    return { kind: "pairs", values, preset: null };
  }
  const nums = parts.map(num);
  if (nums.some((v) => v === null) || nums.length !== blocks.length) return null;
  return { kind: "list", values: Object.fromEntries(blocks.map((b, i) => [b, nums[i]])), preset: null };
}

/** A value as the text shows it: at most 6 decimals, no trailing zeros. */
export function formatValue(v) {
  const r = Math.round(Number(v) * 1e6) / 1e6;
  return String(Object.is(r, -0) ? 0 : r);
}

/**
 * The text for these values: one value per block when every block is set, else NAME=value pairs in block order
 * (blocks left out keep the global value); "" when none is set.
 */
export function formatBlocks(values, arch) {
  const set = arch.blocks.filter((b) => values[b] !== undefined && values[b] !== null && Number.isFinite(Number(values[b])));
  if (!set.length) return "";
  if (set.length === arch.blocks.length) return arch.blocks.map((b) => formatValue(values[b])).join(",");
  return set.map((b) => `${b}=${formatValue(values[b])}`).join(",");
}

/** The text after one slider moved: the current text's values (if it parses) with `block` set to `value`. When
 * the text does not parse for this architecture, `current` (every slider's position, in block order) is written. */
export function setBlock(text, arch, presets, block, value, current = null) {
  const parsed = parseBlocks(text, arch, presets);
  const values = parsed
    ? { ...parsed.values }
    : Object.fromEntries(Array.isArray(current) ? arch.blocks.map((b, i) => [b, current[i]]) : []);
  values[block] = Number(value);
  return formatBlocks(values, arch);
}

/** The text the preset dropdown's choice gives: the preset's name (the CLI reads it), "" for (none). */
export function presetText(choice, presets) {
  if (choice === NONE) return "";
  return findPreset(choice, presets) ?? null;
}

/** What the preset dropdown shows for a text: its preset, (none) for empty text, else (custom). */
export function presetShown(text, arch, presets) {
  const parsed = parseBlocks(text, arch, presets);
  if (!parsed) return CUSTOM;
  if (parsed.kind === "empty") return NONE;
  if (parsed.kind === "preset") return parsed.preset;
  return CUSTOM;
}

/** The slider positions for a text: its block values, `fallback` (the node's global value) for blocks it leaves
 * out; null when the text does not parse for this architecture (the sliders are left alone then). */
export function sliderValues(text, arch, presets, fallback) {
  const parsed = parseBlocks(text, arch, presets);
  if (!parsed) return null;
  return arch.blocks.map((b) => (parsed.values[b] !== undefined ? parsed.values[b] : Number(fallback)));
}

/** The architecture to show for a text: `preferred` when the text parses for it, else the first one it parses for
 * (an SD1 list of 26 values picks SD1.5), else `preferred`. */
export function pickArch(text, archs, preferred) {
  const list = archs || [];
  const pref = list.find((a) => a.id === preferred) ?? list[0];
  if (pref && parseBlocks(text, pref, {}) !== null) return pref;
  const t = typeof text === "string" ? text.trim() : "";
  if (IDENT.test(t)) return pref; // a preset name fits every architecture
  return list.find((a) => parseBlocks(text, a, {}) !== null) ?? pref;
}
