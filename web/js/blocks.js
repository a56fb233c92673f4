// Model Merger: block weights you can see. Under the per-block text input of Train Difference (alpha_blocks) and
// Cross-Arch Merge (scale_blocks): an architecture choice (SD1.5 / SDXL), a preset dropdown and one slider per
// block. Moving a slider or picking a preset rewrites the text (the CLI's format); editing the text moves the
// sliders when it parses (text that does not parse leaves them alone). The text widget stays the only stored value:
// the editor widgets are neither in widgets_values nor in the prompt; the architecture shown is a node property.
// Block names and preset values come from the input's spec (/object_info). Logic: ./logic/blocks.mjs (node --test).
import { app } from "../../scripts/app.js";
import * as bl from "./logic/blocks.mjs";

const MARK = "__modelMergerBlocks";
const SLIDER_STEP = 0.01;
const SLIDER_MIN = 0;
const SLIDER_MAX = 1;

function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function makeWidget(node, type, name, value, callback, options = {}) {
  const w = node.addWidget(type, name, value, callback, { ...options, serialize: false });
  w.serialize = false; // not in widgets_values, not in the prompt: the text widget is
  w[MARK] = true;
  return w;
}

function editorArch(node, spec) {
  const store = findWidget(node, node[MARK].input);
  const chosen = node.properties?.[bl.ARCH_PROPERTY];
  if (spec.archs.some((a) => a.id === chosen)) return spec.archs.find((a) => a.id === chosen);
  return bl.pickArch(store?.value, spec.archs, spec.default_arch);
}

/** Set the sliders and the preset dropdown from the text (sliders unchanged when it does not parse). */
function refresh(node) {
  const st = node[MARK];
  if (!st?.arch) return;
  const store = findWidget(node, st.input);
  const global = findWidget(node, st.global);
  const values = bl.sliderValues(store?.value, st.arch, st.spec.presets, global ? global.value : 1);
  if (values) st.sliders.forEach((w, i) => (w.value = values[i]));
  if (st.preset) st.preset.value = bl.presetShown(store?.value, st.arch, st.spec.presets);
  node.setDirtyCanvas?.(true, true);
}

function rebuild(node) {
  const st = node[MARK];
  const spec = st.spec;
  const store = findWidget(node, st.input);
  if (!store || !Array.isArray(spec?.archs) || !spec.archs.length) return;
  node.widgets = node.widgets.filter((w) => !w[MARK]);
  const arch = editorArch(node, spec);
  st.arch = arch;
  const presets = spec.presets || {};
  // sliders run 0..1 (where block weights live); the text takes the node's whole range (alpha and scale -2..3),
  // and a slider shows such a value's number with its bar at the end
  const lo = SLIDER_MIN;
  const hi = SLIDER_MAX;
  const write = (text) => {
    store.value = text;
    store.callback?.(text); // other listeners (and the refresh below) see the new text
  };
  const made = [];
  made.push(makeWidget(node, "combo", `${st.input} architecture`, arch.label, (label) => {
    const next = spec.archs.find((a) => a.label === label);
    if (!next) return;
    node.properties = node.properties || {};
    node.properties[bl.ARCH_PROPERTY] = next.id;
    rebuild(node);
  }, { values: spec.archs.map((a) => a.label) }));
  st.preset = makeWidget(node, "combo", `${st.input} preset`, bl.presetShown(store.value, arch, presets), (choice) => {
    const text = bl.presetText(choice, presets);
    if (text !== null) write(text);
    refresh(node);
  }, { values: [bl.NONE, ...Object.keys(presets), bl.CUSTOM] });
  made.push(st.preset);
  st.sliders = arch.blocks.map((block) => {
    const w = makeWidget(node, "slider", `${st.input} ${block}`, 0, (v) => {
      const value = Math.min(hi, Math.max(lo, Math.round(Number(v) / SLIDER_STEP) * SLIDER_STEP));
      w.value = Number(value.toFixed(2));
      const current = st.sliders.map((s) => s.value);
      write(bl.setBlock(store.value, arch, presets, block, w.value, current));
    }, { min: lo, max: hi, step: SLIDER_STEP, precision: 2 });
    w.label = block;
    return w;
  });
  made.push(...st.sliders);
  // right under the text widget (addWidget appended them at the end)
  node.widgets = node.widgets.filter((w) => !w[MARK]);
  const at = node.widgets.indexOf(store) + 1;
  node.widgets.splice(at, 0, ...made);
  refresh(node);
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

function hookText(node) {
  const st = node[MARK];
  for (const name of [st.input, st.global]) {
    const w = findWidget(node, name);
    if (!w || w[MARK + "hooked"]) continue;
    w[MARK + "hooked"] = true;
    const cb = w.callback;
    w.callback = function () {
      const r = cb?.apply(this, arguments);
      try {
        refresh(node);
      } catch (err) {
        console.warn("[Model Merger] block weights", err);
      }
      return r;
    };
  }
}

function setup(node, spec, conf) {
  node[MARK] = { spec, input: conf.input, global: conf.global, sliders: [], preset: null, arch: null };
  hookText(node);
  rebuild(node);
}

app.registerExtension({
  name: "ModelMerger.BlockWeights",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const conf = bl.BLOCK_INPUTS[nodeData?.name];
    if (!conf) return;
    const spec = () =>
      (LiteGraph.registered_node_types[nodeData.name]?.nodeData ?? nodeData)?.input?.required?.[conf.input]?.[1]?.[
        bl.SPEC_KEY
      ];
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      try {
        const s = spec();
        if (s) setup(this, s, conf);
      } catch (err) {
        console.warn("[Model Merger] block weights", err);
      }
      return r;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = configured?.apply(this, arguments);
      try {
        if (this[MARK]) {
          hookText(this);
          rebuild(this); // the stored text (and architecture property) are in place now
        }
      } catch (err) {
        console.warn("[Model Merger] block weights", err);
      }
      return r;
    };
    // LGraphNode.serialize puts widget i's value at index i and skips unsaved widgets, which leaves holes when they
    // sit between saved ones; configure reads the saved widgets in order. Close the holes.
    const serialize = nodeType.prototype.serialize;
    nodeType.prototype.serialize = function () {
      const o = serialize.apply(this, arguments);
      if (o && Array.isArray(o.widgets_values) && Array.isArray(this.widgets)) {
        const kept = [];
        this.widgets.forEach((w, i) => {
          if (w && w.serialize !== false && i < o.widgets_values.length) kept.push(o.widgets_values[i]);
        });
        o.widgets_values = kept;
      }
      return o;
    };
  },
});
