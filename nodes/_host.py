"""Everything the nodes need from ComfyUI, in one place: folders, progress, cancel, events, model loading.

Only ``nodes/`` imports ComfyUI. The imports are done here so a test can replace these modules with a stand-in.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Iterable, List, Optional

import comfy.model_management
import comfy.utils
import folder_paths

from ..merger_core.errors import ManifestError, ModelMergerError, OutputError, ScanError
from ..merger_core.units import human_bytes, human_seconds, mem_available  # noqa: F401  (host.human_* for the nodes)

log = logging.getLogger("model_merger")

CATEGORY = "model_merger"
MANIFEST_TYPE = "MANIFEST"
FOLDER_KIND = "model_merger"  # where Load Manifest looks for manifest files (models/model_merger by default)
ALLOW_ANY_FOLDER_ENV = "MODEL_MERGER_ALLOW_ANY_FOLDER"
DONE_EVENT = "model_merger.done"
NOT_IN_SCAN_ROOTS = {"custom_nodes"}


class PathNotAllowedError(ScanError):
    """A folder or input lies outside the folders ComfyUI knows for models."""


# -------------------------------------------------------------------------------------------------------------------
# Folders


def register_folder_kind() -> None:
    """Register the ``model_merger`` folder kind, merging into an entry the user's extra_model_paths.yaml made."""
    default = os.path.join(folder_paths.models_dir, FOLDER_KIND)
    entry = folder_paths.folder_names_and_paths.get(FOLDER_KIND)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER_KIND] = ([default], {".json"})
        return
    paths, exts = entry
    if default not in paths:
        paths.append(default)
    exts = set(exts or ())
    exts.add(".json")
    folder_paths.folder_names_and_paths[FOLDER_KIND] = (paths, exts)


def any_folder_allowed() -> bool:
    """The server owner's opt-in (an environment variable, so no browser user can switch it on)."""
    return os.environ.get(ALLOW_ANY_FOLDER_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def model_roots() -> List[str]:
    """Every folder ComfyUI knows for models (all folder kinds but custom_nodes), plus its output folder."""
    roots: List[str] = []
    for kind, entry in folder_paths.folder_names_and_paths.items():
        if kind in NOT_IN_SCAN_ROOTS:
            continue
        for p in entry[0]:
            p = os.path.abspath(p)
            if p not in roots:
                roots.append(p)
    out = os.path.abspath(folder_paths.get_output_directory())
    if out not in roots:
        roots.append(out)
    return roots


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def check_allowed(path: str, what: str = "folder") -> str:
    """Return ``path`` made absolute if it lies inside a ComfyUI model folder (or anything goes by opt-in).

    Both the path as written (normalised, so ``..`` cannot climb out) and its real path are accepted: a symlink
    placed inside a model folder by the server's owner is fine.
    """
    absolute = os.path.abspath(path)
    if any_folder_allowed():
        return absolute
    real = os.path.realpath(absolute)
    roots = model_roots()
    for root in roots:
        if _inside(absolute, root) or _inside(real, os.path.realpath(root)):
            return absolute
    log.info("Model Merger refused %s %r; allowed folders: %s", what, path, ", ".join(roots))  # for the owner only
    raise PathNotAllowedError(refusal(what, path))


def refusal(what: str, path: str) -> str:
    """Why a path is refused: the rule and the path, never the server's folder layout (a browser user reads it)."""
    return (
        f"{what} {path!r} is outside the folders ComfyUI knows for models (only its model folders, those of "
        f"extra_model_paths.yaml included, and its output folder are allowed). The server's owner can allow any "
        f"folder by starting ComfyUI with {ALLOW_ANY_FOLDER_ENV}=1."
    )


def checkpoint_names() -> List[str]:
    return [n for n in folder_paths.get_filename_list("checkpoints") if n.lower().endswith((".safetensors", ".sft"))]


def checkpoint_path(name: str) -> str:
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise ModelMergerError(f"checkpoint {name!r} is not in ComfyUI's checkpoint folders")
    return path


def checkpoint_folders() -> List[str]:
    return [os.path.abspath(p) for p in folder_paths.get_folder_paths("checkpoints")]


def manifest_files() -> List[str]:
    try:
        return [n for n in folder_paths.get_filename_list(FOLDER_KIND) if n.lower().endswith(".json")]
    except KeyError:
        return []


def manifest_file_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER_KIND, name)
    if path is None:
        raise ModelMergerError(f"manifest {name!r} is not in the model_merger folders (models/model_merger)")
    return path


