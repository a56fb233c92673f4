// Model Merger: the pack's settings (Settings > Model Merger > Notifications). Plain ES module, tested with node --test.
// The frontend lists a category's settings by sortOrder, highest first: the mode comes before the number it refers to.
import { SETTING_MODE, SETTING_MIN_SECONDS, MODES, DEFAULTS } from "./toast.mjs";

export const SETTINGS = [
  {
    id: SETTING_MODE,
    category: ["Model Merger", "Notifications", "Mode"],
    name: "Show a notification when a merge ends",
    type: "combo",
    options: [...MODES],
    defaultValue: DEFAULTS.mode,
    sortOrder: 2,
    tooltip: "'long runs only' shows it for merges that took at least the number of seconds set below.",
  },
  {
    id: SETTING_MIN_SECONDS,
    category: ["Model Merger", "Notifications", "MinSeconds"],
    name: "'long runs only': minimum merge duration (seconds)",
    type: "number",
    defaultValue: DEFAULTS.minSeconds,
    sortOrder: 1,
    attrs: { min: 0, step: 1 },
  },
];
