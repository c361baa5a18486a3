"""Offline validation of the Helm chart helm/kerwen (run through helm/tests/run).

Renders the chart with real Helm (helm-python-sdk bundles Helm's Go SDK), lints it, validates
every rendered Kubernetes object with kubernetes-validate --strict, checks the CRD objects
(ServiceMonitor, PrometheusRule, Certificate) against the structural schemas below, and asserts
the invariants a Raft cluster depends on. No cluster, no network.

KERWEN_CHART_DIR overrides the chart directory (to try a modified copy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

HERE = Path(__file__).resolve().parent
CHART = Path(os.environ.get("KERWEN_CHART_DIR", HERE.parent / "kerwen"))
VALUES = HERE / "values"
GOOD = sorted(p.name for p in VALUES.glob("*.yaml"))
BAD = sorted(p.name for p in (VALUES / "bad").glob("*.yaml"))
RELEASE = "kerwen"
NAMESPACE = "brokers"
# The chart's minimum and the version the project pins for validation.
KUBE_VERSIONS = ["1.28.0", "1.30.0"]
HELM_SDK = "v4.2.3"

# What the node exports (its /metrics contract). Histograms also appear as _bucket/_sum/_count.
METRICS = {
    "kerwen_publish_messages_total", "kerwen_publish_bytes_total",
    "kerwen_delivered_messages_total", "kerwen_acked_messages_total",
    "kerwen_delivered_bytes_total", "kerwen_acked_bytes_total",
    "kerwen_exchanges_total", "kerwen_opmon_records_dropped_total",
    "kerwen_consumer_lag_messages", "kerwen_leases_in_flight", "kerwen_dead_letters",
    "kerwen_raft_term", "kerwen_raft_is_leader", "kerwen_raft_leader_changes_total",
    "kerwen_raft_has_leader", "kerwen_raft_commit_lag_entries", "kerwen_raft_apply_lag_entries",
    "kerwen_raft_log_entries", "kerwen_raft_snapshots_total", "kerwen_raft_replicas_under_quorum",
    "kerwen_shard_moves_in_progress", "kerwen_storage_fsyncs_total", "kerwen_storage_disk_bytes",
    "kerwen_storage_disk_free_bytes", "kerwen_storage_disk_capacity_bytes",
    "kerwen_rocksdb_stalls_total", "kerwen_evidence_batches_total", "kerwen_evidence_bytes",
    "kerwen_evidence_budget_bytes", "kerwen_tls_handshake_failures_total",
    "kerwen_tls_certificate_expiry_timestamp_seconds", "kerwen_quota_rejections_total",
}
HISTOGRAMS = {
    "kerwen_publish_duration_seconds", "kerwen_end_to_end_seconds",
    "kerwen_storage_entries_per_fsync", "kerwen_storage_fsync_duration_seconds",
    "kerwen_evidence_messages_per_signature",
}
# `up` is the series Prometheus records itself for every scrape target (alerts only).
PROMETHEUS_SYNTHETIC = {"up"}
REQUIRED_ALERTS = {
    "KerwenGroupWithoutLeader", "KerwenReplicasUnderQuorum", "KerwenDeadLettersGrowing",
    "KerwenDiskNearlyFull", "KerwenCertificateExpiresSoon", "KerwenEvidenceBudgetNearlyFull",
    "KerwenNodeDown",
}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}


# ---------------------------------------------------------------- rendering


def load_values(name: str, bad: bool = False) -> dict:
    path = VALUES / "bad" / name if bad else VALUES / name
    return yaml.safe_load(path.read_text()) or {}


_chart = None


def chart() -> helm.Chart:
    global _chart
    if _chart is None:
        _chart = helm.Chart.load(str(CHART))
    return _chart


def render_raw(values: dict) -> dict[str, str]:
    return chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


class Rendered:
    def __init__(self, values: dict):
        self.input = values
        self.values = chart().merge_values(values)
        self.files = render_raw(values)
        self.notes = next((v for k, v in self.files.items() if k.endswith("NOTES.txt")), "")
        self.objects: list[dict] = []
        for name, text in self.files.items():
            if name.endswith(".txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    doc.setdefault("__source__", name)
                    self.objects.append(doc)

    def of(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def fullname(self) -> str:
        return self.sts["metadata"]["name"]

    @property
    def sts(self) -> dict:
        return self.one("StatefulSet")

    @property
    def pod(self) -> dict:
        return self.sts["spec"]["template"]

    @property
    def container(self) -> dict:
        cs = [c for c in self.pod["spec"]["containers"] if c["name"] == "kerwen"]
        assert len(cs) == 1, "one container named kerwen"
        return cs[0]

    def env(self) -> dict[str, dict]:
        return {e["name"]: e for e in self.container["env"]}


_cache: dict[str, Rendered] = {}


def rendered(name: str) -> Rendered:
    if name not in _cache:
        _cache[name] = Rendered(load_values(name))
    return _cache[name]


def clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__source__"}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- PromQL


PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
}


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression reads (a small PromQL tokenizer: enough for our queries)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    e = re.sub(r"'(?:\\.|[^'\\])*'", "''", e)
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def unknown_metrics(exprs: list[str], allowed: set[str]) -> dict[str, set[str]]:
    bad = {}
    for expr in exprs:
        names = {base_metric(n) for n in promql_metrics(expr)}
        extra = names - allowed
        if extra:
            bad[expr] = extra
    return bad


def test_promql_tokenizer():
    assert promql_metrics(
        'histogram_quantile(0.99, sum by (le) (rate(kerwen_publish_duration_seconds_bucket'
        '{namespace="$namespace",job=~"a|b"}[$__rate_interval])))'
    ) == {"kerwen_publish_duration_seconds_bucket"}
    assert promql_metrics('count(up{job="x"} == 1) < 3 or absent(up{job="x"} == 1)') == {"up"}
    assert promql_metrics("a / (b > 0) > 0.8 and on (pod) c offset 5m") == {"a", "b", "c"}
    assert unknown_metrics(["rate(kerwen_nope_total[5m])"], METRICS) == {
        "rate(kerwen_nope_total[5m])": {"kerwen_nope_total"}
    }


# ---------------------------------------------------------------- Helm itself


def test_bundled_helm_version():
    assert helm.helm_sdk_version() == HELM_SDK


def test_chart_metadata():
    meta = chart().metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "kerwen"
    # The node's ordinal comes from the pod-index label: Kubernetes 1.28+.
    assert meta.get("kubeVersion") == ">=1.28.0-0"


@pytest.mark.parametrize("values", GOOD)
def test_lint(values):
    report = helm.lint(str(CHART), load_values(values), strict=True, namespace=NAMESPACE,
                       kube_version="v" + KUBE_VERSIONS[0])
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", GOOD)
def test_kubernetes_schema_strict(values, kube):
    r = rendered(values)
    checked = 0
    for obj in r.objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(clean(obj), kube, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({obj['__source__']}) "
                        f"invalid for Kubernetes {kube}: {e.message} at {list(e.absolute_path)}")
        checked += 1
    assert checked >= 5


def test_kubernetes_schema_catches_a_misspelt_field():
    sts = clean(rendered("default.yaml").sts)
    sts = json.loads(json.dumps(sts))
    sts["spec"]["podManagmentPolicy"] = sts["spec"].pop("podManagementPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBE_VERSIONS[-1], strict=True)


DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d|w|y))+$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
META = {
    "type": "object", "required": ["name", "namespace", "labels"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                            "maxLength": 253},
                   "namespace": {"type": "string"}, "labels": LABELS,
                   "annotations": LABELS},
    "additionalProperties": False,
}


def crd(api_version: str, kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                           "metadata": META, "spec": spec}}


# Structural subsets of the CRDs' OpenAPI schemas (monitoring.coreos.com/v1, cert-manager.io/v1)
# for the fields the chart writes: anything else is a typo.
CRD_SCHEMAS = {
    "ServiceMonitor": crd("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {
            "jobLabel": {"type": "string"},
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "selector": {"type": "object", "additionalProperties": False, "properties": {
                "matchLabels": LABELS, "matchExpressions": {"type": "array"}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "scheme": {"enum": ["http", "https"]},
                               "interval": DURATION, "scrapeTimeout": DURATION,
                               "honorLabels": {"type": "boolean"},
                               "relabelings": {"type": "array"},
                               "metricRelabelings": {"type": "array"}}}},
        }}),
    "PrometheusRule": crd("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1}, "interval": DURATION,
                           "rules": {"type": "array", "minItems": 1, "items": {
                               "type": "object", "required": ["alert", "expr"],
                               "additionalProperties": False,
                               "properties": {"alert": {"type": "string",
                                                        "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                              "expr": {"type": "string", "minLength": 1},
                                              "for": DURATION, "keep_firing_for": DURATION,
                                              "labels": LABELS, "annotations": LABELS}}}}}}}}),
    "Certificate": crd("cert-manager.io/v1", "Certificate", {
        "type": "object", "required": ["secretName", "issuerRef"], "additionalProperties": False,
        "properties": {
            "secretName": {"type": "string", "minLength": 1},
            "commonName": {"type": "string", "maxLength": 64},
            "duration": DURATION, "renewBefore": DURATION,
            "dnsNames": {"type": "array", "items": {"type": "string"}},
            "uris": {"type": "array", "items": {"type": "string"}},
            "ipAddresses": {"type": "array", "items": {"type": "string"}},
            "usages": {"type": "array", "items": {"enum": [
                "signing", "digital signature", "content commitment", "key encipherment",
                "key agreement", "data encipherment", "cert sign", "crl sign",
                "encipher only", "decipher only", "any", "server auth", "client auth",
                "code signing", "email protection", "s/mime", "ipsec end system",
                "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
                "microsoft sgc", "netscape sgc"]}},
            "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                "size": {"type": "integer"}, "encoding": {"enum": ["PKCS1", "PKCS8"]},
                "rotationPolicy": {"enum": ["Never", "Always"]}}},
            "issuerRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                          "properties": {"name": {"type": "string", "minLength": 1},
                                         "kind": {"type": "string"},
                                         "group": {"type": "string"}}},
        }}),
}


@pytest.mark.parametrize("values", GOOD)
def test_crd_objects_structurally(values):
    for obj in rendered(values).objects:
        if obj["kind"] in CRD_KINDS:
            try:
                jsonschema.Draft202012Validator(CRD_SCHEMAS[obj["kind"]]).validate(clean(obj))
            except jsonschema.ValidationError as e:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at "
                            f"{list(e.absolute_path)}")


@pytest.mark.parametrize("values", BAD)
def test_values_schema_rejects(values):
    with pytest.raises(helm.HelmValuesError):
        render_raw(load_values(values, bad=True))


def test_values_schema_is_strict_at_top_level():
    schema = chart().schema
    assert schema["additionalProperties"] is False
    assert schema["properties"]["replicas"]["minimum"] == 1
    assert {"replicas", "image", "tls", "ports"} <= set(schema["required"])


@pytest.mark.parametrize("values,message", [
    ("both-tls.yaml", "not both"), ("no-tls.yaml", "TLS is required"),
    ("cert-manager-no-issuer.yaml", "needs tls.certManager.issuerRef.name")])
def test_tls_sources_refused_by_the_template_too(values, message, tmp_path):
    # The schema refuses these first; without the schema the templates must refuse them too.
    copy = tmp_path / "kerwen"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with helm.Chart.load(str(copy)) as unchecked:
        with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
            unchecked.render(values=load_values(values, bad=True), name=RELEASE,
                             namespace=NAMESPACE)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("values", GOOD)
def test_headless_peer_service(values):
    r = rendered(values)
    svc = r.one("Service", f"{r.fullname}-peers")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"] for p in svc["spec"]["ports"]} >= {"peer", "client"}
    assert r.sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert selects(svc["spec"]["selector"], r.pod["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in r.container["ports"]}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]


@pytest.mark.parametrize("values", GOOD)
def test_client_service(values):
    r = rendered(values)
    svc = r.one("Service", r.fullname)
    assert svc["spec"].get("clusterIP") != "None"
    assert [p["name"] for p in svc["spec"]["ports"]] == ["client"]
    assert selects(svc["spec"]["selector"], r.pod["metadata"]["labels"])


@pytest.mark.parametrize("values", GOOD)
def test_statefulset_shape(values):
    r = rendered(values)
    spec = r.sts["spec"]
    assert spec["replicas"] == r.values["replicas"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert selects(spec["selector"]["matchLabels"], r.pod["metadata"]["labels"])
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    assert "data" in claims
    mounts = {m["name"]: m["mountPath"] for m in r.container["volumeMounts"]}
    assert mounts["data"] == "/var/lib/kerwen"
    assert r.env()["KERWEN_DATA_DIR"]["value"] == "/var/lib/kerwen"
    assert r.container["args"] == ["serve"]
    assert r.pod["spec"]["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize("values", GOOD)
def test_pod_disruption_budget(values):
    r = rendered(values)
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], r.pod["metadata"]["labels"])


def test_required_anti_affinity_by_default():
    r = rendered("default.yaml")
    terms = r.pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname"
               and selects(t["labelSelector"]["matchLabels"], r.pod["metadata"]["labels"])
               for t in terms), terms
    spread = r.pod["spec"]["topologySpreadConstraints"]
    assert any(c["topologyKey"] == "topology.kubernetes.io/zone"
               and c["whenUnsatisfiable"] == "ScheduleAnyway"
               and selects(c["labelSelector"]["matchLabels"], r.pod["metadata"]["labels"])
               for c in spread), spread


def test_preferred_anti_affinity_keeps_extra_affinity():
    r = rendered("five-replicas.yaml")
    aff = r.pod["spec"]["affinity"]
    assert "nodeAffinity" in aff
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in aff["podAntiAffinity"]
    pref = aff["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("values", GOOD)
def test_probes_and_prestop_use_named_ports_of_the_container(values):
    r = rendered(values)
    c = r.container
    ports = {p["name"] for p in c["ports"]}
    assert ports == {"client", "peer", "http"}
    expect = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe, path in expect.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert isinstance(get["port"], str) and get["port"] in ports, (probe, get["port"])
        assert get["port"] == "http", probe
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300, "startup allows >= 5 min"
    pre = c["lifecycle"]["preStop"]["httpGet"]
    assert pre["path"] == "/drain-leadership" and pre["port"] in ports
    # The image is FROM scratch: an exec handler may only run /kerwen.
    for handler in [c[p] for p in expect] + [c["lifecycle"]["preStop"]]:
        if "exec" in handler:
            assert handler["exec"]["command"][0] == "/kerwen", handler


def peers_of(r: Rendered) -> list[tuple[int, str, int]]:
    out = []
    for member in r.env()["KERWEN_PEERS"]["value"].split(","):
        node_id, addr = member.split("=", 1)
        host, port = addr.rsplit(":", 1)
        out.append((int(node_id), host, int(port)))
    return out


@pytest.mark.parametrize("values", GOOD)
def test_peers_list_every_member_with_its_stable_dns_name(values):
    r = rendered(values)
    n = r.values["replicas"]
    domain = r.values["clusterDomain"]
    peer_port = next(p["containerPort"] for p in r.container["ports"] if p["name"] == "peer")
    expected = [(i + 1, f"{r.fullname}-{i}.{r.fullname}-peers.{NAMESPACE}.svc.{domain}", peer_port)
                for i in range(n)]
    assert peers_of(r) == expected
    assert r.sts["spec"]["replicas"] == n


def test_five_replicas_have_five_peers():
    r = rendered("five-replicas.yaml")
    assert [p[0] for p in peers_of(r)] == [1, 2, 3, 4, 5]
    assert peers_of(r)[4][1] == "broker-4.broker-peers.brokers.svc.k8s.example.org"
    assert r.env()["KERWEN_EVIDENCE_BUDGET_BYTES"]["value"] == "10737418240"
    assert r.env()["KERWEN_ENCRYPTION_AT_REST"]["value"] == "chacha20-poly1305"
    assert "KERWEN_EVIDENCE_BUDGET_BYTES" not in rendered("default.yaml").env()


def test_only_the_initial_nodes_form_the_cluster():
    # Grown from 3 to 5, pods 4 and 5 must join, never form a second cluster.
    assert rendered("five-replicas.yaml").env()["KERWEN_INITIAL_NODES"]["value"] == "1,2,3"
    assert rendered("default.yaml").env()["KERWEN_INITIAL_NODES"]["value"] == "1,2,3"


@pytest.mark.parametrize("values", GOOD)
def test_ordinal_and_listen_env(values):
    r = rendered(values)
    env = r.container["env"]
    names = [e["name"] for e in env]
    ordinal = env[0]
    assert ordinal["name"] == "KERWEN_NODE_ORDINAL"
    assert ordinal["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    ports = {p["name"]: p["containerPort"] for p in r.container["ports"]}
    by = r.env()
    assert by["KERWEN_LISTEN"]["value"] == f"0.0.0.0:{ports['client']}"
    assert by["KERWEN_PEER_LISTEN"]["value"] == f"0.0.0.0:{ports['peer']}"
    assert by["KERWEN_HTTP_LISTEN"]["value"] == f"0.0.0.0:{ports['http']}"
    assert by["KERWEN_SHARDS"]["value"] == str(r.values["shards"])
    assert by["KERWEN_DEFAULT_PARTITIONS"]["value"] == str(r.values["defaultPartitions"])
    assert len(names) == len(set(names)), "duplicate env"
    # $(VAR) only expands variables defined earlier in the list.
    for var, file in (("KERWEN_TLS_CA", "ca.crt"), ("KERWEN_TLS_CERT", "tls.crt"),
                      ("KERWEN_TLS_KEY", "tls.key")):
        assert by[var]["value"] == f"/etc/kerwen/tls/node-$(KERWEN_NODE_ORDINAL)/{file}"
        assert names.index(var) > names.index("KERWEN_NODE_ORDINAL")


@pytest.mark.parametrize("values", GOOD)
def test_every_ordinal_has_its_certificate_mounted(values):
    r = rendered(values)
    n = r.values["replicas"]
    mount = next(m for m in r.container["volumeMounts"] if m["name"] == "tls")
    assert mount["mountPath"] == "/etc/kerwen/tls" and mount.get("readOnly") is True
    vol = next(v for v in r.pod["spec"]["volumes"] if v["name"] == "tls")
    sources = vol["projected"]["sources"]
    assert len(sources) == n
    if r.values["tls"]["certManager"]["enabled"]:
        secret_of = {i: f"{r.fullname}-node-{i}" for i in range(n)}
    else:
        secret_of = {i: f"{r.values['tls']['existingSecretPrefix']}-{i}" for i in range(n)}
    for i, src in enumerate(sources):
        assert src["secret"]["name"] == secret_of[i]
        assert {(it["key"], it["path"]) for it in src["secret"]["items"]} == {
            ("tls.crt", f"node-{i}/tls.crt"), ("tls.key", f"node-{i}/tls.key"),
            ("ca.crt", f"node-{i}/ca.crt")}
    # Readable by the non-root user through fsGroup, by no one else.
    assert vol["projected"]["defaultMode"] & 0o007 == 0


def test_cert_manager_certificate_per_ordinal():
    r = rendered("cert-manager.yaml")
    n = r.values["replicas"]
    certs = {c["metadata"]["name"]: c for c in r.of("Certificate")
             if c["metadata"]["labels"]["app.kubernetes.io/component"] == "node"}
    assert len(certs) == n
    mounted = {s["secret"]["name"] for v in r.pod["spec"]["volumes"] if v["name"] == "tls"
               for s in v["projected"]["sources"]}
    for i in range(n):
        spec = certs[f"{r.fullname}-node-{i}"]["spec"]
        assert spec["uris"] == [f"kerwen-node:{i + 1}"]
        host = f"{r.fullname}-{i}.{r.fullname}-peers.{NAMESPACE}.svc.{r.values['clusterDomain']}"
        assert host in spec["dnsNames"]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["secretName"] == f"{r.fullname}-node-{i}" and spec["secretName"] in mounted
        assert spec["issuerRef"] == {"name": "kerwen-ca", "kind": "ClusterIssuer",
                                     "group": "cert-manager.io"}


def test_no_certificates_without_cert_manager():
    assert not rendered("default.yaml").of("Certificate")


@pytest.mark.parametrize("values", GOOD)
def test_security_context(values):
    r = rendered(values)
    pod = r.pod["spec"]["securityContext"]
    c = r.container["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65532 and pod["fsGroup"] == 65532
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["readOnlyRootFilesystem"] is True and c["allowPrivilegeEscalation"] is False
    assert c["capabilities"]["drop"] == ["ALL"]
    assert r.pod["spec"]["automountServiceAccountToken"] is False


def test_resources_set():
    res = rendered("default.yaml").container["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]


def test_image_defaults():
    r = rendered("default.yaml")
    assert r.container["image"] == "kerwen:dev"
    assert r.container["imagePullPolicy"] == "IfNotPresent"


def test_traces_are_exported_only_when_an_endpoint_is_given():
    assert not any(name.startswith("OTEL_") for name in rendered("default.yaml").env())
    r = rendered("monitoring.yaml")
    by = r.env()
    names = [e["name"] for e in r.container["env"]]
    assert by["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.monitoring:4317"
    assert by["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
    assert by["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.05"
    assert by["OTEL_SERVICE_NAME"]["value"]
    # $(VAR) only expands variables defined earlier in the list.
    assert "$(KERWEN_POD_NAME)" in by["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    assert names.index("KERWEN_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert by["KERWEN_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_optional_objects_off_by_default():
    kinds = {o["kind"] for o in rendered("default.yaml").objects}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ConfigMap", "Certificate"}


def test_notes_explain_scaling():
    notes = rendered("default.yaml").notes
    assert "kerwen node join|drain|remove|shrink|list" in notes
    assert "kerwen-scale-down" in notes and "kerwen node shrink N" in notes
    assert "Secret kerwen-tls-admin" in notes and "--timeout 2100s" in notes
    assert "kerwen-0.kerwen-peers.brokers.svc.cluster.local" in notes
    off = rendered("no-scale-down-hook.yaml").notes
    assert "scale-down hook is off" in off and "kerwen-scale-down" not in off


# ---------------------------------------------------------------- scale-down hook

ADMIN_DIR = "/etc/kerwen/admin"


def hook_job(r: Rendered) -> dict | None:
    jobs = [j for j in r.of("Job") if j["metadata"]["name"] == f"{r.fullname}-scale-down"]
    assert len(jobs) == len(r.of("Job")) <= 1, "the hook is the chart's only Job"
    return jobs[0] if jobs else None


def admin_secret(r: Rendered) -> str:
    tls = r.values["tls"]
    if tls["admin"]["existingSecret"]:
        return tls["admin"]["existingSecret"]
    if tls["certManager"]["enabled"]:
        return f"{r.fullname}-admin"
    return f"{tls['existingSecretPrefix']}-admin"


def hook_list(annotations: dict, key: str) -> set[str]:
    return {x.strip() for x in annotations[key].split(",")}


def flags(args: list[str]) -> dict[str, str]:
    """--flag value pairs after the positional arguments."""
    first = next(i for i, a in enumerate(args) if a.startswith("--"))
    pairs = args[first:]
    assert len(pairs) % 2 == 0 and all(f.startswith("--") for f in pairs[::2]), pairs
    return dict(zip(pairs[::2], pairs[1::2]))


@pytest.mark.parametrize("values", GOOD)
def test_scale_down_hook_job(values):
    r = rendered(values)
    job = hook_job(r)
    if not r.values["scaleDownHook"]["enabled"]:
        assert job is None
        return
    assert job is not None, "the scale-down hook is on by default"
    ann = job["metadata"]["annotations"]
    assert hook_list(ann, "helm.sh/hook") == {"pre-upgrade", "pre-rollback"}
    assert hook_list(ann, "helm.sh/hook-delete-policy") == {"before-hook-creation",
                                                            "hook-succeeded"}
    int(ann["helm.sh/hook-weight"])
    spec = job["spec"]
    timeout = r.values["scaleDownHook"]["timeoutSeconds"]
    assert spec["activeDeadlineSeconds"] > timeout and spec["backoffLimit"] >= 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [c] = pod["containers"]
    # FROM scratch: the binary and its arguments, no shell.
    assert c["command"] == ["/kerwen"]
    assert c["image"] == r.container["image"]
    n = r.values["replicas"]
    assert c["args"][:3] == ["node", "shrink", str(n)], c["args"]
    f = flags(c["args"])
    assert f["--timeout-secs"] == str(timeout)
    # The client port of each staying pod (nodes 1..N), by the name its certificate carries;
    # not the client Service, which may route to a node being removed.
    client = next(p["containerPort"] for p in r.container["ports"] if p["name"] == "client")
    domain = r.values["clusterDomain"]
    pods = [f"{r.fullname}-{i}.{r.fullname}-peers.{NAMESPACE}.svc.{domain}:{client}"
            for i in range(n)]
    assert f["--endpoint"].split(",") == pods
    peers = r.one("Service", f"{r.fullname}-peers")
    assert client in [p["port"] for p in peers["spec"]["ports"]]
    assert f["--tls-ca"] == f"{ADMIN_DIR}/ca.crt"
    assert f["--tls-cert"] == f"{ADMIN_DIR}/tls.crt"
    assert f["--tls-key"] == f"{ADMIN_DIR}/tls.key"
    # The administrator certificate, from its Secret, read-only.
    [mount] = c["volumeMounts"]
    assert mount["mountPath"] == ADMIN_DIR and mount["readOnly"] is True
    [vol] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = vol["secret"]
    assert secret["secretName"] == admin_secret(r)
    assert {(i["key"], i["path"]) for i in secret["items"]} == {
        ("tls.crt", "tls.crt"), ("tls.key", "tls.key"), ("ca.crt", "ca.crt")}
    assert secret["defaultMode"] & 0o007 == 0
    # Numeric non-root, like the nodes.
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532 and psc["fsGroup"] == 65532
    assert csc["runAsNonRoot"] is True and isinstance(csc["runAsUser"], int)
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert c["resources"]["limits"]["memory"]
    # The hook pod is no node: no Service or PodDisruptionBudget selects it.
    labels = spec["template"]["metadata"]["labels"]
    for s in r.of("Service"):
        assert not selects(s["spec"]["selector"], labels), s["metadata"]["name"]
    for pdb in r.of("PodDisruptionBudget"):
        assert not selects(pdb["spec"]["selector"]["matchLabels"], labels)


def test_scale_down_hook_keeps_the_new_replica_count():
    r = Rendered({**load_values("default.yaml"), "replicas": 2})
    c = hook_job(r)["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:3] == ["node", "shrink", "2"]
    assert [e.split(".")[0] for e in flags(c["args"])["--endpoint"].split(",")] == \
        ["kerwen-0", "kerwen-1"]
    assert r.sts["spec"]["replicas"] == 2


def test_scale_down_hook_admin_secret_sources():
    # Existing Secrets: <prefix>-admin unless named; a missing one fails the Job at once.
    for values, name in (("default.yaml", "kerwen-tls-admin"), ("five-replicas.yaml", "broker-admin")):
        r = rendered(values)
        secret = hook_job(r)["spec"]["template"]["spec"]["volumes"][0]["secret"]
        assert secret["secretName"] == name and secret["optional"] is True
        assert not r.of("Certificate")
    # cert-manager: the chart issues the admin certificate, and the Job waits for it.
    r = rendered("cert-manager.yaml")
    job = hook_job(r)
    secret = job["spec"]["template"]["spec"]["volumes"][0]["secret"]
    assert secret["secretName"] == f"{r.fullname}-admin" and not secret.get("optional", False)
    cert = r.one("Certificate", f"{r.fullname}-admin")
    spec = cert["spec"]
    assert spec["secretName"] == secret["secretName"]
    assert spec["uris"] == [f"kerwen-admin:{r.values['tls']['admin']['name']}"]
    assert "client auth" in spec["usages"] and "server auth" not in spec["usages"]
    assert not spec.get("dnsNames")
    node_cert = r.one("Certificate", f"{r.fullname}-node-0")
    assert spec["issuerRef"] == node_cert["spec"]["issuerRef"]
    # A hook itself, created before the Job, so the first hook that needs it finds it.
    ann = cert["metadata"]["annotations"]
    assert {"pre-upgrade", "pre-rollback"} <= hook_list(ann, "helm.sh/hook")
    assert int(ann["helm.sh/hook-weight"]) < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert "hook-succeeded" not in ann["helm.sh/hook-delete-policy"]
    # A Secret of one's own with cert-manager: the chart issues none.
    own = Rendered({**load_values("cert-manager.yaml"),
                    "tls": {**load_values("cert-manager.yaml")["tls"],
                            "admin": {"existingSecret": "ops-admin"}}})
    assert not [c for c in own.of("Certificate") if c["metadata"]["name"].endswith("-admin")]
    assert hook_job(own)["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "ops-admin"


def test_scale_down_hook_can_be_disabled():
    r = rendered("no-scale-down-hook.yaml")
    assert hook_job(r) is None and not r.of("Job")
    names = {c["metadata"]["name"] for c in r.of("Certificate")}
    assert names == {f"{r.fullname}-node-{i}" for i in range(r.values["replicas"])}
    off = Rendered({**load_values("default.yaml"), "scaleDownHook": {"enabled": False}})
    assert not off.of("Job")


# ---------------------------------------------------------------- monitoring


def test_service_monitor_scrapes_the_http_port():
    r = rendered("monitoring.yaml")
    sm = r.one("ServiceMonitor")
    targets = [s for s in r.of("Service")
               if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert len(targets) == 1, "the ServiceMonitor selects exactly one Service"
    svc = targets[0]
    assert svc["spec"]["clusterIP"] == "None", "one scrape target per pod"
    assert selects(svc["spec"]["selector"], r.pod["metadata"]["labels"])
    ep = sm["spec"]["endpoints"]
    assert [e["port"] for e in ep] == ["http"] and ep[0]["path"] == "/metrics"
    svc_ports = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
    assert svc_ports["http"] == "http"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert sm["metadata"]["labels"]["release"] == "prometheus"


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if "expr" in t)
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            exprs.append(m.group(1) if m else q)
    return exprs


def test_dashboard_file_queries_only_exported_metrics():
    dash = json.loads((CHART / "dashboards" / "kerwen.json").read_text())
    assert dash["title"] and dash["uid"] and dash["panels"]
    exprs = dashboard_exprs(dash)
    assert len(exprs) > 20
    assert unknown_metrics(exprs, METRICS | HISTOGRAMS) == {}
    used = {base_metric(n) for e in exprs for n in promql_metrics(e)}
    assert (METRICS | HISTOGRAMS) - used == set(), "metrics the dashboard does not show"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"


def test_dashboard_configmap():
    r = rendered("monitoring.yaml")
    cm = r.one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["kerwen.json"]) == \
        json.loads((CHART / "dashboards" / "kerwen.json").read_text())


def test_prometheus_rule_alerts():
    r = rendered("monitoring.yaml")
    rule = r.one("PrometheusRule")
    rules = [x for g in rule["spec"]["groups"] for x in g["rules"]]
    names = {x["alert"] for x in rules}
    assert REQUIRED_ALERTS <= names, REQUIRED_ALERTS - names
    assert unknown_metrics([x["expr"] for x in rules], METRICS | HISTOGRAMS |
                           PROMETHEUS_SYNTHETIC) == {}
    sel = f'job="{r.fullname}-metrics",namespace="{NAMESPACE}"'
    for x in rules:
        assert x["labels"]["severity"] in {"warning", "critical"}, x["alert"]
        assert x["annotations"]["summary"] and "for" in x
        assert x["expr"].count("{") == x["expr"].count("}")
        # Every series is scoped to this release (job of the ServiceMonitor's Service).
        assert x["expr"].count(sel) == x["expr"].count("{"), x["expr"]
        # Prometheus templates stay unexpanded by Helm.
        for text in x["annotations"].values():
            assert "{{" not in text or "$labels" in text or "$value" in text
