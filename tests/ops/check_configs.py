"""Structural checks of the shipped deployment configs, beyond what their own tools
validate: the settings that must agree across files do agree.

Run by the `ops::` tests (crates/server/tests/e2e/ops.rs) with the Python of
target/ops-venv (which scripts/test creates; PyYAML comes with kubernetes-validate).
Prints one line per problem and exits 1 if there is any.
"""

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
problems = []


def problem(text):
    problems.append(text)


def load_all(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def duration_seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", text.strip())
    if not match:
        problem(f"cannot read the duration {text!r}")
        return 0
    number, unit = int(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# Every variable the README documents: the shipped files may use no other.
readme = (ROOT / "README.md").read_text()
known = set(re.findall(r"`(WS_[A-Z0-9_]+)`", readme))
if len(known) < 40:
    problem(f"found only {len(known)} WS_ variables in the README's table")


def check_variables(where, names):
    for name in names:
        if name.startswith("WS_") and name not in known:
            problem(f"{where}: {name} is not a Chorus setting (README table)")


# --- Kubernetes -------------------------------------------------------------------
k8s = ROOT / "deploy" / "kubernetes"
docs = {}
for path in sorted(k8s.glob("*.yaml")):
    for doc in load_all(path):
        if "metadata" in doc:
            docs[(doc["kind"], doc["metadata"]["name"])] = (path.name, doc)

kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
for resource in kustomization["resources"]:
    if not (k8s / resource).exists():
        problem(f"kustomization.yaml lists {resource}, which does not exist")

config = docs[("ConfigMap", "chorus")][1]["data"]
secret = docs[("Secret", "chorus")][1].get("stringData", {})
check_variables("configmap.yaml", config)
check_variables("secret.yaml", secret)
if "WS_TRUSTED_PROXIES" not in config:
    problem("configmap.yaml: WS_TRUSTED_PROXIES must name the ingress's addresses")

_, deployment = docs[("Deployment", "chorus")]
pod = deployment["spec"]["template"]["spec"]
(container,) = [c for c in pod["containers"] if c["name"] == "chorus"]
if pod.get("enableServiceLinks") is not False:
    problem("deployment.yaml: enableServiceLinks must be false (service links would collide with WS_ names)")
if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
    problem("deployment.yaml: the readiness probe must ask /ready")
if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
    problem("deployment.yaml: the liveness probe must ask /health")
pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
if not pre_stop:
    problem("deployment.yaml: a preStop sleep lets endpoints update before the drain")
grace = duration_seconds(config.get("WS_SHUTDOWN_GRACE", "10s"))
final_flush = 5
termination = pod.get("terminationGracePeriodSeconds", 30)
if termination < (pre_stop or 0) + grace + final_flush:
    problem(
        f"deployment.yaml: terminationGracePeriodSeconds {termination} is shorter than preStop "
        f"{pre_stop} + WS_SHUTDOWN_GRACE {grace} + the final flush {final_flush}"
    )
resources = container.get("resources", {})
if not resources.get("requests") or not resources.get("limits", {}).get("memory"):
    problem("deployment.yaml: resources need requests and a memory limit")
node_id = [e for e in container.get("env", []) if e["name"] == "WS_NODE_ID"]
if not node_id or node_id[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
    problem("deployment.yaml: WS_NODE_ID must come from the pod name (each replica its own)")
sources = {next(iter(s.values()))["name"] for s in container.get("envFrom", [])}
if sources != {"chorus"}:
    problem(f"deployment.yaml: envFrom must take the chorus ConfigMap and Secret, not {sources}")
labels = deployment["spec"]["selector"]["matchLabels"]
for kind in ("PodDisruptionBudget",):
    _, doc = docs[(kind, "chorus")]
    if doc["spec"]["selector"]["matchLabels"] != labels:
        problem(f"{kind} selects other pods than the Deployment")
for name in ("chorus", "chorus-headless"):
    _, service = docs[("Service", name)]
    if service["spec"]["selector"] != labels:
        problem(f"Service {name} selects other pods than the Deployment")
if docs[("Service", "chorus-headless")][1]["spec"].get("clusterIP") != "None":
    problem("chorus-headless must be headless: Prometheus finds every replica through it")
hpa = docs[("HorizontalPodAutoscaler", "chorus")][1]["spec"]
if hpa["scaleTargetRef"]["name"] != "chorus" or hpa["minReplicas"] < 2:
    problem("hpa.yaml must scale the chorus Deployment, from at least 2 replicas")
backbone_urls = {"redis": config.get("WS_REDIS_URL", ""), "nats": config.get("WS_NATS_URL", "")}
for kind, service in (("redis", "redis"), ("nats", "nats")):
    if ("Service", service) in docs and f"//{service}:" not in backbone_urls[kind]:
        problem(f"configmap.yaml: WS_{kind.upper()}_URL does not point at the {service} Service")

# --- Prometheus and Grafana -----------------------------------------------------------
for name in ("prometheus.yml", "prometheus-compose.yml"):
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / name).read_text())
    jobs = [job["job_name"] for job in prometheus["scrape_configs"]]
    if jobs != ["chorus"]:
        problem(f"{name}: the alerts and the dashboard expect one job named chorus, not {jobs}")
    names = prometheus["scrape_configs"][0].get("dns_sd_configs", [{}])[0].get("names", [])
    if name == "prometheus.yml" and not any("chorus-headless" in n for n in names):
        problem("prometheus.yml must find the replicas through the chorus-headless Service")
alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
operations = (ROOT / "claudedocs" / "OPERATIONS.md").read_text().lower()
for rule in alerts["groups"][0]["rules"]:
    anchor = rule["alert"].lower()
    if f"### {anchor}" not in operations:
        problem(f"alert {rule['alert']} has no section in OPERATIONS.md")
dashboard = json.loads((ROOT / "deploy" / "grafana" / "chorus-dashboard.json").read_text())
if not dashboard.get("panels"):
    problem("the Grafana dashboard has no panels")

# --- Docker ---------------------------------------------------------------------------
dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
for needle in ("HEALTHCHECK", "STOPSIGNAL SIGTERM", "USER nonroot", "AS build"):
    if needle not in dockerfile:
        problem(f"docker/Dockerfile lacks {needle}")
template = (ROOT / "nginx" / "templates" / "chorus.conf.template").read_text()
template_vars = set(re.findall(r"\$\{([A-Z_]+)\}", template))
for name in ("docker-compose.yml", "docker-compose.scale.yml"):
    compose = yaml.safe_load((ROOT / "docker" / name).read_text())
    services = compose["services"]
    chorus = services["chorus"]
    environment = chorus.get("environment", {})
    check_variables(name, environment)
    grace = duration_seconds(environment.get("WS_SHUTDOWN_GRACE", "10s"))
    stop = duration_seconds(chorus.get("stop_grace_period", "10s"))
    if stop < grace + final_flush:
        problem(f"{name}: stop_grace_period {stop} s is shorter than WS_SHUTDOWN_GRACE + the final flush")
    if name == "docker-compose.scale.yml":
        for service in ("redis", "nats", "nginx"):
            if service not in services:
                problem(f"{name} lacks the {service} service")
        if "ports" in chorus:
            problem(f"{name}: replicas publish no port, or --scale would collide; nginx is the entry")
        subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
        if environment.get("WS_TRUSTED_PROXIES") != subnet:
            problem(f"{name}: WS_TRUSTED_PROXIES must be the network nginx is on ({subnet})")
        nginx_env = services["nginx"]["environment"]
        missing = template_vars - set(nginx_env)
        if missing:
            problem(f"{name}: nginx's environment lacks the template's {sorted(missing)}")

cluster = (ROOT / "scripts" / "cluster").read_text()
for var in template_vars:
    if "${" + var + "}" not in cluster:
        problem(f"scripts/cluster does not render ${{{var}}} of the nginx template")

for line in problems:
    print(line)
sys.exit(1 if problems else 0)
