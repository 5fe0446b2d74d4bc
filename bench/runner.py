"""Launches runs: each run's training and its evaluation in processes of their own.

The launcher (this module, in `robench run` and `scripts/run_full_evaluation.py`) never
imports defense code. For each run it starts

1. a training process (`python -m bench.worker train`): the only process in which the
   submission's code runs; it builds the training splits (never the test split) and trains
   or resumes the run in its folder;
2. an evaluation process (`python -m bench.cli evaluate RUN_DIR`): builds the suite's
   architecture from the checkpoints' weights and attacks it on the test split; it never
   imports defense code.

The suite travels to both on their standard input (not through a file a training process
could rewrite). When the evaluation process is done, the launcher checks its record: the
schema, the suite and run hashes it expects, and the sha256 of each checkpoint file. A
failing process ends with one line (`RunFailedError`); what was kept stays kept.

Runs are independent and resumable: a half-done run folder continues from `last.pt`, a
trained but unevaluated one is only evaluated, and a finished one (with a valid
`record.json`) is skipped. A run folder is owned by one launcher at a time
(`bench/locks.py`): the launcher holds its lock while the run's processes work, so two
launchers (or Ray tasks) on one results folder never train the same run twice. The
children die with the launcher that started them (Linux: the parent-death signal, see
`bench/lifeline.py`), so a killed launcher leaves no orphan writing into a folder whose lock
has gone stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.config import RunSpec, Suite, check_method, load_suite
from bench.errors import RunBusyError, RunFailedError, RunMismatchError
from bench.lifeline import PARENT_ENV
from bench.locks import FolderLock
from bench.records import RecordError, check_same_params, read_record

DEFAULT_RESULTS = Path("results")
ROOT = Path(__file__).resolve().parents[1]


def run_dir_for(spec: RunSpec, results: Path) -> Path:
    return Path(results) / spec.suite / spec.run_id


def check_record_matches(record: dict, spec: RunSpec, suite: Suite, path: Path) -> None:
    """A finished run is reused only if it was made under the same protocol and the
    same suite settings for its defenses; otherwise say so instead of mixing versions."""
    expected = suite.run_hash(spec.defense_names)
    found = record.get("suite", {}).get("run_hash")
    if found != expected or record.get("suite", {}).get("hash") != suite.protocol_hash:
        raise RunMismatchError(
            f"{path} was made under another version of suite {suite.name!r} or of its "
            f"settings for {spec.row_name} (run hash {str(found)[:12]} vs {expected[:12]}); "
            "move or delete that run folder to rerun it")
    if record.get("spec") != spec.to_dict():
        raise RunMismatchError(f"{path} holds the record of another run ({record.get('spec')})")


def check_record_params(record: dict, expected: dict[str, dict] | None, spec: RunSpec,
                        path: Path) -> None:
    """A finished run is reused only if its defenses ran with the parameters this ROBench
    would give them now (defaults, method and suite settings, the run's own): a record made
    before a defense's defaults changed would otherwise stand in for the current row."""
    if expected is None:
        return
    check_same_params(record.get("defense_params") or {},
                      json.loads(json.dumps(expected, default=str)),
                      f"{path} was made with other parameters for {spec.row_name}",
                      "move or delete that run folder to rerun it")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_record_checkpoints(record: dict, run_dir: Path) -> None:
    """The checkpoints a record scored are the files in its folder (sha256)."""
    for tag, info in record["checkpoints"].items():
        path = run_dir / info.get("file", f"{tag}.pt")
        if not path.exists():
            raise RecordError(f"{path} is missing: the record {run_dir / 'record.json'} scored it")
        if sha256_file(path) != info["sha256"]:
            raise RecordError(f"{path} is not the checkpoint that {run_dir / 'record.json'} "
                              "scored (sha256 differs); re-evaluate the run with "
                              f"`robench evaluate {run_dir}`")


@dataclass
class RunResult:
    spec: RunSpec
    run_dir: Path
    record_path: Path
    seconds: float  # 0.0 when a finished record was reused


OutputSink = Callable[[str], None]  # receives each line (or progress-bar update) of a child


@dataclass
class Launch:
    """How child processes are started (shared by every run of a launcher). `output`:
    None lets the children write to the launcher's terminal; a callable receives their
    output instead, one line or progress-bar update at a time (parallel runs)."""

    results: Path = DEFAULT_RESULTS
    data_root: str | None = None
    device: str | None = None
    progress: bool = True
    threads: int | None = None
    debug: bool = False
    output: OutputSink | None = None
    notices: OutputSink | None = None  # the launcher's own messages (locks), in every mode
    # run_id -> {defense: effective parameters} from the plan: a finished run whose record
    # was made with other parameters (e.g. under an older ROBench's defaults) is not reused
    expected_params: dict[str, dict] | None = None
    # `--compile`: the torch.compile mode of the training processes (None: eager); not part
    # of the protocol, so a record made with another setting is reused
    compile: str | None = None


def child_environment(threads: int | None = None) -> dict[str, str]:
    """The launcher's environment, with this checkout first on PYTHONPATH (so the child
    imports the same ROBench, installed or not); with `threads`, OpenMP and MKL are held
    to that many threads too (torch's own count is set by the child)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env[PARENT_ENV] = str(os.getpid())  # the child dies with this process (bench/lifeline.py)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _pump(stream, sink: OutputSink) -> None:
    """Forward a child's output to `sink`, split at newlines and carriage returns (a
    progress bar's updates end in a carriage return)."""
    buffer = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buffer += chunk
        *parts, buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for part in parts:
            text = part.decode(errors="replace").rstrip()
            if text:
                sink(text)
    if buffer.strip():
        sink(buffer.decode(errors="replace").rstrip())


def run_child(args: list[str], payload: dict, what: str, launch: Launch,
              capture_stdout: bool = False) -> str:
    """Run `python -m <args>` with `payload` (JSON) on stdin; return its stdout. A failure
    raises RunFailedError with the child's own one-line message. With `launch.output`
    (and not `capture_stdout`), the child's stdout and stderr go to it instead."""
    fd, error_file = tempfile.mkstemp(prefix="robench-error-", suffix=".txt")
    os.close(fd)
    try:
        command = [sys.executable, "-m", *args, "--error-file", error_file]
        if launch.debug:
            command.append("--debug")
        stream = launch.output is not None and not capture_stdout
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if stream else None,
            env=child_environment(launch.threads), cwd=os.getcwd())
        if stream:
            proc.stdin.write(json.dumps(payload).encode())
            proc.stdin.close()
            pump = threading.Thread(target=_pump, args=(proc.stdout, launch.output),
                                    daemon=True)
            pump.start()
            try:
                proc.wait()
            except BaseException:
                proc.terminate()
                raise
            pump.join()
            out = ""
        else:
            try:
                raw, _ = proc.communicate(json.dumps(payload).encode())
            except BaseException:
                proc.terminate()
                raise
            out = (raw or b"").decode()
        message = Path(error_file).read_text().strip()
    finally:
        os.unlink(error_file)
    if proc.returncode != 0:
        if not message:
            message = f"the process exited with status {proc.returncode} without a message"
        raise RunFailedError(f"{what}: {message}")
    return out


