// Model Merger browser extension (thin): pack settings, a toast when a merge ends, fixed seed controls.
// The logic lives in ./logic/toast.mjs (tested with node --test); ComfyUI serves everything under WEB_DIRECTORY
// and auto-loads only the .js files, so the .mjs helpers are imported from here.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import * as logic from "./logic/toast.mjs";
import * as widgets from "./logic/widgets.mjs";
import { SETTINGS } from "./logic/settings.mjs";

function readSetting(id, fallback) {
  try {
    const v = app.extensionManager?.setting?.get?.(id) ?? app.ui?.settings?.getSettingValue?.(id);
    return v === undefined || v === null ? fallback : v;
  } catch {
    return fallback;
  }
}

function showToast(t) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add(t);
  else console.log(`[Model Merger] ${t.summary}: ${t.detail}`);
}

app.registerExtension({
  name: "ModelMerger.Notify",
  settings: SETTINGS,
  nodeCreated(node) {
    try {
      widgets.fixSeedControls(node);
    } catch (err) {
      console.warn("[Model Merger] could not set the seed control", err);
    }
  },
  async setup() {
    api.addEventListener("model_merger.done", async (e) => {
      try {
        const l = logic;
        const settings = {
          mode: readSetting(l.SETTING_MODE, l.DEFAULTS.mode),
          minSeconds: readSetting(l.SETTING_MIN_SECONDS, l.DEFAULTS.minSeconds),
        };
        if (l.shouldNotify(e.detail, settings)) showToast(l.toastFor(e.detail));
      } catch (err) {
        console.warn("[Model Merger] notification failed", err);
      }
    });
  },
});
