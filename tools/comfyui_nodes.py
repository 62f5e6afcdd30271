"""Regenerate sdlora/comfyui/nodes.json: ComfyUI's built-in node classes, their input names and output counts, read
statically (with `ast`, nothing imported or copied) from ComfyUI checkouts' git directories.

    python tools/comfyui_nodes.py /work/.mirror/Comfy-Org+ComfyUI/repo \
        /work/.mirror/hiddenswitch+pip-and-uv-installable-ComfyUI/repo

Upstream ComfyUI keeps its nodes in nodes.py and comfy_extras/*.py; the pip-installable fork (which has the 2026
families: Z-Image, FLUX.2, Qwen-Image) in comfy/nodes/base_nodes.py and comfy_extras/nodes/*.py. Both kinds of node
are read: the classic ones (a NODE_CLASS_MAPPINGS entry, `INPUT_TYPES` returning {"required": {...}, "optional":
{...}}, `RETURN_TYPES`) and the V3 ones (`define_schema` returning `io.Schema(node_id=..., inputs=[...],
outputs=[...])`). A node whose inputs are not literals is listed with `"inputs": null` (unknown: any input passes).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sdlora" / "comfyui" / "nodes.json"
# Where each layout keeps its built-in nodes (API nodes, which call paid web services, are left out).
NODE_FILES = ("nodes.py", "comfy/nodes/base_nodes.py")
NODE_FOLDERS = ("comfy_extras/", "comfy_extras/nodes/")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def node_sources(repo: Path) -> dict[str, str]:
    names = git(repo, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    wanted = [
        name
        for name in names
        if name in NODE_FILES
        or any(name.startswith(f) and "/" not in name[len(f) :] and name.endswith(".py") for f in NODE_FOLDERS)
    ]
    return {name: git(repo, "show", f"HEAD:{name}") for name in wanted}


def returned(function: ast.FunctionDef) -> ast.expr | None:
    for node in ast.walk(function):
        if isinstance(node, ast.Return) and node.value is not None:
            return node.value
    return None


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def classic_inputs(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> tuple[list[str] | None, int | None]:
    """(input names, output count) of an INPUT_TYPES node, looking into a base class of the same file."""
    function, outputs = method(cls, "INPUT_TYPES"), None
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "RETURN_TYPES" for t in node.targets):
            outputs = len(node.value.elts) if isinstance(node.value, ast.Tuple) else None
    bases = [classes[b.id] for b in cls.bases if isinstance(b, ast.Name) and b.id in classes]
    if bases and (function is None or outputs is None):
        base_inputs, base_outputs = classic_inputs(bases[0], classes)
        outputs = outputs if outputs is not None else base_outputs
        if function is None:
            return base_inputs, outputs
    if function is None:
        return None, outputs
    value = returned(function)
    if not isinstance(value, ast.Dict):
        return None, outputs
    names: list[str] = []
    for key, group in zip(value.keys, value.values, strict=True):
        if not isinstance(key, ast.Constant) or key.value not in ("required", "optional"):
            continue
        if not isinstance(group, ast.Dict) or not all(isinstance(k, ast.Constant) for k in group.keys):
            return None, outputs
        names += [k.value for k in group.keys]  # type: ignore[union-attr]
    return names, outputs


def v3_node(cls: ast.ClassDef) -> tuple[str, list[str] | None, int | None] | None:
    """(node id, input names, output count) of a `define_schema` node, or None."""
    function = method(cls, "define_schema")
    call = returned(function) if function is not None else None
    if not isinstance(call, ast.Call):
        return None
    kwargs = {k.arg: k.value for k in call.keywords}
    node_id = kwargs.get("node_id")
    if not isinstance(node_id, ast.Constant):
        return None
    inputs: list[str] | None = []
    found = kwargs.get("inputs")
    if found is not None:
        if not isinstance(found, ast.List):
            inputs = None
        else:
            for item in found.elts:
                if isinstance(item, ast.Call) and item.args and isinstance(item.args[0], ast.Constant):
                    inputs.append(item.args[0].value)  # type: ignore[union-attr]
                else:
                    inputs = None
                    break
    outs = kwargs.get("outputs")
    outputs = len(outs.elts) if isinstance(outs, ast.List) else (0 if outs is None else None)
    return node_id.value, inputs, outputs


def nodes_of(source: str) -> dict[str, dict]:
    tree = ast.parse(source)
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    found: dict[str, dict] = {}
    for cls in classes.values():
        v3 = v3_node(cls)
        if v3 is not None:
            found[v3[0]] = {"inputs": v3[1], "outputs": v3[2]}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "NODE_CLASS_MAPPINGS" for t in node.targets):
            mapping = node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and getattr(node.func.value, "id", "") == "NODE_CLASS_MAPPINGS"
            and node.func.attr == "update"
            and node.args
        ):
            mapping = node.args[0]
        else:
            continue
        if not isinstance(mapping, ast.Dict):
            continue
        for key, value in zip(mapping.keys, mapping.values, strict=True):
            if isinstance(key, ast.Constant) and isinstance(value, ast.Name) and value.id in classes:
                inputs, outputs = classic_inputs(classes[value.id], classes)
                found[key.value] = {"inputs": inputs, "outputs": outputs}
    return found


def repo_name(repo: Path) -> str:
    """owner/name from the origin's URL, else from a mirror folder's name (owner+name/repo)."""
    try:
        url = git(repo, "config", "--get", "remote.origin.url").strip()
    except subprocess.CalledProcessError:
        return repo.parent.name.replace("+", "/") if "+" in repo.parent.name else repo.name
    return "/".join(url.removesuffix(".git").split("/")[-2:])


def main(repos: list[str]) -> None:
    nodes: dict[str, dict] = {}
    sources = []
    for repo in map(Path, repos):
        commit, date = git(repo, "log", "-1", "--format=%H %cI").split()
        sources.append({"repo": repo_name(repo), "commit": commit, "date": date})
        for _, source in sorted(node_sources(repo).items()):
            for node_id, node in nodes_of(source).items():
                entry = nodes.setdefault(node_id, {"inputs": node["inputs"], "outputs": node["outputs"], "in": []})
                if entry["inputs"] is not None and node["inputs"] is not None:
                    entry["inputs"] = sorted(set(entry["inputs"]) | set(node["inputs"]))
                elif node["inputs"] is None:
                    entry["inputs"] = None
                entry["in"] = sorted(set(entry["in"]) | {sources[-1]["repo"]})
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(nodes[k], sort_keys=True)}" for k in sorted(nodes))
    header = json.dumps({"generated_by": "tools/comfyui_nodes.py", "sources": sources}, indent=2)[:-2]
    OUT.write_text(f'{header},\n "nodes": {{\n{lines}\n }}\n}}\n', encoding="utf-8")
    print(f"{OUT}: {len(nodes)} nodes from {', '.join(s['repo'] + '@' + s['commit'][:10] for s in sources)}")


if __name__ == "__main__":
    main(sys.argv[1:])
