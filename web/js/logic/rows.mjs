// Model Merger: the rows of the Merge Models node: model rows (checkpoint, weight, on/off) and LoRA rows (LoRA file,
// strength_model, strength_clip, on/off). Plain ES module, no browser APIs, tested with node --test. The node's
// `models` input holds all rows as one JSON list; this module reads and writes it. A row with `ckpt` is a model, a
// row with `lora` a LoRA; workflows saved before LoRA rows existed hold model rows only and read the same.

export const ROWS_NODE = "ModelMergerMergeModels";
export const ROWS_INPUT = "models";
export const STRENGTH_MIN = -100; // LoraLoader's range
export const STRENGTH_MAX = 100;

const num = (v, dflt) => (Number.isFinite(Number(v)) && v !== null && v !== "" ? Number(v) : dflt);

export function isLoraRow(row) {
  return !!row && typeof row === "object" && typeof row.lora === "string" && !("ckpt" in row);
}

/** The rows in a `models` value; anything unreadable gives no rows (the server names the problem on queue). */
export function parseRows(text) {
  let data;
  try {
    data = JSON.parse(typeof text === "string" && text.trim() ? text : "[]");
  } catch {
    return [];
  }
  if (!Array.isArray(data)) return [];
  return data
    .filter((r) => r && typeof r === "object" && (typeof r.ckpt === "string" || isLoraRow(r)))
    .map((r) =>
      isLoraRow(r)
        ? { lora: r.lora, strength_model: num(r.strength_model, 1), strength_clip: num(r.strength_clip, 1), on: r.on !== false }
        : { ckpt: r.ckpt, weight: num(r.weight, 1), on: r.on !== false },
    );
}

/** The `models` value for these rows (the same JSON the server and scripts read). */
export function serializeRows(rows) {
  return JSON.stringify(
    rows.map((r) =>
      isLoraRow(r)
        ? { lora: String(r.lora), strength_model: Number(r.strength_model), strength_clip: Number(r.strength_clip), on: r.on !== false }
        : { ckpt: String(r.ckpt), weight: Number(r.weight), on: r.on !== false },
    ),
  );
}

/** [row, index in rows] of the model rows, then of the LoRA rows: what the node shows as "model N" and "lora N". */
export function split(rows) {
  const models = [];
  const loras = [];
  rows.forEach((r, i) => (isLoraRow(r) ? loras : models).push([r, i]));
  return { models, loras };
}

/** The rows with one more model: the first checkpoint not in a row yet (or the first one), weight 1, on; it goes
 * after the last model row (before the LoRA rows). */
export function addRow(rows, names) {
  const used = new Set(rows.filter((r) => !isLoraRow(r)).map((r) => r.ckpt));
  const ckpt = (names || []).find((n) => !used.has(n)) ?? (names || [])[0] ?? "";
  let at = rows.length;
  while (at > 0 && isLoraRow(rows[at - 1])) at -= 1;
  return [...rows.slice(0, at), { ckpt, weight: 1, on: true }, ...rows.slice(at)];
}

/** The rows with one more LoRA at the end: the first LoRA not in a row yet (or the first one), strengths 1, on. */
export function addLoraRow(rows, names) {
  const used = new Set(rows.filter(isLoraRow).map((r) => r.lora));
  const lora = (names || []).find((n) => !used.has(n)) ?? (names || [])[0] ?? "";
  return [...rows, { lora, strength_model: 1, strength_clip: 1, on: true }];
}

export function removeRow(rows, index) {
  return rows.filter((_, i) => i !== index);
}

const NUMERIC = new Set(["weight", "strength_model", "strength_clip"]);

/** Set one field of one row; returns new rows. */
export function setRow(rows, index, field, value) {
  return rows.map((r, i) => (i === index ? { ...r, [field]: NUMERIC.has(field) ? Number(value) : value } : r));
}

/** A strength as the server takes it: a finite number within LoraLoader's -100..100 (else 1 or the nearest end). */
export function clampStrength(v) {
  const x = Number(v);
  if (!Number.isFinite(x)) return 1;
  return Math.min(STRENGTH_MAX, Math.max(STRENGTH_MIN, x));
}
