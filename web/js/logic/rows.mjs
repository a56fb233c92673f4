// Model Merger: the rows of the Merge Models node (checkpoint, weight, on/off). Plain ES module, no browser APIs,
// tested with node --test. The node's `models` input holds the rows as JSON; this module reads and writes it.

export const ROWS_NODE = "ModelMergerMergeModels";
export const ROWS_INPUT = "models";

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
    .filter((r) => r && typeof r === "object" && typeof r.ckpt === "string")
    .map((r) => ({
      ckpt: r.ckpt,
      weight: Number.isFinite(Number(r.weight)) ? Number(r.weight) : 1,
      on: r.on !== false,
    }));
}

/** The `models` value for these rows (the same JSON the server and scripts read). */
export function serializeRows(rows) {
  return JSON.stringify(rows.map((r) => ({ ckpt: String(r.ckpt), weight: Number(r.weight), on: r.on !== false })));
}

/** The rows with one more: the first checkpoint not in a row yet (or the first one), weight 1, on. */
export function addRow(rows, names) {
  const used = new Set(rows.map((r) => r.ckpt));
  const ckpt = (names || []).find((n) => !used.has(n)) ?? (names || [])[0] ?? "";
  return [...rows, { ckpt, weight: 1, on: true }];
}

export function removeRow(rows, index) {
  return rows.filter((_, i) => i !== index);
}

/** Set one field of one row; returns new rows. */
export function setRow(rows, index, field, value) {
  return rows.map((r, i) => (i === index ? { ...r, [field]: field === "weight" ? Number(value) : value } : r));
}