def output_path(prefix: str, extension: str = ".safetensors") -> str:
    """A new file name under ComfyUI's output folder for ``prefix`` (``sub/name`` -> ``sub/name_00001_.ext``).

    A prefix that is absolute or climbs out of the output folder is refused.
    """
    problem = prefix_problem(prefix)
    if problem:
        raise OutputError(problem)
    out_dir = os.path.abspath(folder_paths.get_output_directory())
    full_folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(prefix, out_dir)
    while True:
        path = os.path.join(full_folder, f"{filename}_{counter:05}_{extension}")
        if not os.path.exists(path):
            return path
        counter += 1


def prefix_problem(prefix: str) -> Optional[str]:
    """Why a filename prefix is refused, or None."""
    if not isinstance(prefix, str) or not prefix.strip():
        return "the filename prefix is empty"
    if "\x00" in prefix:
        return "the filename prefix contains a NUL character"
    if os.path.isabs(prefix) or prefix.startswith(("/", "\\")) or (len(prefix) > 1 and prefix[1] == ":"):
        return f"filename prefix {prefix!r} is an absolute path; give a path under ComfyUI's output folder"
    out_dir = os.path.abspath(folder_paths.get_output_directory())
    target = os.path.abspath(os.path.join(out_dir, os.path.normpath(prefix)))
    if not _inside(target, out_dir) or target == out_dir:
        return f"filename prefix {prefix!r} points outside ComfyUI's output folder ({out_dir})"
    if os.path.basename(os.path.normpath(prefix)) in ("", ".", ".."):
        return f"filename prefix {prefix!r} has no file name part"
    return None


def rel_to_output(path: str) -> str:
    out_dir = os.path.abspath(folder_paths.get_output_directory())
    try:
        return os.path.relpath(path, out_dir).replace(os.sep, "/")
    except ValueError:
        return path


# -------------------------------------------------------------------------------------------------------------------
# Progress, cancel and events


def _server():
    try:
        import server

        return server.PromptServer.instance
    except Exception:  # no server (scripts, some tests)
        return None


def check_interrupt() -> bool:
    """The engine's cancel callback: raises ComfyUI's interrupt exception when the user cancelled."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def interrupt_exception_types() -> tuple:
    t = getattr(comfy.model_management, "InterruptProcessingException", None)
    return (t,) if t is not None else ()


def send_text(node_id, text: str) -> None:
    srv = _server()
    if srv is None or node_id is None or not hasattr(srv, "send_progress_text"):
        return
    try:
        srv.send_progress_text(text, str(node_id))
    except Exception as exc:  # progress text is a nicety; never fail a merge over it
        log.debug("send_progress_text failed: %s", exc)


def send_event(data: dict, event: str = DONE_EVENT) -> None:
    srv = _server()
    if srv is None:
        return
    try:
        srv.send_sync(event, data, getattr(srv, "client_id", None))
    except Exception as exc:
        log.debug("send_sync failed: %s", exc)


def progress_text(info, label: str = "merging") -> str:
    """One line for the node: key count, MB/s and ETA (``info`` is an engine ProgressInfo)."""
    elapsed = max(info.elapsed, 1e-6)
    rate = info.bytes_done / elapsed
    left = max(0, info.bytes_total - info.bytes_done)
    eta = left / rate if rate > 0 else 0.0
    return (
        f"{label}: key {info.keys_done}/{info.keys_total} | {human_bytes(info.bytes_done)} of "
        f"{human_bytes(info.bytes_total)} | {rate / 1e6:.0f} MB/s | ETA {human_seconds(eta)}"
    )


class NodeProgress:
    """Engine progress callback -> ComfyUI progress bar (same thread) and a throttled progress text."""

    def __init__(self, node_id, label: str = "merging", text_every: float = 0.5):
        self.node_id = node_id
        self.label = label
        self.text_every = text_every
        self.bar = None
        self._last_text = 0.0
        self.last_info = None

    def _make_bar(self, total: int):
        try:
            return comfy.utils.ProgressBar(total, node_id=self.node_id)
        except TypeError:  # older ComfyUI without node_id
            return comfy.utils.ProgressBar(total)

    def __call__(self, info) -> None:
        self.last_info = info
        if self.bar is None:
            self.bar = self._make_bar(info.keys_total)
        now = time.monotonic()
        done = info.keys_done >= info.keys_total
        if done or now - self._last_text >= self.text_every:
            self._last_text = now
            send_text(self.node_id, progress_text(info, self.label))
        self.bar.update_absolute(info.keys_done, info.keys_total)  # raises if the user cancelled

    def cancel(self) -> bool:
        return check_interrupt()


class KeyProgress(NodeProgress):
    """For engine parts that report ``progress(done, total, key)`` (the model diff)."""

    def __call__(self, done, total, key=None):
        if self.bar is None:
            self.bar = self._make_bar(total)
        now = time.monotonic()
        if done >= total or now - self._last_text >= self.text_every:
            self._last_text = now
            send_text(self.node_id, f"{self.label}: key {done}/{total}")
        self.bar.update_absolute(done, total)


# -------------------------------------------------------------------------------------------------------------------
# Memory and model loading


def available_ram() -> Optional[int]:
    """Bytes of RAM available: psutil where ComfyUI has it, else the engine's reader."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return mem_available()


