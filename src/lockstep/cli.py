"""The ``lockstep`` command: serve | trainer | ui | up | publish | status | rollback | gc | tiny-model."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys

# Before torch loads: OpenMP threads that spin while idle starve a replica's other threads (a background
# model load, the HTTP loop) on small or CPU-limited machines; measured 10-25x slower generation without this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lockstep.core.clock import SYSTEM_CLOCK
from lockstep.core.errors import BadRequest, LockstepError
from lockstep.core.heap import freeze_long_lived
from lockstep.core.settings import CommitPolicy, EngineKind, Settings, load_settings

log = logging.getLogger("lockstep")
IN_PROGRESS = ("prepare", "canary")  # pending phases under way; a commit or an abort is a decision already made


def _setup_logging(level: str, name: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _advertise(host: str, port: int, settings: Settings) -> str:
    if settings.advertise_url:
        return settings.advertise_url
    if settings.pod_ip:
        return f"http://{settings.pod_ip}:{port}"
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def _shared_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"shared_dir": Path(args.shared) if getattr(args, "shared", None) else None}


def _guarded(settings: Settings, host: str, server: str) -> Settings:
    """Refuse an unsafe exposure (no token off loopback, a placeholder token); fix the Host allow-list."""
    from lockstep.core.guards import check_exposure, effective_allowed_hosts

    check_exposure(host, settings.api_token, allow_unauthenticated=settings.allow_unauthenticated, server=server)
    hosts = effective_allowed_hosts(settings.allowed_host_list, host)
    return settings.model_copy(update={"allowed_hosts": ",".join(hosts)})


# ---------------------------------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from lockstep.core.http_server import run_server
    from lockstep.inference.app import create_app

    base = load_settings(**_shared_overrides(args), initial_model_repo_id=args.model)
    replica_id = base.replica_id or f"{socket.gethostname()}-{args.port}"
    settings = base.model_copy(update={"replica_id": replica_id,
                                       "advertise_url": _advertise(args.host, args.port, base)})
    settings = _guarded(settings, args.host, "lockstep serve")
    _setup_logging(args.log_level, replica_id)
    from lockstep.inference import engines

    if engines.pick_engine(settings) is EngineKind.VLLM:  # refused here, before the server starts, not in its lifespan
        engines.check_vllm_options(settings)
    log.info("replica %s on %s (shared folder: %s)", replica_id, settings.advertise_url, settings.shared_dir)
    app = create_app(settings)
    freeze_long_lived()  # before the first model loads: retiring a version then collects only what came since
    run_server(app, args.host, args.port)
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    from lockstep.core.http_server import run_server
    from lockstep.trainer.server.app import create_app

    settings = _guarded(load_settings(**_shared_overrides(args)), args.host, "lockstep trainer")
    _setup_logging(args.log_level, "trainer")
    run_server(create_app(settings), args.host, args.port)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from lockstep.core.http_server import run_server
    from lockstep.ui.app import create_app

    overrides: dict[str, Any] = {}
    if args.trainer_url:
        overrides["trainer_url"] = args.trainer_url
    settings = _guarded(load_settings(**overrides), args.host, "lockstep ui")
    _setup_logging(args.log_level, "ui")
    run_server(create_app(settings), args.host, args.port)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from lockstep.launcher import run_local_cluster

    _setup_logging(args.log_level, "up")
    return run_local_cluster(replicas=args.replicas, shared=Path(args.shared), base_port=args.base_port,
                             trainer_port=args.trainer_port, ui_port=args.ui_port, model=args.model,
                             with_trainer=not args.no_trainer, with_ui=not args.no_ui)


# ---------------------------------------------------------------------------------------------------- sync
def _coordinator(args: argparse.Namespace, *, reads_state: bool = False) -> Any:
    """Over the shared folder; or, given replica URLs (``--urls``, or INFERENCE_URLS without a shared folder),
    over HTTP with nothing kept after this command. ``reads_state``: the command reads the cluster's state
    (status, rollout), which only a shared folder or the trainer keeps."""
    from lockstep.sync.coordinator import Coordinator
    from lockstep.sync.http_fleet import HttpFleet

    settings = load_settings(**_shared_overrides(args))
    owner = f"cli@{socket.gethostname()}"
    given = getattr(args, "urls", None)
    urls = [u.strip() for u in given.split(",") if u.strip()] if given else []
    if reads_state and settings.shared_dir is None:
        raise BadRequest(f"lockstep {args.command} reads the cluster's state, which the trainer keeps (--trainer URL) "
                         "or a shared folder (--shared DIR, or LOCKSTEP_SHARED_DIR); replicas driven over HTTP keep "
                         "none of it")
    if urls or (settings.shared_dir is None and settings.inference_url_list):
        urls = urls or settings.inference_url_list
        _refuse_led_replicas(urls)
        fleet = HttpFleet(settings, lambda: urls, clock=SYSTEM_CLOCK)
        return Coordinator.over_http(settings, fleet, clock=SYSTEM_CLOCK, owner=owner, data_dir=None)
    if settings.shared_dir is None:
        urls_too = ", or the replicas' URLs (--urls, or INFERENCE_URLS)" if hasattr(args, "urls") else ""
        raise BadRequest(f"lockstep {args.command} needs to reach the fleet: --shared DIR (or LOCKSTEP_SHARED_DIR) "
                         f"or --trainer URL{urls_too}")
    if args.command != "publish" and not settings.shared_dir.is_dir():  # a first publish may make the folder
        raise BadRequest(f"the shared folder {settings.shared_dir} does not exist: check --shared or "
                         "LOCKSTEP_SHARED_DIR")
    return Coordinator(settings, clock=SYSTEM_CLOCK, owner=owner)


def _refuse_led_replicas(urls: list[str]) -> None:
    """Replicas that follow a trainer (LOCKSTEP_COORDINATOR_URL) or a shared folder take their versions from it,
    which numbers them: a publish made over their heads would reuse a number and be undone at the next catch-up."""
    import httpx

    for url in urls:
        try:
            status = httpx.get(f"{url.rstrip('/')}/status", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            continue  # unreachable here: the publish itself reports it
        if not isinstance(status, dict):
            continue
        if status.get("coordinator_url"):
            raise BadRequest(f"the replica at {url} follows the trainer at {status['coordinator_url']}, which would "
                             f"undo this at its next catch-up; go through it: --trainer {status['coordinator_url']}")
        if status.get("shared_dir"):
            raise BadRequest(f"the replica at {url} follows the shared folder {status['shared_dir']}, which would "
                             f"undo this at its next catch-up; go through it: --shared {status['shared_dir']}")


def _print_result(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    colour = {"committed": "green", "unchanged": "cyan"}.get(result.outcome, "red")
    console.print(f"[bold {colour}]v{result.version} {result.outcome}[/] ({result.model})"
                  + (f": {result.reason}" if result.reason else ""))
    if result.replicas:
        table = Table("replica", "outcome", "stage s", "weights digest", "error")
        for r in result.replicas:
            table.add_row(r.replica_id, r.outcome, f"{r.stage_seconds:.2f}" if r.stage_seconds is not None else "",
                          (r.weights_digest or "")[:12], r.error or "")
        console.print(table)
    console.print(f"prepare {result.prepare_s:.2f}s, total {result.total_s:.2f}s, generation {result.generation}")


def _progress_printer() -> Any:
    def show(event: str, details: dict[str, Any]) -> None:
        if event == "staging":
            print(f"\r  staging: {details['staged']}/{details['live']} staged, {details['failed']} failed",
                  end="", flush=True, file=sys.stderr)
        else:
            print(f"\n  {event}: {details}", file=sys.stderr)

    return show


def _upload_printer(folder: str) -> Any:
    def show(sent: int, total: int) -> None:
        print(f"\r  uploading {folder} to the trainer: {sent / 2**20:.1f} / {total / 2**20:.1f} MiB", end="",
              flush=True, file=sys.stderr)

    return show


def _trainer_client(args: argparse.Namespace) -> Any:
    """A client for ``--trainer URL``, or None: then the command acts on the shared folder (or replica URLs)."""
    if not args.trainer:
        return None
    from lockstep.trainer.client.http import TrainerClient

    return TrainerClient(args.trainer, token=load_settings().api_token)


def cmd_publish(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, "publish")
    rollout, plan = _rollout_args(args)  # a bad share or gate is refused before anything starts
    trainer = _trainer_client(args)
    if trainer is not None:
        if Path(args.ref).is_dir():  # a folder here: the trainer may not see it, so it is uploaded
            result = trainer.publish_folder(args.ref, policy=args.policy, timeout_s=args.timeout,
                                            progress=_upload_printer(args.ref), rollout=rollout)
            print(file=sys.stderr)
        else:
            result = trainer.publish(args.ref, policy=args.policy, timeout_s=args.timeout, rollout=rollout)
        _print_result(result)
        return 0 if result.ok else 1
    coordinator = _coordinator(args)
    if plan is not None:
        if args.task:
            from dataclasses import replace

            from lockstep.trainer.runs.tasks import get_task
            from lockstep.trainer.server.task_gate import fleet_task_score

            plan = replace(plan, task_score=fleet_task_score(coordinator, get_task(args.task), 16,
                                                             coordinator.settings.api_token))
        # Ctrl-C here, or a closed terminal, rolls the fleet back before the command exits (the rollout's own
        # rule for a failure).
        with _stopping_as_interrupt():
            result = coordinator.rollout(args.ref, plan, timeout_s=args.timeout, progress=_progress_printer())
    else:
        with _stopping_as_interrupt():
            result = coordinator.publish(args.ref, policy=CommitPolicy(args.policy) if args.policy else None,
                                         timeout_s=args.timeout, progress=_progress_printer())
    print(file=sys.stderr)
    _print_result(result)
    return 0 if result.ok else 1


@contextlib.contextmanager
def _stopping_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal, a dropped ``kubectl exec``, a pod stopped) end the block as Ctrl-C
    does, so that what it drives is undone the same way instead of left in force."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _rollout_args(args: argparse.Namespace) -> tuple[dict[str, Any] | None, Any]:
    """``--canary``, ``--shadow``... as the trainer's request fields and as a checked plan (None: a plain publish)."""
    from lockstep.sync.gates import parse_gate_option
    from lockstep.sync.rollout import make_plan

    if args.canary is None and not args.shadow:
        if args.gate or args.step_seconds is not None or args.min_requests is not None or args.task:
            raise BadRequest("--gate, --step-seconds, --min-requests and --task belong to a rollout: add --canary "
                             "(like --canary 5,25,100) or --shadow PERCENT")
        return None, None
    gate_specs = dict(parse_gate_option(text) for text in args.gate or ())
    fields = {"step_seconds": 60.0 if args.step_seconds is None else args.step_seconds,
              "min_requests": 100 if args.min_requests is None else args.min_requests,
              "shadow": args.shadow or 0.0, "gates": gate_specs or None, "task": args.task}
    plan = make_plan(args.canary, step_seconds=fields["step_seconds"], min_requests=fields["min_requests"],
                     shadow=fields["shadow"], gate_specs=fields["gates"])
    fields["canary"] = list(plan.shares) if args.canary else None  # as checked: "5%" is 5
    return fields, plan


