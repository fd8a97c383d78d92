#!/usr/bin/env python3
"""Writes the software bill of materials of the rollcall binary as CycloneDX 1.5 JSON.

Only what is built into the binary counts: the crates reached from rollcall through normal
dependencies (not dev-dependencies) on this platform, as `cargo metadata` resolves them.

    packaging/sbom.py [OUT.json]     (default: standard output)
"""
import json
import subprocess
import sys
import uuid
from datetime import datetime, timezone

target = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
host = next(l.split(": ", 1)[1] for l in target.splitlines() if l.startswith("host: "))
meta = json.loads(subprocess.run(
    ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host],
    capture_output=True, text=True, check=True).stdout)

packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = meta["resolve"]["root"]

# Walk normal and build dependencies from the root (build scripts' crates are built into
# the build, not the binary, but they shape it; dev-dependencies are left out).
seen, todo = set(), [root]
while todo:
    node = nodes[todo.pop()]
    for dep in node["deps"]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if kinds & {None, "build"} and dep["pkg"] not in seen:
            seen.add(dep["pkg"])
            todo.append(dep["pkg"])

def component(p):
    c = {
        "type": "library",
        "bom-ref": p["id"],
        "name": p["name"],
        "version": p["version"],
        "purl": f"pkg:cargo/{p['name']}@{p['version']}",
    }
    if p.get("license"):
        c["licenses"] = [{"expression": p["license"]}]
    if p.get("repository"):
        c["externalReferences"] = [{"type": "vcs", "url": p["repository"]}]
    return c

me = packages[root]
bom = {
    "bomFormat": "CycloneDX",
    "specVersion": "1.5",
    "serialNumber": f"urn:uuid:{uuid.uuid4()}",
    "version": 1,
    "metadata": {
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "component": {"type": "application", "bom-ref": root, "name": me["name"],
                      "version": me["version"], "purl": f"pkg:cargo/{me['name']}@{me['version']}"},
    },
    "components": sorted((component(packages[i]) for i in seen), key=lambda c: (c["name"], c["version"])),
    "dependencies": [
        {"ref": i, "dependsOn": sorted(d["pkg"] for d in nodes[i]["deps"] if d["pkg"] in seen)}
        for i in sorted(seen | {root})
    ],
}
text = json.dumps(bom, indent=2)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        f.write(text + "\n")
else:
    print(text)
