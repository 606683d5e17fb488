"""Offline lint of docker-compose.yml (there is no Docker engine or compose
plugin here): the file parses, every service has a pinned image or a build
with a Dockerfile, every bind-mounted file exists, depends_on names real
services, named volumes are declared. Exit 1 with the problems found."""

import os
import sys

import yaml

path = sys.argv[1]
root = os.path.dirname(os.path.abspath(path))
doc = yaml.safe_load(open(path))
problems = []
services = doc.get("services") or {}
volumes = set((doc.get("volumes") or {}).keys())
if not services:
    problems.append("no services")
for name, svc in services.items():
    image, build = svc.get("image"), svc.get("build")
    if build:
        ctx = build if isinstance(build, str) else build.get("context", ".")
        if not os.path.isfile(os.path.join(root, ctx, "Dockerfile")):
            problems.append(f"{name}: build context {ctx} has no Dockerfile")
    elif not image or ":" not in image or image.endswith(":latest"):
        problems.append(f"{name}: image {image!r} is not pinned to a version")
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith((".", "/")):
            if not os.path.exists(os.path.join(root, src)):
                problems.append(f"{name}: mounted path {src} does not exist")
        elif src not in volumes:
            problems.append(f"{name}: volume {src} is not declared")
    for dep in svc.get("depends_on", []):
        if dep not in services:
            problems.append(f"{name}: depends_on unknown service {dep}")
for p in problems:
    print(f"{path}: {p}")
print(f"{path}: {len(services)} services, {len(problems)} problems")
sys.exit(1 if problems else 0)
