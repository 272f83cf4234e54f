"""Joining a Ray cluster, deciding what the config leaves to it, and refusing up front the work
it cannot hold.

Ray queues a TorchTrainer whose workers do not fit and waits for them indefinitely (an
autoscaler might add nodes); on a fixed cluster that is a silent hang. So before anything is
scheduled, the run's worker bundles are packed onto the cluster's nodes as Ray would, and a run
that cannot fit is an error that says what is missing. The same count bounds how many sweep
trials run at once.
"""
from __future__ import annotations

import ray
from omegaconf import DictConfig, OmegaConf

from s4d_dist import config


class ClusterError(RuntimeError):
    """The cluster cannot run what the config asks for."""


def connect(cfg: DictConfig) -> DictConfig:
    """Join `ray.address` ("auto": the cluster `ray start` / `ray up` runs on this machine;
    "host:port"; "ray://host:10001"), or start a local cluster whose dashboard listens on
    `ray.dashboard_host` only. A session already open in this process is kept. Returns `cfg`
    with what it leaves to the cluster decided: `ray.gpus_per_worker` (see gpus_per_worker).

    A local cluster always has its dashboard: trials need its state API (require_state_api).
    """
    r = cfg.ray
    if not r.check_resources:
        gpus_per_worker(cfg, {})  # refuses a null it could not decide, before joining
    if not ray.is_initialized():
        if r.address:
            ray.init(address=r.address)
        else:
            ray.init(address="local", num_cpus=r.local_cpus or None, include_dashboard=True,
                     dashboard_host=r.dashboard_host, dashboard_port=r.dashboard_port)
    if r.gpus_per_worker is not None:
        return cfg
    resources = ray.cluster_resources()
    gpus = gpus_per_worker(cfg, resources)
    if gpus:
        print(f"[s4d] ray.gpus_per_worker: the cluster has {resources['GPU']:g} GPUs, so each "
              f"worker takes {gpus:g} (ray.gpus_per_worker=0 trains on CPUs)", flush=True)
    return config.from_values(("resolved config", OmegaConf.to_container(cfg, resolve=True)),
                              ("the cluster's GPUs", {"ray": {"gpus_per_worker": gpus}}))


def gpus_per_worker(cfg: DictConfig, resources: dict[str, float]) -> float:
    """GPUs per training worker: `ray.gpus_per_worker` where set; where null (the default), one
    if the cluster's total resources (ray.cluster_resources()) hold a GPU, else none, so that a
    GPU cluster never trains on its CPUs unasked.

    With `ray.check_resources=false` (an autoscaling cluster, whose GPU nodes may not exist
    yet) the cluster says nothing reliable, so null is refused there rather than taken as 0.
    """
    if cfg.ray.gpus_per_worker is not None:
        return float(cfg.ray.gpus_per_worker)
    if not cfg.ray.check_resources:
        raise ClusterError(
            "ray.gpus_per_worker is null (one GPU per worker if the cluster has GPUs), but with "
            "ray.check_resources=false the cluster is not asked (an autoscaling cluster may have "
            "no GPU node yet): set ray.gpus_per_worker=1 to train on GPUs, or 0 to train on CPUs")
    return 1.0 if resources.get("GPU", 0.0) > 0 else 0.0


def require_state_api() -> None:
    """Refuse to start trials on a cluster without the dashboard's state API.

    Ray Train frees a run's placement group through a cleaner that watches the run's controller
    with the state API. Inside a Tune trial the controller ends with the trial, so without the
    API each finished trial keeps its workers' CPUs and GPUs, and later trials wait forever.
    """
    from ray.util.state import list_actors

    try:
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=30,
                    raise_on_missing_output=False)
    except Exception as error:  # which one depends on how the API is missing
        raise ClusterError(
            "this Ray cluster has no dashboard (state API), which sweeps and k-fold runs need "
            "to release finished trials' resources: start it with the dashboard (ray[default] "
            f"installed; `ray start --include-dashboard=true`). ({error})") from None


def worker_bundle(cfg: DictConfig) -> dict[str, float]:
    """What one training worker (rank) reserves."""
    bundle = {"CPU": float(cfg.ray.cpus_per_worker)}
    if cfg.ray.gpus_per_worker:
        bundle["GPU"] = float(cfg.ray.gpus_per_worker)
    return bundle


def _workers_fitting(nodes: list[dict[str, float]], bundle: dict[str, float]) -> int:
    """Worker bundles the nodes hold at once; a bundle never spans two nodes."""
    return sum(int(min(node.get(k, 0.0) // v for k, v in bundle.items())) for node in nodes)


def runs_at_once(cfg: DictConfig) -> int:
    """How many runs of `cfg.ray.num_workers` workers the cluster holds side by side.

    Counted on the cluster's total (not currently free) resources, so other jobs only delay a
    run, while a run that could never start is refused here. With `ray.check_resources=false`
    (an autoscaling cluster that grows on demand) nothing is refused and one run at a time is
    assumed unless `sweep.max_concurrent_trials` says more.
    """
    workers = cfg.ray.num_workers
    if not cfg.ray.check_resources:
        return 1
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    bundle = worker_bundle(cfg)
    fitting = _workers_fitting(nodes, bundle)
    if fitting >= workers:
        return fitting // workers
    total = ray.cluster_resources()
    have = ", ".join(f"{total.get(k, 0.0):g} {k}" for k in bundle)
    missing = [k for k in bundle if total.get(k, 0.0) == 0]
    why = (f"the cluster has no {' or '.join(missing)}" if missing else
           f"its {len(nodes)} node(s) hold {fitting} such worker(s) ({have} in all)")
    raise ClusterError(
        f"a run needs ray.num_workers={workers} workers × {bundle} (ray.cpus_per_worker, "
        f"ray.gpus_per_worker), but {why}. Lower those settings or add nodes; on an autoscaling "
        f"cluster set ray.check_resources=false to let Ray wait for new nodes.")


def concurrency(cfg: DictConfig) -> int:
    """Trials to run at once: what the cluster holds, capped by `sweep.max_concurrent_trials`."""
    fits, cap = runs_at_once(cfg), cfg.sweep.max_concurrent_trials
    if not cap:
        return fits
    return min(fits, cap) if cfg.ray.check_resources else cap