def train_in_child(spec: RunSpec, suite: Suite, launch: Launch) -> None:
    payload = {"spec": spec.to_dict(), "suite": suite.to_dict(),
               "results": str(launch.results), "data_root": launch.data_root,
               "device": launch.device, "threads": launch.threads, "progress": launch.progress,
               "compile": launch.compile}
    run_child(["bench.worker", "train"], payload, f"training {spec.row_name} seed {spec.seed}",
              launch)


def evaluate_in_child(run_dir: Path, suite: Suite, spec: RunSpec, launch: Launch) -> None:
    args = ["bench.cli", "evaluate", str(run_dir), "--suite-json", "-"]
    args += ["--data-root", launch.data_root] if launch.data_root else []
    args += ["--device", launch.device] if launch.device else []
    args += ["--threads", str(launch.threads)] if launch.threads else []
    args += [] if launch.progress else ["--quiet"]
    run_child(args, suite.to_dict(), f"evaluating {spec.row_name} seed {spec.seed}", launch)


def run_one(spec: RunSpec, results: Path = DEFAULT_RESULTS, data_root: str | None = None,
            device: str | None = None, progress: bool = True, suite: Suite | None = None,
            threads: int | None = None, debug: bool = False, wait: bool = True,
            launch: Launch | None = None, compile: str | None = None) -> RunResult:
    """Train (or resume) and evaluate one run, each in its own process; returns where its
    record is. The record is checked against the suite and the checkpoint files. The run
    folder's lock is held throughout; when another live process holds it, `wait` waits
    for it (then reuses what it made), otherwise RunBusyError is raised at once.
    `launch`, when given, replaces the keyword arguments after `suite`; `compile`: the
    torch.compile mode of the training (bench/compiled.py), None for eager."""
    suite = suite or load_suite(spec.suite)
    check_method(spec.method)
    launch = launch or Launch(Path(results), data_root, device, progress, threads, debug,
                              compile=compile)
    run_dir = run_dir_for(spec, launch.results)
    what = f"{spec.row_name} seed {spec.seed}"
    say = launch.notices or (lambda text: print(text, file=sys.stderr, flush=True))
    lock = FolderLock(run_dir, what, log=say)
    if not lock.try_acquire():
        if not wait:
            raise RunBusyError(f"{what} is being run by {lock.owner()}")
        lock.acquire(waiting=lambda owner: say(f"{what}: waiting for {owner}, which holds "
                                                f"{run_dir}"))
    try:
        return _run_locked(spec, suite, launch, run_dir, lock)
    finally:
        lock.release()


