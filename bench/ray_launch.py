"""Runs a plan on a Ray cluster: each run is one Ray task (`pip install 'robench[ray]'`).

A task calls `bench.runner.run_one` on whichever node Ray picks: the run's training and
evaluation processes start there, and write into the results folder, which every node
must see at the same path (a shared file system). Resources per task come from the suite's
`[resources]` table: `cpus` (also the CPU threads of the run's processes) and `gpus` (a
fraction lets several small runs share one GPU); on a cluster without GPUs, or with
`--device cpu`, a task asks for none.

Runs are idempotent and resumable, and a run folder is locked by the process working on
it, so a task that Ray retries after its node or worker died continues from `last.pt`
(the dead owner's lock is recovered as stale: at once on the same host, after
`bench.locks.STALE_AFTER_S` seconds without a heartbeat from another host). A run that
fails for a reason of its own (bad input, an error in defense code) is reported and not
retried.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.config import ConfigError, RunSpec, Suite
from bench.progress import JobProgress
from bench.runner import ROOT, Launch
from bench.scheduler import Outcome

MAX_RETRIES = 3  # a task whose worker or node died is started again this many times


def run_task(spec_raw: dict, suite_raw: dict, launch_raw: dict) -> dict:
    """One run, inside a Ray worker. Returns a plain dict (status, seconds, message)."""
    from bench.runner import run_one
    from bench.worker import USER_ERRORS

    spec, suite = RunSpec.from_dict(spec_raw), Suite.from_dict(suite_raw)
    launch = Launch(Path(launch_raw["results"]), launch_raw["data_root"],
                    launch_raw["device"], False, launch_raw["threads"], launch_raw["debug"],
                    expected_params=launch_raw.get("expected_params"),
                    compile=launch_raw.get("compile"))
    start = time.perf_counter()
    try:
        result = run_one(spec, suite=suite, launch=launch, wait=True)
    except USER_ERRORS as exc:
        return {"status": "failed", "seconds": time.perf_counter() - start,
                "message": " ".join(str(exc).split()), "record_path": ""}
    return {"status": "reused" if result.seconds == 0.0 else "done",
            "seconds": result.seconds, "message": "", "record_path": str(result.record_path)}


def task_resources(suite: Suite, device: str | None, cluster_gpus: float) -> dict:
    """num_cpus / num_gpus of one run's task."""
    wants_gpu = (device or "cuda").startswith("cuda") and cluster_gpus > 0
    return {"num_cpus": suite.resources.cpus,
            "num_gpus": suite.resources.gpus if wants_gpu else 0}


def run_plan_on_ray(specs: list[RunSpec], suite: Suite, launch: Launch, address: str,
                    progress: JobProgress) -> list[Outcome]:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs Ray: pip install 'robench[ray]' (or pip install "
                          "ray)") from exc
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    ray.init(address=None if address == "auto" and "RAY_ADDRESS" not in os.environ
             else address, runtime_env={"env_vars": env}, log_to_driver=False,
             include_dashboard=False, ignore_reinit_error=True)
    try:
        resources = task_resources(suite, launch.device,
                                   ray.cluster_resources().get("GPU", 0.0))
        task = ray.remote(run_task).options(max_retries=MAX_RETRIES, **resources)
        threads = max(1, int(resources["num_cpus"]))
        payload = {"results": str(Path(launch.results).resolve()),
                   "data_root": (str(Path(launch.data_root).resolve())
                                 if launch.data_root else None),
                   "device": launch.device, "threads": launch.threads or threads,
                   "debug": launch.debug, "compile": launch.compile}
        progress.workers = max(1, int(ray.cluster_resources().get("CPU", 1)
                                      // max(resources["num_cpus"], 1e-9)))
        progress.begin()
        pending = {}
        for index, spec in enumerate(specs):
            own = {spec.run_id: launch.expected_params[spec.run_id]} \
                if launch.expected_params and spec.run_id in launch.expected_params else None
            ref = task.remote(spec.to_dict(), suite.to_dict(),
                              {**payload, "expected_params": own})
            pending[ref] = (index, spec)  # Ray does not say when a task starts
        outcomes: dict[int, Outcome] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            progress.tick()
            for ref in done:
                index, spec = pending.pop(ref)
                try:
                    raw = ray.get(ref)
                except Exception as exc:  # the task died MAX_RETRIES + 1 times
                    raw = {"status": "failed", "seconds": 0.0, "record_path": "",
                           "message": f"the Ray task failed: {type(exc).__name__}: "
                                      + " ".join(str(exc).split())[:300]}
                outcome = Outcome(spec, raw["status"], raw["seconds"], raw["message"],
                                  raw["record_path"])
                outcomes[index] = outcome
                progress.finished(outcome)
        progress.end()
        return [outcomes[i] for i in sorted(outcomes)]
    finally:
        ray.shutdown()
