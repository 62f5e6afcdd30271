"""ComfyUI: the workflow files (API format) that render what sdlora rendered, and ComfyUI's built-in node list
(nodes.json, generated from ComfyUI's source by tools/comfyui_nodes.py) they are checked against."""
