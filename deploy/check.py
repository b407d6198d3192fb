#!/usr/bin/env python3
"""Checks the Kubernetes manifests offline.

Renders each overlay under deploy/k8s/overlays with `kubectl kustomize` (or, without kubectl,
takes the base files as they are), validates every object against the Kubernetes schemas with
`kubernetes-validate --strict` (no cluster needed), then checks the project's own rules: pods
run as non-root with a read-only root filesystem and no privilege escalation, every moe
workload has startup, readiness and liveness probes, resource requests and a
PodDisruptionBudget, and the workers' grace period covers their drain.

    pip install kubernetes-validate
    python3 deploy/check.py [K8S_DIR]

Exit status: 0 all good, 1 a check failed, 3 a tool is missing (kubernetes-validate).
"""
import os
import shutil
import subprocess
import sys
import tempfile

import yaml

# Deregistration (up to 3 s) + the server's drain grace (5 s) + the preStop pause.
WORKER_DRAIN_SECONDS = 3 + 5


def render(k8s_dir):
    """(name, YAML text) for each overlay, or for the base files without kubectl."""
    overlays = os.path.join(k8s_dir, "overlays")
    if shutil.which("kubectl"):
        out = []
        for name in sorted(os.listdir(overlays)):
            r = subprocess.run(["kubectl", "kustomize", os.path.join(overlays, name)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"FAIL overlay {name}: kustomize: {r.stderr.strip()}")
                sys.exit(1)
            out.append((f"overlay {name}", r.stdout))
        return out
    print("note: kubectl not found; checking the base files without rendering the overlays")
    base = os.path.join(k8s_dir, "base")
    docs = []
    for f in sorted(os.listdir(base)):
        if f.endswith(".yaml") and f != "kustomization.yaml":
            docs.append(open(os.path.join(base, f)).read())
    return [("base", "\n---\n".join(docs))]


def policy(name, objects):
    errors = []
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    pdb_selectors = [p["spec"]["selector"]["matchLabels"] for p in by_kind.get("PodDisruptionBudget", [])]
    for o in by_kind.get("Deployment", []) + by_kind.get("StatefulSet", []):
        wname = f'{o["kind"]}/{o["metadata"]["name"]}'
        pod = o["spec"]["template"]["spec"]
        labels = o["spec"]["template"]["metadata"].get("labels", {})
        if not any(all(labels.get(k) == v for k, v in sel.items()) for sel in pdb_selectors):
            errors.append(f"{wname}: no PodDisruptionBudget selects it")
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            errors.append(f"{wname}: pod securityContext.runAsNonRoot is not true")
        for c in pod["containers"]:
            cname = f'{wname} container {c["name"]}'
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                errors.append(f"{cname}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation", True):
                errors.append(f"{cname}: allowPrivilegeEscalation is not false")
            if not c.get("resources", {}).get("requests"):
                errors.append(f"{cname}: no resource requests")
            is_moe = "moe" in c.get("image", "")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe") if is_moe else ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    errors.append(f"{cname}: no {probe}")
        if o["metadata"]["name"] == "moe-worker":
            pre_stop = max((c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                            for c in pod["containers"]), default=0)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace < WORKER_DRAIN_SECONDS + pre_stop:
                errors.append(f"{wname}: terminationGracePeriodSeconds {grace} is shorter than the drain "
                              f"({WORKER_DRAIN_SECONDS} s + preStop {pre_stop} s)")
    return [f"FAIL {name}: {e}" for e in errors]


def validator():
    """The kubernetes-validate command: the module of this Python, else the script on PATH."""
    try:
        import kubernetes_validate  # noqa: F401
        return [sys.executable, "-m", "kubernetes_validate"]
    except ImportError:
        path = shutil.which("kubernetes-validate")
        return [path] if path else None


def main():
    k8s_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "k8s")
    validate = validator()
    if not validate:
        print("kubernetes-validate is not installed (pip install kubernetes-validate)")
        sys.exit(3)
    failures = []
    for name, text in render(k8s_dir):
        objects = [o for o in yaml.safe_load_all(text) if o]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
            path = f.name
        r = subprocess.run(validate + ["--strict", "--quiet", path], capture_output=True, text=True)
        os.unlink(path)
        if r.returncode != 0:
            failures.append(f"FAIL {name}: schema validation:\n{r.stdout}{r.stderr}")
        failures += policy(name, objects)
        print(f"{name}: {len(objects)} objects checked")
    for f in failures:
        print(f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