def cmd_rollback(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, "rollback")
    trainer = _trainer_client(args)
    if trainer is not None:
        result = trainer.rollback(args.to)
        _print_result(result)
        return 0 if result.ok else 1
    coordinator = _coordinator(args)
    result = coordinator.rollback(args.to, policy=CommitPolicy(args.policy) if args.policy else None,
                                  timeout_s=args.timeout, progress=_progress_printer())
    print(file=sys.stderr)
    _print_result(result)
    return 0 if result.ok else 1


def cmd_rollout(args: argparse.Namespace) -> int:
    """``lockstep rollout status|promote|abort``: a rollout in progress, through the trainer or the shared folder."""
    _setup_logging(args.log_level, "rollout")
    trainer = _trainer_client(args)
    if trainer is not None:
        view = {"status": trainer.rollout, "promote": trainer.promote, "abort": trainer.abort_rollout}[args.action]()
        _print_rollout(view)
        return 0
    coordinator = _coordinator(args, reads_state=True)
    if args.action == "abort":  # its driver is gone (else it holds the lease and this waits for it)
        result = coordinator.end_rollout("aborted by a person (lockstep rollout abort)")
        if result is None:
            raise LockstepError("no rollout is in progress in this shared folder")
        _print_result(result)
        return 0
    if args.action == "promote":
        raise BadRequest("promote a rollout through the process that drives it: its trainer (--trainer URL), or "
                         "the lockstep publish --canary command (let it finish); lockstep rollout abort rolls back")
    _print_split(coordinator.read_state())
    return 0


