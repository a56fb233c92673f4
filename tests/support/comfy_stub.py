"""A small stand-in for the ComfyUI services the nodes call, for tests that run without ComfyUI.

It installs fake ``folder_paths``, ``comfy.utils``, ``comfy.model_management``, ``comfy.sd``,
``comfy_execution.graph_utils`` and ``server`` modules into ``sys.modules`` and records what the nodes do with
them (progress updates, progress texts, sync events, model unloads, the state dict handed to ComfyUI), so the
tests can check behaviour, not just that a call happened. It imitates the real semantics that matter here:
``ProgressBar.update_absolute`` raises ``InterruptProcessingException`` once an interrupt is requested, and
``throw_exception_if_processing_interrupted`` clears the flag when it raises, like ComfyUI v0.3.64.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Dict, List, Tuple

MODULES = ["folder_paths", "comfy", "comfy.utils", "comfy.model_management", "comfy.sd", "comfy_execution",
           "comfy_execution.graph_utils", "server"]
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_MODULE = "model_merger_pack_under_test"


class Host:
    """What the fake host recorded, plus knobs the tests turn."""

    def __init__(self, base: str):
        self.base = base
        self.progress: List[Tuple[int, int, object]] = []  # (value, total, node_id)
        self.texts: List[Tuple[str, str]] = []  # (node_id, text)
        self.events: List[Tuple[str, dict]] = []
        self.unloads = 0
        self.loaded_state_dicts: List[Dict[str, object]] = []
        self.interrupt = False
        self.interrupt_after_updates = None  # request an interrupt after this many progress updates
        self.free_memory = 1 << 40
        self.routes: Dict[str, object] = {}
        self.detect_result = True  # False: load_state_dict_guess_config returns None (model not recognised)


def install(base: str) -> Tuple[Host, types.ModuleType]:
    """Install the fake host with ComfyUI-like folders under ``base``; return (host, pack module)."""
    uninstall()
    host = Host(base)
    models = os.path.join(base, "models")
    output = os.path.join(base, "output")
    user = os.path.join(base, "user")
    for d in (os.path.join(models, "checkpoints"), os.path.join(models, "loras"), output, user):
        os.makedirs(d, exist_ok=True)

    # folder_paths --------------------------------------------------------------------------------------------
    fp = types.ModuleType("folder_paths")
    exts = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".sft"}
    fp.supported_pt_extensions = exts
    fp.models_dir = models
    fp.folder_names_and_paths = {
        "checkpoints": ([os.path.join(models, "checkpoints"), os.path.join(output, "checkpoints")], exts),
        "loras": ([os.path.join(models, "loras")], exts),
        "embeddings": ([os.path.join(models, "embeddings")], exts),
        "custom_nodes": ([os.path.join(base, "custom_nodes")], set()),
    }

    def get_folder_paths(kind):
        return list(fp.folder_names_and_paths[kind][0])

    def get_filename_list(kind):
        paths, kexts = fp.folder_names_and_paths[kind]
        out = set()
        for p in paths:
            if not os.path.isdir(p):
                continue
            for dirpath, _dirs, files in os.walk(p, followlinks=True):
                for f in files:
                    if not kexts or os.path.splitext(f)[1].lower() in kexts:
                        out.add(os.path.relpath(os.path.join(dirpath, f), p).replace(os.sep, "/"))
        return sorted(out)

    def get_full_path(kind, name):
        for p in fp.folder_names_and_paths[kind][0]:
            full = os.path.join(p, name)
            if os.path.isfile(full):
                return full
        return None

    def get_full_path_or_raise(kind, name):
        full = get_full_path(kind, name)
        if full is None:
            raise FileNotFoundError(f"Model in folder '{kind}' with filename '{name}' not found.")
        return full

    def add_model_folder_path(kind, path, is_default=False):
        if kind in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[kind][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[kind] = ([path], set())

    def get_save_image_path(prefix, output_dir, w=0, h=0):
        subfolder = os.path.dirname(os.path.normpath(prefix))
        filename = os.path.basename(os.path.normpath(prefix))
        full = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full))) != output_dir:
            raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
        os.makedirs(full, exist_ok=True)
        counter = 1
        for f in os.listdir(full):
            if f.startswith(filename + "_"):
                try:
                    counter = max(counter, int(f[len(filename) + 1 :].split("_")[0]) + 1)
                except ValueError:
                    pass
        return full, filename, counter, subfolder, prefix

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    fp.add_model_folder_path = add_model_folder_path
    fp.get_save_image_path = get_save_image_path
    fp.get_output_directory = lambda: output
    fp.get_user_directory = lambda: user
    fp.get_temp_directory = lambda: os.path.join(base, "temp")

    # comfy.model_management -----------------------------------------------------------------------------------
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        if host.interrupt:
            host.interrupt = False
            raise InterruptProcessingException()

    def unload_all_models():
        host.unloads += 1

    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.processing_interrupted = lambda: host.interrupt
    mm.unload_all_models = unload_all_models
    mm.soft_empty_cache = lambda force=False: None
    mm.get_torch_device = lambda: "cpu"
    mm.get_free_memory = lambda dev=None, torch_free_too=False: host.free_memory

    # comfy.utils ------------------------------------------------------------------------------------------------
    cu = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total
            self.current = 0
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            host.progress.append((self.current, self.total, self.node_id))
            if host.interrupt_after_updates is not None and len(host.progress) >= host.interrupt_after_updates:
                host.interrupt = True
            throw_exception_if_processing_interrupted()  # what the real hook does

        def update(self, value):
            self.update_absolute(self.current + value)

    cu.ProgressBar = ProgressBar

    # comfy.sd ---------------------------------------------------------------------------------------------------
    sd = types.ModuleType("comfy.sd")

    class Loaded:
        def __init__(self, kind, keys):
            self.kind = kind
            self.keys = keys

    def load_state_dict_guess_config(state_dict, output_vae=True, output_clip=True, embedding_directory=None, **kw):
        if not host.detect_result:
            return None
        host.loaded_state_dicts.append(dict(state_dict))
        keys = sorted(state_dict)
        state_dict.clear()  # ComfyUI pops the keys it uses
        return Loaded("MODEL", keys), Loaded("CLIP", keys), Loaded("VAE", keys), None

    def load_checkpoint_guess_config(path, output_vae=True, output_clip=True, embedding_directory=None, **kw):
        from safetensors.torch import load_file

        return load_state_dict_guess_config(load_file(path), output_vae, output_clip, embedding_directory)

    sd.load_state_dict_guess_config = load_state_dict_guess_config
    sd.load_checkpoint_guess_config = load_checkpoint_guess_config
    comfy.utils, comfy.model_management, comfy.sd = cu, mm, sd

    # comfy_execution.graph_utils ------------------------------------------------------------------------------
    ce = types.ModuleType("comfy_execution")
    ce.__path__ = []
    gu = types.ModuleType("comfy_execution.graph_utils")

    class ExecutionBlocker:
        def __init__(self, message):
            self.message = message

    gu.ExecutionBlocker = ExecutionBlocker
    ce.graph_utils = gu

    # server -------------------------------------------------------------------------------------------------------
    srv = types.ModuleType("server")

    class Routes:
        def _add(self, method, path):
            def deco(fn):
                host.routes[f"{method} {path}"] = fn
                return fn

            return deco

        def get(self, path):
            return self._add("GET", path)

        def post(self, path):
            return self._add("POST", path)

    class PromptServer:
        instance = None

        def __init__(self):
            self.routes = Routes()
            self.client_id = None

        def send_sync(self, event, data, sid=None):
            host.events.append((event, data))

        def send_progress_text(self, text, node_id, sid=None):
            host.texts.append((str(node_id), text))

    PromptServer.instance = PromptServer()
    srv.PromptServer = PromptServer

    for name, mod in [("folder_paths", fp), ("comfy", comfy), ("comfy.utils", cu), ("comfy.model_management", mm),
                      ("comfy.sd", sd), ("comfy_execution", ce), ("comfy_execution.graph_utils", gu), ("server", srv)]:
        sys.modules[name] = mod
    return host, import_pack()


def import_pack() -> types.ModuleType:
    """Import the repository root as a package the way ComfyUI does (by path; the folder name is not importable)."""
    for name in list(sys.modules):
        if name == PACK_MODULE or name.startswith(PACK_MODULE + "."):
            del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, os.path.join(PACK_ROOT, "__init__.py"), submodule_search_locations=[PACK_ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def uninstall() -> None:
    for name in MODULES + [n for n in sys.modules if n == PACK_MODULE or n.startswith(PACK_MODULE + ".")]:
        sys.modules.pop(name, None)
