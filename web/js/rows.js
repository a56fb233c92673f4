// Model Merger: the Merge Models node's rows (checkpoint, weight, on/off, "+ Add model"; LoRA, strength_model,
// strength_clip, on/off, "+ Add LoRA"), like rgthree's Power Lora Loader lists LoRAs. The rows live in the node's `models` widget as JSON (hidden; the workflow and the API prompt
// store that string), so reload, copy-paste and undo restore them: the rows are rebuilt from it after every
// configure. The row widgets themselves are neither saved nor sent. Logic: ./logic/rows.mjs (node --test).
import { app } from "../../scripts/app.js";
import * as rows from "./logic/rows.mjs";

const ROW_MARK = "__modelMergerRow";

function modelsWidget(node) {
  return node.widgets?.find((w) => w.name === rows.ROWS_INPUT);
}

function addRowWidget(node, type, name, value, callback, options = {}) {
  const w = node.addWidget(type, name, value, callback, { ...options, serialize: false });
  w.serialize = false; // not in widgets_values: the models JSON is
  w[ROW_MARK] = true;
  return w;
}

function rebuild(node, names, loraNames = []) {
  const store = modelsWidget(node);
  if (!store) return;
  store.hidden = true;
  store.computeSize = () => [0, -4];
  node.widgets = node.widgets.filter((w) => !w[ROW_MARK]);
  const current = rows.parseRows(store.value);
  const write = (next) => {
    store.value = rows.serializeRows(next);
    rebuild(node, names, loraNames);
  };
  const set = (i, field, v) => {
    store.value = rows.serializeRows(rows.setRow(rows.parseRows(store.value), i, field, v));
  };
  const { models, loras } = rows.split(current);
  models.forEach(([row, i], k) => {
    const n = k + 1;
    addRowWidget(node, "toggle", `model ${n} on`, row.on, (v) => set(i, "on", !!v));
    addRowWidget(node, "combo", `model ${n}`, row.ckpt, (v) => set(i, "ckpt", v),
      { values: names.length ? names : [row.ckpt] });
    addRowWidget(node, "number", `model ${n} weight`, row.weight, (v) => set(i, "weight", Math.max(0, Number(v))),
      { min: 0, max: 1000, step: 0.1, step2: 0.01, precision: 2 });
    addRowWidget(node, "button", `✕ remove model ${n}`, null, () => write(rows.removeRow(rows.parseRows(store.value), i)));
  });
  addRowWidget(node, "button", "+ Add model", null, () => write(rows.addRow(rows.parseRows(store.value), names)));
  const strength = { min: rows.STRENGTH_MIN, max: rows.STRENGTH_MAX, step: 0.1, step2: 0.01, precision: 2 };
  loras.forEach(([row, i], k) => {
    const n = k + 1;
    addRowWidget(node, "toggle", `lora ${n} on`, row.on, (v) => set(i, "on", !!v));
    addRowWidget(node, "combo", `lora ${n}`, row.lora, (v) => set(i, "lora", v),
      { values: loraNames.length ? loraNames : [row.lora] });
    addRowWidget(node, "number", `lora ${n} strength_model`, row.strength_model,
      (v) => set(i, "strength_model", rows.clampStrength(v)), strength);
    addRowWidget(node, "number", `lora ${n} strength_clip`, row.strength_clip,
      (v) => set(i, "strength_clip", rows.clampStrength(v)), strength);
    addRowWidget(node, "button", `✕ remove lora ${n}`, null, () => write(rows.removeRow(rows.parseRows(store.value), i)));
  });
  addRowWidget(node, "button", "+ Add LoRA", null, () => write(rows.addLoraRow(rows.parseRows(store.value), loraNames)));
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ModelMerger.Rows",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== rows.ROWS_NODE) return;
    const spec = nodeData.input?.required?.[rows.ROWS_INPUT]?.[1] || {};
    const listed = (key) => {
      const list = LiteGraph.registered_node_types[rows.ROWS_NODE]?.nodeData?.input?.required?.[rows.ROWS_INPUT]?.[1]
        ?.[key] ?? spec[key];
      return Array.isArray(list) ? list : [];
    };
    const names = () => listed("model_merger_checkpoints");
    const loraNames = () => listed("model_merger_loras");
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      try {
        rebuild(this, names(), loraNames());
      } catch (err) {
        console.warn("[Model Merger] rows", err);
      }
      return r;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = configured?.apply(this, arguments);
      try {
        rebuild(this, names(), loraNames());
      } catch (err) {
        console.warn("[Model Merger] rows", err);
      }
      return r;
    };
  },
});
