"""ComfyUI V1 node classes: thin wrappers over merger_core. The only code that imports ComfyUI."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
