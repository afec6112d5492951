#!/usr/bin/python3
"""Registers instances in ZooKeeper with kazoo (Debian's python3-kazoo), laid out byte for byte
as Finagle/Aurora ServerSets, Airbnb Nerve, Dubbo 2 and apisix-seed write them, and holds its
session until it is terminated (SIGTERM closes the session: its ephemeral znodes go with it).

Usage: kazoo_registrar.py HOSTS REGISTRATIONS_JSON

REGISTRATIONS_JSON is a list of objects, each with a "format" and what that format needs:
  {"format": "serverset", "path": P, "host": H, "port": N,
   "endpoints": {NAME: N, ...}, "status": "ALIVE", "shard": N}
  {"format": "serverset-vector", "path": P, "vector": [{"select": S, "weight": W}, ...]}
  {"format": "nerve", "path": P, "host": H, "port": N, "instance_id": I,
   "weight": W, "labels": {...}}
  {"format": "dubbo", "root": R, "interface": I, "host": H, "port": N, "params": {...}}
  {"format": "apisix", "path": P, "nodes": [{"host": H, "port": N, "weight": W}, ...]}
  {"format": "raw", "path": P, "data": TEXT, "ephemeral": BOOL}
Prints "registered <znode>" for each, then "ready".
"""

import json
import signal
import sys
import threading
import urllib.parse

from kazoo.client import KazooClient


def serverset(zk, r):
    # twitter.common.zookeeper.serverset: json.dumps(ServiceInstance.to_dict()), a member_
    # ephemeral sequential znode.
    member = {
        "serviceEndpoint": {"host": r["host"], "port": r["port"]},
        "additionalEndpoints": {
            name: {"host": r["host"], "port": port}
            for name, port in r.get("endpoints", {}).items()
        },
        "status": r.get("status", "ALIVE"),
    }
    if "shard" in r:
        member["shard"] = r["shard"]
    return zk.create(r["path"] + "/member_", json.dumps(member).encode(),
                     ephemeral=True, sequence=True, makepath=True)


def serverset_vector(zk, r):
    # Finagle serverset2 weight vectors: {"vector": [{"select", "weight", "priority"}]}.
    vector = {"vector": [dict(d, weight=float(d["weight"])) for d in r["vector"]]}
    return zk.create(r["path"] + "/vector_", json.dumps(vector).encode(),
                     sequence=True, makepath=True)


def nerve(zk, r):
    # Nerve's ZooKeeper reporter: <path>/<instance_id>_<seq>, ephemeral sequential, with
    # host, port, name, then weight and labels when configured, as compact JSON.
    data = {"host": r["host"], "port": r["port"], "name": r["instance_id"]}
    if "weight" in r:
        data["weight"] = int(r["weight"])
    if "labels" in r:
        data["labels"] = r["labels"]
    return zk.create("%s/%s_" % (r["path"], r["instance_id"]),
                     json.dumps(data, separators=(",", ":")).encode(),
                     ephemeral=True, sequence=True, makepath=True)


def dubbo(zk, r):
    # Dubbo's ZookeeperRegistry: <root>/<URL.encode(interface)>/providers/<URL.encode(url)>,
    # ephemeral, holding what Curator writes by default: the host's address.
    params = dict(r.get("params", {}))
    params.setdefault("interface", r["interface"])
    params.setdefault("side", "provider")
    query = "&".join("%s=%s" % (k, params[k]) for k in sorted(params))
    url = "dubbo://%s:%d/%s?%s" % (r["host"], r["port"], r["interface"], query)
    # Java's URLEncoder.encode: everything but letters, digits and ".-*_"; space as "+".
    name = urllib.parse.quote_plus(url, safe=".-*_")
    providers = "%s/%s/providers" % (r["root"], urllib.parse.quote_plus(r["interface"], safe=".-*_"))
    zk.ensure_path(providers)
    return zk.create(providers + "/" + name, r["host"].encode(), ephemeral=True)


def apisix(zk, r):
    # apisix-seed: one persistent znode per service holding the JSON list of its nodes.
    data = json.dumps(r["nodes"]).encode()
    if zk.exists(r["path"]):
        zk.set(r["path"], data)
        return r["path"]
    return zk.create(r["path"], data, makepath=True)


def raw(zk, r):
    return zk.create(r["path"], r["data"].encode("utf-8", "surrogateescape"),
                     ephemeral=r.get("ephemeral", True), makepath=True)


WRITERS = {
    "serverset": serverset,
    "serverset-vector": serverset_vector,
    "nerve": nerve,
    "dubbo": dubbo,
    "apisix": apisix,
    "raw": raw,
}


def main():
    hosts, registrations = sys.argv[1], json.loads(sys.argv[2])
    zk = KazooClient(hosts=hosts, timeout=10)
    zk.start(timeout=30)
    for registration in registrations:
        path = WRITERS[registration["format"]](zk, registration)
        print("registered " + path, flush=True)
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    zk.stop()
    zk.close()


if __name__ == "__main__":
    main()
