// Model Merger: the Merge Models node's rows (checkpoint, weight, on/off, "+ Add model"), like rgthree's Power Lora
// Loader lists LoRAs. The rows live in the node's `models` widget as JSON (hidden; the workflow and the API prompt
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

function rebuild(node, names) {
  const store = modelsWidget(node);
  if (!store) return;
  store.hidden = true;
  store.computeSize = () => [0, -4];
  node.widgets = node.widgets.filter((w) => !w[ROW_MARK]);
  const current = rows.parseRows(store.value);
  const write = (next) => {
    store.value = rows.serializeRows(next);
    rebuild(node, names);
  };
  current.forEach((row, i) => {
    const n = i + 1;
    addRowWidget(node, "toggle", `model ${n} on`, row.on, (v) => {
      store.value = rows.serializeRows(rows.setRow(rows.parseRows(store.value), i, "on", !!v));
    });
    addRowWidget(node, "combo", `model ${n}`, row.ckpt, (v) => {
      store.value = rows.serializeRows(rows.setRow(rows.parseRows(store.value), i, "ckpt", v));
    }, { values: names.length ? names : [row.ckpt] });
    addRowWidget(node, "number", `model ${n} weight`, row.weight, function (v) {
      store.value = rows.serializeRows(rows.setRow(rows.parseRows(store.value), i, "weight", Math.max(0, Number(v))));
    }, { min: 0, max: 1000, step: 0.1, step2: 0.01, precision: 2 });
    addRowWidget(node, "button", `✕ remove model ${n}`, null, () => write(rows.removeRow(rows.parseRows(store.value), i)));
  });
  addRowWidget(node, "button", "+ Add model", null, () => write(rows.addRow(rows.parseRows(store.value), names)));
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ModelMerger.Rows",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== rows.ROWS_NODE) return;
    const spec = nodeData.input?.required?.[rows.ROWS_INPUT]?.[1] || {};
    const names = () => {
      const list = LiteGraph.registered_node_types[rows.ROWS_NODE]?.nodeData?.input?.required?.[rows.ROWS_INPUT]?.[1]
        ?.model_merger_checkpoints ?? spec.model_merger_checkpoints;
      return Array.isArray(list) ? list : [];
    };
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      try {
        rebuild(this, names());
      } catch (err) {
        console.warn("[Model Merger] rows", err);
      }
      return r;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = configured?.apply(this, arguments);
      try {
        rebuild(this, names());
      } catch (err) {
        console.warn("[Model Merger] rows", err);
      }
      return r;
    };
  },
});
