// Model Merger: what the browser does with a "model_merger.done" event. Plain ES module, no browser APIs,
// tested with `node --test tests/js/`. ComfyUI serves it with the rest of WEB_DIRECTORY (/extensions/<pack>/logic/toast.mjs).

export const SETTING_MODE = "ModelMerger.Notify.Mode";
export const SETTING_MIN_SECONDS = "ModelMerger.Notify.MinSeconds";
export const MODES = ["long runs only", "always", "off"];
export const DEFAULTS = Object.freeze({ mode: "long runs only", minSeconds: 30 });

/** Settings as given by the frontend (any may be missing or malformed), made usable. */
export function normalizeSettings(raw = {}) {
  const mode = MODES.includes(raw.mode) ? raw.mode : DEFAULTS.mode;
  const n = Number(raw.minSeconds);
  const minSeconds = Number.isFinite(n) && n >= 0 ? n : DEFAULTS.minSeconds;
  return { mode, minSeconds };
}

/** Whether a finished (or failed) merge should raise a toast under these settings. */
export function shouldNotify(event, rawSettings) {
  if (!event || typeof event !== "object") return false;
  const { mode, minSeconds } = normalizeSettings(rawSettings);
  if (mode === "off") return false;
  if (mode === "always") return true;
  if (event.status === "cancelled") return false; // the user asked for it; no news
  const seconds = Number(event.seconds);
  return Number.isFinite(seconds) && seconds >= minSeconds;
}

function duration(seconds) {
  const s = Number(seconds);
  if (!Number.isFinite(s) || s < 0) return "";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  const r = Math.round(s - m * 60);
  return m < 60 ? `${m} min ${String(r).padStart(2, "0")} s` : `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

/** The toast to show: {severity, summary, detail, life} for app.extensionManager.toast.add. */
export function toastFor(event) {
  const status = event?.status ?? (event?.ok ? "done" : "failed");
  const took = duration(event?.seconds);
  const title = event?.title || "Model Merger";
  if (status === "done") {
    const where = event?.output ? `Saved ${event.output}` : "Loaded into the graph";
    return { severity: "success", summary: "Merge finished", detail: `${title}\n${where}${took ? ` (${took})` : ""}`, life: 8000 };
  }
  if (status === "cancelled") {
    return { severity: "info", summary: "Merge cancelled", detail: `${title}\nNo output was written.`, life: 5000 };
  }
  const msg = String(event?.message || "unknown error");
  const short = msg.length > 400 ? `${msg.slice(0, 400)}...` : msg;
  return { severity: "error", summary: "Merge failed", detail: `${title}\n${short}`, life: 15000 };
}