def make_room(needed_bytes: int) -> Optional[str]:
    """Unload ComfyUI's cached models when less than ``needed_bytes`` of RAM is free. Returns a note, or None."""
    free = available_ram()
    if free is None or free >= needed_bytes:
        return None
    comfy.model_management.unload_all_models()
    try:
        comfy.model_management.soft_empty_cache()
    except Exception:
        pass
    gc.collect()
    after = available_ram()
    note = f"unloaded ComfyUI's cached models first: {human_bytes(free)} free, about {human_bytes(needed_bytes)} needed"
    if after is not None:
        note += f", {human_bytes(after)} free after"
    return note


def embedding_dirs() -> List[str]:
    try:
        return folder_paths.get_folder_paths("embeddings")
    except Exception:
        return []


def load_state_dict(state_dict) -> tuple:
    """Hand a merged state dict to ComfyUI; returns (MODEL, CLIP, VAE). The dict is emptied."""
    import comfy.sd

    out = comfy.sd.load_state_dict_guess_config(
        state_dict, output_vae=True, output_clip=True, embedding_directory=embedding_dirs()
    )
    state_dict.clear()
    if out is None:
        raise ModelMergerError(
            "ComfyUI did not recognise the merged model's layout (comfy.sd.load_state_dict_guess_config found no "
            "diffusion model in it), so it cannot be used in the graph; save it to disk instead"
        )
    return out[0], out[1], out[2]


def load_checkpoint(path: str) -> tuple:
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=embedding_dirs()
    )
    if out is None or out[0] is None:
        raise ModelMergerError(f"ComfyUI could not load the merged file {os.path.basename(path)}")
    return out[0], out[1], out[2]


def blocked(message: str):
    """An output that blocks the nodes using it with ``message`` (ComfyUI's ExecutionBlocker), or None."""
    try:
        from comfy_execution.graph_utils import ExecutionBlocker
    except Exception:
        try:
            from comfy_execution.graph import ExecutionBlocker
        except Exception:
            return None
    return ExecutionBlocker(message)


def file_signature(paths: Iterable[str]) -> list:
    """(path, size, mtime_ns) per file; a missing file gets None values (so IS_CHANGED changes when it appears)."""
    sig = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((os.path.abspath(p), None, None))
    return sig


# -------------------------------------------------------------------------------------------------------------------
# The loras folder (one answer for Add LoRA To Manifest, Merge Models' LoRA rows, Extract/Merge LoRAs)

LORA_KIND = "loras"  # ComfyUI's folder kind of LoRA files (LoraLoader's list)
NO_LORA = "(no LoRA in the loras folder)"  # the list's only entry while there is none (a combo is never empty)


def lora_names() -> List[str]:
    """The LoRA files ComfyUI lists (its ``loras`` folders), .safetensors only: other formats can run code."""
    try:
        return [n for n in folder_paths.get_filename_list(LORA_KIND) if n.lower().endswith(".safetensors")]
    except KeyError:  # a host without a loras folder kind
        return []


def lora_path(name: str) -> str:
    """The file of a LoRA name as LoraLoader shows it; refused unless it is a .safetensors file of the loras folders."""
    if name == NO_LORA:
        raise ManifestError("no LoRA chosen: put a .safetensors LoRA into ComfyUI's models/loras folder, then "
                            "refresh the page (R) and pick it")
    if not isinstance(name, str) or not name.lower().endswith(".safetensors"):
        raise ManifestError(f"LoRA {name!r} is not a .safetensors file (other formats can run code when loaded)")
    try:
        path = folder_paths.get_full_path(LORA_KIND, name)
    except KeyError:
        path = None
    if path is None:
        raise ManifestError(f"LoRA {name!r} is not in ComfyUI's loras folders")
    return os.path.abspath(path)
