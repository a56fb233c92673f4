// Model Merger browser extension (thin): pack settings and a toast when a merge ends.
// The logic lives in ./logic/toast.mjs (tested with node --test); ComfyUI serves everything under WEB_DIRECTORY
// and auto-loads only the .js files, so the .mjs helpers are imported from here.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import * as logic from "./logic/toast.mjs";

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
  settings: [
    {
      id: "ModelMerger.Notify.Mode",
      category: ["Model Merger", "Notifications", "Mode"],
      name: "Show a notification when a merge ends",
      type: "combo",
      options: ["long runs only", "always", "off"],
      defaultValue: "long runs only",
      tooltip: "'long runs only' shows it for merges that took at least the number of seconds below.",
    },
    {
      id: "ModelMerger.Notify.MinSeconds",
      category: ["Model Merger", "Notifications", "MinSeconds"],
      name: "Minimum merge duration for a notification (seconds)",
      type: "number",
      defaultValue: 30,
      attrs: { min: 0, step: 1 },
    },
  ],
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