def _print_rollout(view: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"rollout {view.get('id')}: v{view.get('version')} {view.get('phase')}, step {view.get('step')} "
                  f"at {view.get('share', 0):g}%" + (f" — {view['reason']}" if view.get("reason") else ""))
    if view.get("gates"):
        table = Table("gate", "verdict", "value", "threshold", "samples", "why")
        for g in view["gates"]:
            value = "" if g.get("value") is None else f"{g['value']:.4g}"
            table.add_row(g["name"], g["verdict"], value, f"{g['threshold']:g}", f"{g['samples']}/{g['min_samples']}",
                          g.get("reason") or "")
        console.print(table)


def _print_split(state: Any) -> None:
    from rich.console import Console

    if state.split is None or state.pending is None or state.pending.phase.value != "canary":
        Console().print("no rollout is in progress")
        return
    s = state.split
    Console().print(f"rollout {s.rollout}: v{s.version} answers {s.share:g}% (step {s.step}"
                    + (f", shadow {s.shadow:g}%" if s.shadow else "") + f") by {state.pending.coordinator}")


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from lockstep.sync.rollout import ENDED
    from lockstep.sync.shared_files import read_heartbeats

    trainer = _trainer_client(args)
    if trainer is not None:
        _print_cluster(trainer.cluster())
        try:
            view = trainer.rollout()
        except LockstepError:
            return 0  # no rollout has run there
        if view.get("phase") not in ENDED:
            _print_rollout(view)
        return 0
    coordinator = _coordinator(args, reads_state=True)
    state = coordinator.read_state()
    if state.split is not None:
        _print_split(state)
    console = Console()
    committed = state.committed
    console.print(f"committed: {'v' + str(committed.version) + ' (' + committed.model + ')' if committed else 'none'}"
                  f"   generation {state.generation}"
                  + (f"   in progress: v{state.pending.version} {state.pending.phase.value}"
                     if state.pending and state.pending.phase.value in IN_PROGRESS else ""))
    table = Table("replica", "state", "serving", "staged", "ready", "last heartbeat", "last error")
    now = time.time()
    for b in read_heartbeats(coordinator.data_dir):
        age = now - b.time
        stale = age > coordinator.settings.heartbeat_ttl_s
        staged = f"v{b.staged.version} {b.staged.state.value}" if b.staged else ""
        table.add_row(b.replica_id, "gone" if stale else b.state.value,
                      f"v{b.serving.version}" if b.serving else "-", staged, "yes" if b.ready and not stale else "no",
                      f"{age:.1f}s ago", (b.last_error or "")[:60])
    console.print(table)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from lockstep.sync import retention

    _setup_logging(args.log_level, "gc")
    if load_settings(**_shared_overrides(args)).shared_dir is None:
        print("error: gc needs the store's folder: --shared DIR or LOCKSTEP_SHARED_DIR (for a trainer without a "
              "shared folder, its LOCKSTEP_TRAINER_DATA_DIR)", file=sys.stderr)
        return 2
    plan = retention.collect(_coordinator(args), dry_run=args.dry_run)
    for entry in plan.entries:
        action = ("would remove" if args.dry_run else "removed") if entry.remove else "keep"
        size = f"{entry.size / 2**20:.1f} MiB" if entry.remove and entry.size is not None else ""
        print(f"{action:<12}  {entry.name:<24}  {size:>11}  {entry.reason}")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(plan.removals)} entries ({plan.freed_bytes / 2**20:.1f} MiB); "
          f"versions kept: {', '.join(str(v) for v in plan.kept_versions) or 'none'}")
    return 0