def _run_locked(spec: RunSpec, suite: Suite, launch: Launch, run_dir: Path,
                lock: FolderLock) -> RunResult:
    record_path = run_dir / "record.json"
    start = time.perf_counter()
    if record_path.exists():
        record = read_record(record_path)  # validates
        check_record_matches(record, spec, suite, record_path)
        expected = (launch.expected_params or {}).get(spec.run_id)
        if expected is None:  # not planned by this launcher (e.g. `robench run`): ask a child
            expected = effective_params_in_child(spec, suite, launch)
        check_record_params(record, expected, spec, record_path)
        check_record_checkpoints(record, run_dir)
        return RunResult(spec, run_dir, record_path, 0.0)
    train_in_child(spec, suite, launch)
    lock.check()
    evaluate_in_child(run_dir, suite, spec, launch)
    lock.check()
    record = read_record(record_path)
    check_record_matches(record, spec, suite, record_path)
    check_record_checkpoints(record, run_dir)
    return RunResult(spec, run_dir, record_path, time.perf_counter() - start)


def effective_params_in_child(spec: RunSpec, suite: Suite, launch: Launch) -> dict[str, dict]:
    """The run's effective defense parameters, from a child process (it imports defense
    code): `bench.worker params`."""
    out = run_child(["bench.worker", "params"], {"suite": suite.to_dict(),
                                                 "spec": spec.to_dict()},
                    f"checking the parameters of {spec.row_name} seed {spec.seed}", launch,
                    capture_stdout=True)
    return json.loads(out)


def plan_in_child(suite: str, defenses: list[str] | None, methods: list[str] | None,
                  seeds: list[int] | None, launch: Launch) -> list[RunSpec]:
    """`bench.planning.plan_runs` in a child process (it imports defense code)."""
    return plan_with_params_in_child(suite, defenses, methods, seeds, launch)[0]


def plan_with_params_in_child(suite: str, defenses: list[str] | None,
                              methods: list[str] | None, seeds: list[int] | None,
                              launch: Launch) -> tuple[list[RunSpec], dict[str, dict]]:
    """The plan and, by run id, each run's effective defense parameters (for
    `Launch.expected_params`)."""
    out = run_child(["bench.worker", "plan"], {"suite": suite, "defenses": defenses,
                                               "methods": methods, "seeds": seeds},
                    "planning", launch, capture_stdout=True)
    raw_specs = json.loads(out)
    specs = [RunSpec.from_dict(raw) for raw in raw_specs]
    return specs, {spec.run_id: raw.get("effective_params", {})
                   for spec, raw in zip(specs, raw_specs, strict=True)}
