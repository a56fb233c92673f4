// Model Merger: widget helpers for the pack's nodes. Plain ES modules, no browser APIs (tested with node --test).

/** The frontend adds a "control after generate" combo after an INT input named seed, defaulting to "randomize":
 * the seed, and with it the merge's cache key, would change after every run. A new node of this pack starts with
 * "fixed" instead (a loaded workflow keeps the value it stored, which is applied after this). Returns how many
 * controls were set. */
export function fixSeedControls(node) {
  // nodeCreated runs inside the node's constructor, before LiteGraph sets node.type: use the class's name
  const type = node?.comfyClass || node?.constructor?.comfyClass || node?.type;
  if (typeof type !== "string" || !type.startsWith("ModelMerger")) return 0;
  let n = 0;
  for (const w of node.widgets ?? []) {
    for (const c of w.linkedWidgets ?? []) {
      const values = c.options?.values;
      if (Array.isArray(values) && values.includes("fixed") && values.includes("randomize")) {
        c.value = "fixed";
        n += 1;
      }
    }
  }
  return n;
}