def _print_cluster(cluster: dict[str, Any]) -> None:
    """``lockstep status --trainer``: the trainer's view (replicas it discovered and probed)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    committed, pending = cluster.get("committed"), cluster.get("pending")
    conv = cluster.get("convergence") or {}
    head = f"v{committed['version']} ({committed['model']})" if committed else "none"
    # The ledger keeps the last decision (a commit, an abort) as its pending record: only these are under way.
    busy = pending if pending and pending.get("phase") in IN_PROGRESS else None
    console.print(f"committed: {head}   generation {cluster.get('generation', 0)}"
                  + (f"   in progress: v{busy['version']} {busy['phase']}" if busy else "")
                  + f"   {conv.get('at_version', 0)}/{conv.get('total', 0)} replicas at the committed version",
                  soft_wrap=True)
    table = Table("replica", "state", "serving", "staged", "ready", "last heartbeat", "last error")
    for r in cluster.get("replicas") or []:
        staged = f"v{r['staged_version']} {r.get('staged_state') or ''}" if r.get("staged_version") is not None else ""
        age = r.get("heartbeat_age_s")
        seen = f"{age:.1f}s ago" if age is not None else ("answers" if r.get("reachable") else "unreachable")
        serving = f"v{r['serving_version']}" if r.get("serving_version") is not None else "-"
        table.add_row(r["replica_id"], r.get("state") or "", serving, staged, "yes" if r.get("ready") else "no",
                      seen, (r.get("last_error") or "")[:60])
    console.print(table)


# ---------------------------------------------------------------------------------------------------- models
def cmd_tiny_model(args: argparse.Namespace) -> int:
    from lockstep.models.tiny import build_tiny_model, ensure_builtin

    _setup_logging(args.log_level, "tiny-model")
    if args.out is None:
        settings = load_settings()
        for name in ("tiny-s0", "tiny-s1"):
            print(ensure_builtin(name, settings.builtin_path))
        return 0
    out = Path(args.out)
    if args.if_missing and (out / "config.json").is_file():
        print(out)
        return 0
    print(build_tiny_model(out, seed=args.seed, size=args.size, overwrite=args.overwrite))
    return 0


TRAINER_HELP = "act through the trainer at URL (clusters without a shared folder; token: LOCKSTEP_API_TOKEN)"


def _positive_seconds(text: str) -> float:
    """An argparse type: seconds above zero (0 or less would abort before any replica could stage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} seconds: give a number above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lockstep", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="before the command: lockstep --log-level debug up")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run an inference replica")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="initial model reference (default INITIAL_MODEL_REPO_ID)")
    p.add_argument("--shared", default=None, help="shared folder (default LOCKSTEP_SHARED_DIR)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("trainer", help="run the trainer server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--shared", default=None)
    p.set_defaults(func=cmd_trainer)

    p = sub.add_parser("ui", help="run the UI server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--trainer-url", default=None)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("up", help="run the whole system locally (Ctrl-C stops it)")
    p.add_argument("--replicas", type=int, default=2, help="how many inference replicas")
    p.add_argument("--shared", default="var/shared", help="the local folder standing in for the shared volume")
    p.add_argument("--base-port", type=int, default=8001, help="the first replica's port; the next ones follow")
    p.add_argument("--trainer-port", type=int, default=8090, help="the trainer's port")
    p.add_argument("--ui-port", type=int, default=8080, help="the UI's port")
    p.add_argument("--model", default=None, help="initial model reference (default INITIAL_MODEL_REPO_ID)")
    p.add_argument("--no-trainer", action="store_true", help="start no trainer")
    p.add_argument("--no-ui", action="store_true", help="start no UI")
    p.set_defaults(func=cmd_up)

    for name, func, helptext in (("publish", cmd_publish, "publish a model to every replica (two phases)"),
                                 ("rollback", cmd_rollback, "commit an earlier version again")):
        p = sub.add_parser(name, help=helptext)
        if name == "publish":
            p.add_argument("ref", help="repo id, ./local/dir, versions/N or builtin:tiny-sN (with --trainer, a "
                                       "folder here is uploaded to the trainer)")
            p.add_argument("--urls", default=None,
                           help="comma-separated replica URLs: publish over HTTP (no shared folder)")
            p.add_argument("--canary", default=None, metavar="SHARES",
                           help="roll out in steps: percent of traffic per step, increasing, like 5,25,100")
            p.add_argument("--shadow", type=float, default=None, metavar="PERCENT",
                           help="also run this percent of the served prompts on the new version, compared, "
                                "never returned (a first step with no traffic share)")
            p.add_argument("--step-seconds", type=float, default=None, help="seconds each step holds at least (60)")
            p.add_argument("--min-requests", type=int, default=None,
                           help="answers from the new version each step waits for at least (100)")
            p.add_argument("--gate", action="append", metavar="NAME=THRESHOLD",
                           help="a gate's threshold (repeatable); NAME=off turns a default gate off")
            p.add_argument("--task", choices=["digits", "target_word"], default=None,
                           help="score the new version on this task's held-out prompts before the first step "
                                "(the task_score gate)")
        else:
            p.add_argument("--to", type=int, default=None, help="version (default: the one before)")
        p.add_argument("--policy", choices=[c.value for c in CommitPolicy], default=None)
        p.add_argument("--timeout", type=_positive_seconds, default=None,
                       help="seconds to wait for every replica to stage")
        p.add_argument("--shared", default=None)
        p.add_argument("--trainer", default=None, metavar="URL", help=TRAINER_HELP)
        p.set_defaults(func=func)

    p = sub.add_parser("rollout", help="a rollout in progress: status, promote or abort")
    p.add_argument("action", choices=["status", "promote", "abort"])
    p.add_argument("--shared", default=None)
    p.add_argument("--trainer", default=None, metavar="URL", help=TRAINER_HELP)
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("status", help="what every replica serves")
    p.add_argument("--shared", default=None)
    p.add_argument("--trainer", default=None, metavar="URL", help=TRAINER_HELP)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("gc", help="remove old, aborted and unfinished versions from the store (what stays: "
                                  "docs/operations.md, Storage)")
    p.add_argument("--dry-run", action="store_true", help="only show what would go and why")
    p.add_argument("--shared", default=None, help="the store's folder (default LOCKSTEP_SHARED_DIR)")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("tiny-model", help="build a built-in tiny model offline")
    p.add_argument("out", nargs="?", default=None, help="output dir (default: build the built-ins)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["tiny", "mid"], default="tiny")
    p.add_argument("--if-missing", action="store_true", help="leave a model already built in OUT as it is")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    p.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LockstepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a setting from the environment that does not fit (Settings names it)
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or exc.title
            value = "<hidden>" if "TOKEN" in where.upper() else repr(err.get("input"))  # never echo a secret
            print(f"error: {where}={value}: {err['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
